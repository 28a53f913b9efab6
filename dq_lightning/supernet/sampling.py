"""Which sub-networks a supernet step trains.

The sandwich rule (Yu & Huang 2019, used by BigNAS and DynaBERT-like width/depth training): every step trains
the largest and the smallest sub-network of the grid, which bound the others, and `random_subnets` drawn
among the rest. `uniform` draws all of them at random; `all` trains every point at every step (the most
expensive, a reference). The draw depends only on the seed and the optimizer step, so a resumed fit trains
exactly the sub-networks an uninterrupted one would have.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal, get_args

from dq_lightning.errors import UserError
from dq_lightning.supernet.grid import SubNet

Policy = Literal["sandwich", "uniform", "all"]


@dataclass(frozen=True)
class SamplingSettings:
    """How the supernet's steps choose sub-networks."""

    policy: Policy = "sandwich"
    """sandwich (the largest, the smallest and random_subnets others each step), uniform (random_subnets
    drawn at random) or all (every grid point every step)."""
    random_subnets: int = 1
    """Sub-networks drawn at random each step, besides the largest and smallest under sandwich."""
    seed: int = 0
    """Seed of the draws (with the step number: a resumed fit draws what an uninterrupted one would)."""

    def __post_init__(self) -> None:
        if self.policy not in get_args(Policy):
            raise UserError(f"model.sampling.policy={self.policy!r}: choose from {', '.join(get_args(Policy))}")
        if isinstance(self.random_subnets, bool) or not isinstance(self.random_subnets, int) or self.random_subnets < 0:
            raise UserError(f"model.sampling.random_subnets={self.random_subnets!r} must be 0 or more")
        if self.policy == "uniform" and self.random_subnets < 1:
            raise UserError("model.sampling.random_subnets=0 with policy uniform trains nothing; give 1 or more")


class Sampler:
    """The sub-networks of each step, from the grid ordered from the largest to the smallest."""

    def __init__(self, ordered: list[SubNet], settings: SamplingSettings):
        self.ordered, self.settings = list(ordered), settings

    def sample(self, step: int) -> list[SubNet]:
        """The sub-networks trained at optimizer step `step`, largest first."""
        settings, grid = self.settings, self.ordered
        if settings.policy == "all" or len(grid) <= 2:
            return list(grid)
        draw = random.Random(f"{settings.seed}:{step}")
        if settings.policy == "uniform":
            chosen = draw.sample(grid, min(settings.random_subnets, len(grid)))
        else:
            middle = grid[1:-1]
            chosen = [grid[0], grid[-1], *draw.sample(middle, min(settings.random_subnets, len(middle)))]
        return sorted(chosen, key=grid.index)

    def passes_per_step(self) -> float:
        """Sub-network forward/backward passes per optimizer step (per micro-batch)."""
        settings, size = self.settings, len(self.ordered)
        if settings.policy == "all" or size <= 2:
            return float(size)
        if settings.policy == "uniform":
            return float(min(settings.random_subnets, size))
        return float(2 + min(settings.random_subnets, size - 2))
