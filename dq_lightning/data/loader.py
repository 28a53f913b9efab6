"""A DataLoader that resumes mid-epoch at the batch where a checkpoint was taken.

Its position is the shuffling generator's state at the start of the epoch plus the number of batches
already handed out; restored, the next pass draws the same permutation and skips those batches, so a resumed
run sees exactly the batches an uninterrupted run would.

Under DDP Lightning does not iterate this loader: it builds a copy with a DistributedSampler (whose
permutation depends only on seed and the epoch, which the loop state restores) from the arguments this one was
built with. The position therefore lives in a `LoaderCursor` passed as an argument, which the copy receives
too: a restored skip reaches the loader that is iterated, and the batches it hands out are what is saved.

The position travels in the checkpoint through the DataModule's `state_dict`, not the loader's own:
Lightning restores loader states only if the loader is built after the loop state is loaded, and the
train loader is built earlier (to count the steps of the LR schedule); DataModule state is restored first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader


@dataclass
class LoaderCursor:
    """Where the current pass stands: shared by a loader and every copy Lightning makes of it."""

    epoch_start_state: torch.Tensor | None = None  # the shuffling generator when the pass began
    yielded: int = 0  # batches handed out (replayed ones included) in this pass
    batches: int = 0  # batches in a whole pass of the loader being iterated (per rank under DDP)
    skip: int = 0  # batches the next pass drops to reach a restored position


class ResumableDataLoader(DataLoader):
    def __init__(self, *args, cursor: LoaderCursor | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        # Public, so Lightning also hands it to a copy it builds from this loader's attributes.
        self.cursor = cursor if cursor is not None else LoaderCursor()

    def _generator(self) -> torch.Generator | None:
        return getattr(self.sampler, "generator", None) or self.generator

    def __iter__(self):
        cursor = self.cursor
        generator = self._generator()
        cursor.epoch_start_state = generator.get_state() if generator is not None else None
        skip, cursor.skip = cursor.skip, 0
        cursor.yielded, cursor.batches = 0, len(self)
        for batch in super().__iter__():
            cursor.yielded += 1
            if cursor.yielded <= skip:  # replayed to reach the saved position; the batch is dropped
                continue
            yield batch

    def position(self) -> dict[str, Any]:
        cursor = self.cursor
        generator = self._generator()
        if cursor.yielded >= cursor.batches or cursor.epoch_start_state is None:
            # Between epochs: the next pass starts from the generator as it is now.
            return {"generator": generator.get_state() if generator is not None else None, "batches": 0}
        return {"generator": cursor.epoch_start_state, "batches": cursor.yielded}

    def restore_position(self, state: dict[str, Any]) -> None:
        generator = self._generator()
        if generator is not None and state.get("generator") is not None:
            generator.set_state(state["generator"])
        self.cursor.skip = int(state.get("batches", 0))
