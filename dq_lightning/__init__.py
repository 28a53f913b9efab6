"""dq_lightning: joint distillation and quantization of BART/mBART (DQ-BART) with PyTorch Lightning."""

__version__ = "0.1.0"
