"""Write the best model so far as a Hugging Face directory: the teacher the student loads."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


class ExportBestHF(pl.Callback):
    """After each validation, if `monitor` improved, `save_pretrained` the model and tokenizer to `dirpath`.

    The directory is replaced only once fully written, so a crash leaves the previous best intact.
    """

    def __init__(self, dirpath: str, monitor: str = "val/rougeL", mode: str = "max"):
        """
        Args:
            dirpath: the Hugging Face directory to (over)write with the best model.
            monitor: logged metric that decides "best" (the task's metric, e.g. val/rougeL or val/bleu).
            mode: "max" or "min".
        """
        if mode not in ("max", "min"):
            raise ValueError(f"ExportBestHF mode={mode!r} must be 'max' or 'min'")
        self.dirpath, self.monitor, self.mode = dirpath, monitor, mode
        self.best: float | None = None

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            rank_zero_warn(f"ExportBestHF: metric {self.monitor!r} was not logged; nothing exported")
            return
        value = float(value.item() if isinstance(value, torch.Tensor) else value)
        if math.isnan(value) or not self._improved(value):
            return
        self.best = value
        if trainer.is_global_zero:
            pl_module.save_hf(self.dirpath, {self.monitor: value, "epoch": trainer.current_epoch})
            rank_zero_info(f"ExportBestHF: {self.monitor}={value:.3f}, wrote {self.dirpath}")
        trainer.strategy.barrier("export_best_hf")

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = state_dict.get("best")
