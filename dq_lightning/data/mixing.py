"""Training batches of labeled rows and of unlabeled inputs, mixed: each batch is of one kind.

A labeled batch trains on its references (the DQ objective), an unlabeled one on the teacher alone, and the two
weigh differently: keeping them apart keeps every batch's loss one objective (as Cross-View Training alternates
labeled and unlabeled minibatches; Clark et al. 2018). The training dataset is the labeled rows (indices
`0 .. labeled-1`) followed by the unlabeled inputs; per epoch, every labeled row is drawn once, and either every
unlabeled input once (`per_labeled` unset) or `round(per_labeled x labeled batches)` full unlabeled batches drawn
from fresh permutations of the inputs; the batches of both kinds are then shuffled together.

The order comes from the loader's generator, which `ResumableDataLoader` saves and restores, so a resumed fit
sees the batches an uninterrupted one would. Under DDP Lightning rebuilds this sampler around a
`DistributedSampler`: the batches are then drawn from the sampler's seed and epoch (the same on every rank, as
DistributedSampler's permutation is), padded by repeating the first ones to a multiple of the ranks, and each
rank takes every world-size-th batch, so all ranks run the same number of steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import BatchSampler, Dataset, DistributedSampler, Sampler


class LabeledThenUnlabeled(Dataset):
    """The labeled rows, then the unlabeled inputs (their labels the teacher's outputs), each row marked with
    `labeled` (1 or 0), which reaches the batch: the student's step tells the kinds apart by it."""

    def __init__(self, labeled, unlabeled):
        self.labeled, self.unlabeled = labeled, unlabeled

    def __len__(self) -> int:
        return len(self.labeled) + len(self.unlabeled)

    def __getitem__(self, index: int) -> dict:
        if index < len(self.labeled):
            return {**self.labeled[index], "labeled": 1}
        return {**self.unlabeled[index - len(self.labeled)], "labeled": 0}


def unlabeled_batch(batch: dict) -> bool:
    """Whether a training batch holds unlabeled inputs (its rows' `labeled` are 0); batches without the
    column hold labeled rows. A batch of both kinds is a bug of its loader, never trained on."""
    kinds = batch.get("labeled")
    if kinds is None or bool(kinds.all()):
        return False
    if not bool(kinds.any()):
        return True
    raise ValueError("a training batch mixes labeled rows and unlabeled inputs (MixedBatchSampler keeps them apart)")


def _chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[start:start + size] for start in range(0, len(indices), size)]


class MixedBatchSampler(BatchSampler):
    def __init__(self, sampler: Sampler, batch_size: int, drop_last: bool = False, labeled: int = 0,
                 unlabeled: int = 0, per_labeled: float | None = None, generator: torch.Generator | None = None):
        """
        Args:
            sampler: only read under DDP (a `DistributedSampler` Lightning put in): its ranks, seed and epoch.
            batch_size: rows per batch.
            drop_last: kept for Lightning, which rebuilds a batch sampler with it; every row is used regardless.
            labeled: labeled rows, the dataset's first indices.
            unlabeled: unlabeled inputs, the indices after them.
            per_labeled: unlabeled batches per labeled batch in an epoch; None: every unlabeled input once.
            generator: the loader's shuffling generator (single process).
        """
        super().__init__(sampler, batch_size, drop_last)
        self.labeled, self.unlabeled, self.per_labeled, self.generator = labeled, unlabeled, per_labeled, generator

    def _labeled_batches(self) -> int:
        return math.ceil(self.labeled / self.batch_size)

    def _unlabeled_batches(self) -> int:
        if not self.unlabeled:
            return 0
        if self.per_labeled is None:
            return math.ceil(self.unlabeled / self.batch_size)
        return round(self.per_labeled * self._labeled_batches())

    def epoch_batches(self, generator: torch.Generator) -> list[list[int]]:
        """One epoch's batches, in order, drawn from `generator`."""
        labeled = _chunks(torch.randperm(self.labeled, generator=generator).tolist(), self.batch_size)
        wanted = self._unlabeled_batches()
        rows = self.unlabeled if self.per_labeled is None else wanted * self.batch_size
        draws: list[int] = []
        while len(draws) < rows:
            draws += (torch.randperm(self.unlabeled, generator=generator) + self.labeled).tolist()
        batches = labeled + _chunks(draws[:rows], self.batch_size)
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def _distributed(self) -> DistributedSampler | None:
        return self.sampler if isinstance(self.sampler, DistributedSampler) else None

    def __iter__(self) -> Iterator[list[int]]:
        ranks = self._distributed()
        if ranks is None:
            yield from self.epoch_batches(self.generator or torch.Generator().manual_seed(torch.initial_seed()))
            return
        batches = self.epoch_batches(torch.Generator().manual_seed(ranks.seed + ranks.epoch))
        padded = [batches[i % len(batches)] for i in range(len(self) * ranks.num_replicas)]
        yield from padded[ranks.rank::ranks.num_replicas]

    def __len__(self) -> int:
        batches = self._labeled_batches() + self._unlabeled_batches()
        ranks = self._distributed()
        return batches if ranks is None else math.ceil(batches / ranks.num_replicas)
