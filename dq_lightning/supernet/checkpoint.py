"""A point of a supernet as an ordinary DQ student checkpoint: what a `DQStudentModule` fit of that point would have
saved (its hyper-parameters, its prepared student's latent weights, a thinner student's kept units), so `test
--ckpt_path`, `export`, `predict` and `robustness` take it unchanged; its `supernet` entry says where it came
from. Its weights are the sub-network's slices of the supernet, bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

STUDENT_CLASS = "dq_lightning.modules.student.DQStudentModule"
SUBNETS_DIR = "subnets"  # <supernet run>/subnets/<point>.ckpt: each point's best student of the fit
GROUP_NAMES = ("shape", "objective", "quant_settings", "optimizer", "evaluation")


def student_checkpoint(supernet, subnet, datamodule_hparams: dict | None = None,
                       progress: tuple[int, int] | None = None) -> dict[str, Any]:
    """The checkpoint of `subnet`'s student (a `SubNet`; built if it is not one of the grid's) with the
    supernet's current weights; `progress` the (epoch, optimizer step) they were trained to (default: the
    supernet's trainer's)."""
    import lightning.pytorch as pl

    from dq_lightning.modules.student import DQStudentModule
    from dq_lightning.quant import prepare
    from dq_lightning.supernet.subnetwork import SubNetwork

    network = supernet.subnetworks().get(subnet) or SubNetwork(subnet, supernet.hparams.teacher, supernet.recipe,
                                                               supernet.width_scores)
    epoch, step = progress if progress is not None else (supernet.current_epoch, supernet.global_step)
    trainer = supernet._trainer
    run = str(Path(trainer.default_root_dir).resolve()) if trainer is not None else getattr(supernet, "run_dir", None)
    hparams = supernet.hparams
    module = DQStudentModule(teacher=hparams.teacher, mode="dq", recipe=hparams.recipe, bits=subnet.bits,
                             depth=subnet.depth, width=subnet.width, lr=hparams.lr, generation=hparams.generation,
                             **{name: hparams[name] for name in GROUP_NAMES})
    if network.kept is not None:
        module.use_checkpoint_width({"width_kept": network.kept.to_state()})
    if module.quant_config is not None:
        prepare(module.model, module.quant_config)
    module.model.load_state_dict(network.state(supernet.latent()))
    checkpoint = {"state_dict": module.state_dict(),
                  "hyper_parameters": {**dict(module.hparams), "_class_path": STUDENT_CLASS},
                  "module_class": STUDENT_CLASS, "pytorch-lightning_version": pl.__version__,
                  "epoch": epoch, "global_step": step,
                  "supernet": {"subnet": subnet.name, "trained_point": subnet in supernet.grid, "run": run,
                               "global_step": step, "subnet_passes": supernet.subnet_passes}}
    if network.kept is not None:
        checkpoint["width_kept"] = network.kept.to_state()
    if datamodule_hparams:
        checkpoint["datamodule_hyper_parameters"] = datamodule_hparams
    return checkpoint


def save_student_checkpoint(supernet, subnet, path: Path, datamodule_hparams: dict | None = None,
                            progress: tuple[int, int] | None = None) -> Path:
    """`student_checkpoint` written atomically to `path` (the DataModule's hyper-parameters from the running
    fit unless given, so export and predict know the task and the source length)."""
    from dq_lightning.checkpoints import AtomicCheckpointIO

    if datamodule_hparams is None:
        datamodule = getattr(supernet._trainer, "datamodule", None) if supernet._trainer is not None else None
        datamodule_hparams = dict(datamodule.hparams) if datamodule is not None else None
    AtomicCheckpointIO().save_checkpoint(student_checkpoint(supernet, subnet, datamodule_hparams, progress), path)
    return path
