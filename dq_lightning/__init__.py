"""dq_lightning: joint distillation and quantization of BART/mBART (DQ-BART) with PyTorch Lightning."""

__version__ = "0.1.0"

from dq_lightning.compat import install_aliases as _install_aliases

_install_aliases()  # old import paths of moved classes (checkpoints and configs name them)
