"""Keep the recipe's batch on any hardware: gradient accumulation derived from a global batch size.

The DQ-BART recipe trains on 16 sequences per optimizer step: the official `run_summarization_no_trainer.py`
(amazon-science/dq-bart) defaults to `per_device_train_batch_size=8` and `gradient_accumulation_steps=2`, and
its README runs it as one process (one GPU). A config that fixes the accumulation instead trains on 64
sequences per step on 4 GPUs and on 128 on two such nodes, with a learning rate and schedule length tuned for
16. With a global batch size the accumulation is

    accumulate_grad_batches = global_batch_size / (devices x num_nodes x per-device batch_size)

computed once the trainer is built (it knows its devices and nodes), before the LR schedule counts its steps;
a global batch that does not divide is one `UserError` naming the settings. The CLI's `--global_batch_size`
uses this callback and writes the derived accumulation into the run's `config.yaml`; from Python, put
`GlobalBatchSize(16)` in the Trainer's callbacks (then it derives the accumulation at `setup`).
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from dq_lightning.errors import UserError


def _divisors(number: int) -> list[int]:
    return [value for value in range(1, number + 1) if number % value == 0]


def accumulation_for(global_batch_size: int, per_device_batch_size: int, devices: int, num_nodes: int = 1) -> int:
    """The gradient accumulation that makes `global_batch_size` sequences per optimizer step.

    Raises `UserError` (one line naming global_batch_size, trainer.devices, trainer.num_nodes and
    data.batch_size, with the values that would work) when the global batch is not a multiple of
    devices x nodes x per-device batch.
    """
    for name, value in (("global_batch_size", global_batch_size), ("data.batch_size", per_device_batch_size),
                        ("trainer.devices", devices), ("trainer.num_nodes", num_nodes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{name}={value!r} must be a positive whole number (global_batch_size: sequences per "
                            f"optimizer step over all devices and nodes)")
    processes = devices * num_nodes
    per_pass = processes * per_device_batch_size
    if global_batch_size % per_pass == 0:
        return global_batch_size // per_pass
    settings = (f"global_batch_size={global_batch_size} is not a multiple of trainer.devices x trainer.num_nodes x "
                f"data.batch_size = {devices} x {num_nodes} x {per_device_batch_size} = {per_pass}")
    if global_batch_size % processes == 0:
        choices = ", ".join(map(str, _divisors(global_batch_size // processes)))
        hint = f"on {devices} x {num_nodes} devices choose data.batch_size from {choices}"
    else:
        hint = (f"{processes} processes cannot share {global_batch_size} sequences evenly: use a device count "
                f"that divides {global_batch_size}, or a global_batch_size that is a multiple of {processes}")
    raise UserError(f"{settings}, so no whole gradient accumulation gives that global batch; {hint}")


def per_device_batch_size(datamodule) -> int:
    """The training batch size per device of a data module (`batch_size` in its hparams or as an attribute)."""
    hparams = getattr(datamodule, "hparams", None) or {}
    value = hparams.get("batch_size") if hasattr(hparams, "get") else None
    if value is None:
        value = getattr(datamodule, "batch_size", None)
    if value is None:
        raise UserError(f"global_batch_size needs the per-device training batch size (data.batch_size), and "
                        f"{type(datamodule).__name__ if datamodule is not None else 'no data module'} has none")
    return value


class GlobalBatchSize(pl.Callback):
    """Derive `trainer.accumulate_grad_batches` from `global_batch_size`, log the derived values and keep
    them in checkpoints (a resume on other hardware says how the same global batch is now made up)."""

    def __init__(self, global_batch_size: int):
        """
        Args:
            global_batch_size: sequences per optimizer step over all devices and nodes (DQ-BART: 16).
        """
        self.global_batch_size = global_batch_size
        self.record: dict[str, int] = {}
        self.restored: dict[str, int] = {}

    def apply(self, trainer: pl.Trainer, datamodule=None, given: int | None = None) -> dict[str, int]:
        """Set `trainer.accumulate_grad_batches` and return the derived values.

        `given` is an accumulation the user set explicitly (`trainer.accumulate_grad_batches`); one other than 1
        that differs from the derived one is refused rather than silently replaced.
        """
        datamodule = datamodule if datamodule is not None else trainer.datamodule
        per_device = per_device_batch_size(datamodule)
        devices, nodes = trainer.num_devices, trainer.num_nodes
        accumulation = accumulation_for(self.global_batch_size, per_device, devices, nodes)
        given = trainer.accumulate_grad_batches if given is None and not self.record else given
        if given is not None and given not in (1, accumulation):
            raise UserError(f"trainer.accumulate_grad_batches={given} conflicts with global_batch_size="
                            f"{self.global_batch_size}, which gives {accumulation} on {devices} devices x {nodes} "
                            f"nodes x data.batch_size {per_device}; set only global_batch_size (a run's saved "
                            f"config.yaml records the accumulation derived on its hardware: drop it there, or give "
                            f"--trainer.accumulate_grad_batches={accumulation})")
        trainer.accumulate_grad_batches = accumulation
        self.record = {"global_batch_size": self.global_batch_size, "per_device_batch_size": per_device,
                       "devices": devices, "num_nodes": nodes, "world_size": devices * nodes,
                       "accumulate_grad_batches": accumulation}
        return self.record

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        record = self.apply(trainer)  # again after the launch: the same values in every process
        if trainer.world_size != record["world_size"]:
            raise UserError(f"global_batch_size: the run has {trainer.world_size} processes, not trainer.devices x "
                            f"trainer.num_nodes = {record['devices']} x {record['num_nodes']}; set both to match "
                            f"the launcher (srun --ntasks-per-node, torchrun --nproc-per-node/--nnodes)")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record = self.record
        rank_zero_info(f"global batch: {record['global_batch_size']} sequences per optimizer step = "
                       f"{record['devices']} devices x {record['num_nodes']} nodes x {record['per_device_batch_size']} "
                       f"per device x {record['accumulate_grad_batches']} accumulated batches")
        before = self.restored
        if before and before.get("global_batch_size") != record["global_batch_size"]:
            rank_zero_warn(f"resumed from a checkpoint trained with global_batch_size="
                           f"{before.get('global_batch_size')}; this run uses {record['global_batch_size']}")
        elif before and before != record:
            rank_zero_info(f"resumed from a checkpoint trained on {before.get('devices')} devices x "
                           f"{before.get('num_nodes')} nodes x {before.get('per_device_batch_size')} x "
                           f"{before.get('accumulate_grad_batches')} accumulated: the same global batch")
        for logger in trainer.loggers:
            logger.log_hyperparams(dict(record))

    def state_dict(self) -> dict:
        return dict(self.record)

    def load_state_dict(self, state_dict: dict) -> None:
        self.restored = dict(state_dict)
