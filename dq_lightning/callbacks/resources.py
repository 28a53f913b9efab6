"""Each process's step times and peak memory during a fit, one JSON file per rank.

    python -m dq_lightning fit --config ... --trainer.callbacks+=dq_lightning.callbacks.resources.ResourceUsage \
        --trainer.callbacks.dirpath=runs/usage --trainer.callbacks.name=fit

writes `runs/usage/fit-rank<r>.json` in every rank: the seconds and shape (batch, source and target tokens) of
every training batch with the global step after it, the seconds of every validation, the global step the fit started from (a resumed fit starts from its
checkpoint's), and memory: the peak resident set (before and after each validation, and at the end) (VmHWM of /proc/self/status; not `ru_maxrss`, which Linux
carries over from the parent across fork and exec), the resident set when training starts (models, data and
libraries loaded), and on CUDA the peak of the caching allocator. `benchmarks/rehearsal.py` reads them; the
memory estimate (`python -m dq_lightning memory`) is checked against them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

import lightning.pytorch as pl
import torch

from dq_lightning.files import write_json_atomic
from dq_lightning.process_memory import proc_status_mib


class ResourceUsage(pl.Callback):
    """Write `<dirpath>/<name>-rank<global rank>.json` when the fit ends (and after every validation, so a fit
    that dies later still leaves what it measured)."""

    def __init__(self, dirpath: str, name: str = "fit"):
        """
        Args:
            dirpath: folder of the JSON files (made if missing).
            name: file name prefix: `fit`, `resume`, ... (one file per rank and name).
        """
        self.dirpath, self.name = Path(dirpath), name
        self.record: dict = {}
        self._batch_started = self._validation_started = self._fit_started = 0.0
        self._hwm_before_validation: float | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_started = time.perf_counter()
        self.record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "pid": os.getpid(),
                       "threads": torch.get_num_threads(), "precision": str(trainer.precision),
                       "accumulate_grad_batches": trainer.accumulate_grad_batches,
                       "batches": [], "validations": []}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the checkpoint's training state is restored: a resumed fit's first step.
        self.record["start_step"] = trainer.global_step
        self.record["rss_at_train_start_mib"] = proc_status_mib("VmRSS")
        self.record["hwm_at_train_start_mib"] = proc_status_mib("VmHWM")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._batch_started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        entry = {"global_step": trainer.global_step, "seconds": time.perf_counter() - self._batch_started}
        if isinstance(batch, Mapping) and "input_ids" in batch and "labels" in batch:  # a dict or BatchEncoding
            # batches are padded to their longest sequence: memory depends on these, not on the configured maxima
            entry["shape"] = [*batch["input_ids"].shape, batch["labels"].shape[-1]]
        self.record["batches"].append(entry)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._validation_started = time.perf_counter()
        # The peak so far, before this validation adds its own (its batch and generation can exceed training's).
        self._hwm_before_validation = proc_status_mib("VmHWM")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self.record["validations"].append({"global_step": trainer.global_step,
                                           "seconds": time.perf_counter() - self._validation_started,
                                           "peak_rss_before_mib": self._hwm_before_validation,
                                           "peak_rss_after_mib": proc_status_mib("VmHWM")})
        self._write(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.record["fit_seconds"] = time.perf_counter() - self._fit_started
        self._write(trainer)

    def _write(self, trainer: pl.Trainer) -> None:
        self.record["end_step"] = trainer.global_step
        self.record["peak_rss_mib"] = proc_status_mib("VmHWM")
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.record["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
            self.record["cuda_peak_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
        write_json_atomic(self.dirpath / f"{self.name}-rank{trainer.global_rank}.json", self.record)
