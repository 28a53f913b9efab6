"""Leave each stage's final metrics in the run directory as JSON, for sweeps and reports to read.

`fit_metrics.json` holds the validation metrics of the best epoch (by `monitor`), the best checkpoint's
path and the wall time; `test_metrics.json` the test metrics, and `test_predictions.jsonl` every test
example's output and score (`dq_lightning.evaluation.per_example`). Files are written atomically (write,
then rename), so a reader never sees half a file.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from dq_lightning.evaluation.per_example import FILE_NAME as PREDICTIONS_FILE, write_predictions
from dq_lightning.files import write_json_atomic


def _plain(metrics: dict) -> dict[str, float]:
    return {key: float(value.item() if isinstance(value, torch.Tensor) else value) for key, value in metrics.items()}


def last_checkpoint(trainer: pl.Trainer) -> str | None:
    """`last.ckpt` of whichever checkpoint callback keeps one (only one may), else None."""
    return next((c.last_model_path for c in trainer.checkpoint_callbacks if getattr(c, "last_model_path", "")),
                None)


class MetricsFile(pl.Callback):
    """Write `fit_metrics.json` / `test_metrics.json` under `dirpath` (default: trainer.default_root_dir)."""

    def __init__(self, monitor: str = "val/rougeL", mode: str = "max", dirpath: str | None = None):
        """
        Args:
            monitor: metric that picks the best validation epoch.
            mode: "max" or "min".
            dirpath: where to write; default the trainer's default_root_dir.
        """
        self.monitor, self.mode, self.dirpath = monitor, mode, dirpath
        self.best: float | None = None
        self.best_metrics: dict[str, float] = {}
        self.started = time.time()
        self.elapsed_before = 0.0  # wall time of earlier, interrupted attempts (restored on resume)

    def _dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.dirpath or trainer.default_root_dir)

    def on_fit_start(self, trainer, pl_module) -> None:
        self.started = time.time()

    def on_validation_end(self, trainer: pl.Trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = _plain(trainer.callback_metrics)
        value = metrics.get(self.monitor)
        if value is None or math.isnan(value):
            return
        if self.best is None or (value > self.best if self.mode == "max" else value < self.best):
            self.best = value
            self.best_metrics = {k: v for k, v in metrics.items() if k.startswith("val/")}
            self.best_metrics["epoch"] = trainer.current_epoch
            self.best_metrics["step"] = trainer.global_step

    def wall_time(self) -> float:
        return self.elapsed_before + time.time() - self.started

    def on_fit_end(self, trainer: pl.Trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        # The callback ranking by this metric (a periodic last.ckpt saver may come first).
        checkpoint = next((c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None) == self.monitor),
                          trainer.checkpoint_callback)
        write_json_atomic(self._dir(trainer) / "fit_metrics.json", {
            "monitor": self.monitor, "best": self.best, "metrics": self.best_metrics,
            "best_model_path": getattr(checkpoint, "best_model_path", "") or "",
            "last_model_path": last_checkpoint(trainer) or "",
            "global_step": trainer.global_step, "wall_time_s": round(self.wall_time(), 1),
            # The order of floating-point sums, and so the numbers, depend on it (see `sweep --workers`).
            "threads": torch.get_num_threads(),
            "summary": pl_module.run_summary() if hasattr(pl_module, "run_summary") else {}})

    def on_test_end(self, trainer: pl.Trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {k: v for k, v in _plain(trainer.callback_metrics).items() if k.startswith("test/")}
        rows = getattr(pl_module, "test_predictions", None)
        if rows:
            write_predictions(self._dir(trainer) / PREDICTIONS_FILE, rows)
        write_json_atomic(self._dir(trainer) / "test_metrics.json",
                          {"metrics": metrics, "predictions": PREDICTIONS_FILE if rows else None,
                           "test_examples": len(rows) if rows else None})

    def state_dict(self) -> dict:
        return {"best": self.best, "best_metrics": self.best_metrics, "elapsed": self.wall_time()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = state_dict.get("best")
        self.best_metrics = state_dict.get("best_metrics", {})
        self.elapsed_before = state_dict.get("elapsed", 0.0)
