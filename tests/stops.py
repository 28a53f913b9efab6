"""Callbacks that stop a fit at a chosen step, and one that records the data order: for the exact-resume test
(tests/test_reliability.py), given to `python -m dq_lightning fit` as `--trainer.callbacks+=tests.stops....`."""

from __future__ import annotations

import json
import os
import signal
import time

import lightning.pytorch as pl


class BatchLog(pl.Callback):
    """Append, before each training step, the step and the examples of its batch to a JSON Lines file."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with open(self.path, "a") as out:
            out.write(json.dumps({"step": trainer.global_step, "epoch": trainer.current_epoch,
                                  "examples": batch["example_index"].tolist()}) + "\n")


class StopAt(pl.Callback):
    """After optimizer step `step`: send this process `signal` (KILL, INT), raise, or sleep `seconds`."""

    def __init__(self, step: int, how: str, seconds: float = 0.0):
        self.step, self.how, self.seconds = step, how, seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        if self.how == "raise":
            raise RuntimeError(f"a callback failed at step {self.step}")
        if self.how == "sleep":
            time.sleep(self.seconds)
            return
        os.kill(os.getpid(), getattr(signal, f"SIG{self.how}"))
        time.sleep(5)  # the signal is handled before this returns
