"""A DataLoader that resumes mid-epoch at the batch where a checkpoint was taken.

Its position is the shuffling generator's state at the start of the epoch plus the number of batches
already handed out; restored, the next pass draws the same permutation and skips those batches, so a resumed
run sees exactly the batches an uninterrupted run would. (Under DDP Lightning swaps in a DistributedSampler,
whose permutation depends only on seed and epoch; the skip applies the same way.)

The position travels in the checkpoint through the DataModule's `state_dict`, not the loader's own:
Lightning restores loader states only if the loader is built after the loop state is loaded, and the
train loader is built earlier (to count the steps of the LR schedule); DataModule state is restored first.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader


class ResumableDataLoader(DataLoader):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._epoch_start_state: torch.Tensor | None = None
        self._yielded = 0
        self._skip = 0

    def _generator(self) -> torch.Generator | None:
        return getattr(self.sampler, "generator", None) or self.generator

    def __iter__(self):
        generator = self._generator()
        self._epoch_start_state = generator.get_state() if generator is not None else None
        skip, self._skip = self._skip, 0
        self._yielded = 0
        for batch in super().__iter__():
            if self._yielded < skip:  # replayed to reach the saved position; the batches are dropped
                self._yielded += 1
                continue
            self._yielded += 1
            yield batch

    def position(self) -> dict[str, Any]:
        generator = self._generator()
        if self._yielded >= len(self) or self._epoch_start_state is None:
            # Between epochs: the next pass starts from the generator as it is now.
            return {"generator": generator.get_state() if generator is not None else None, "batches": 0}
        return {"generator": self._epoch_start_state, "batches": self._yielded}

    def restore_position(self, state: dict[str, Any]) -> None:
        generator = self._generator()
        if generator is not None and state.get("generator") is not None:
            generator.set_state(state["generator"])
        self._skip = int(state.get("batches", 0))
