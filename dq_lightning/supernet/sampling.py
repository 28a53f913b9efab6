"""Which sub-networks a supernet step trains.

The sandwich rule (Yu & Huang 2019, used by BigNAS and DynaBERT-like width/depth training): every step trains
the largest and the smallest sub-network of the grid, which bound the others, and `random_subnets` drawn
among the rest. A grid over several axes (bits, depth, width) may have no single smallest point: the smallest by
size is then one corner (on the xsum grid the narrowest width, at full depth), and the shallow points are only
drawn at random. `sandwich_minimal` trains every minimal point instead (one that no other point is at or below
on every axis: W, E and A bits, encoder and decoder depth, each width): the sandwich's lower bound on each axis.
`uniform` draws all of them at random; `all` trains every point at every step (the most expensive, a
reference). The draw depends only on the seed and the optimizer step, so a resumed fit trains
exactly the sub-networks an uninterrupted one would have.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Literal, get_args

from dq_lightning.errors import UserError
from dq_lightning.supernet.grid import SubNet

Policy = Literal["sandwich", "sandwich_minimal", "uniform", "all"]


@dataclass(frozen=True)
class SamplingSettings:
    """How the supernet's steps choose sub-networks."""

    policy: Policy = "sandwich"
    """sandwich (the largest, the smallest and random_subnets others each step), sandwich_minimal (the largest,
    every minimal point: none other is at or below it on every axis, and random_subnets others), uniform
    (random_subnets drawn at random) or all (every grid point every step)."""
    random_subnets: int = 1
    """Sub-networks drawn at random each step, besides the largest and smallest (sandwich) or minimal points
    (sandwich_minimal)."""
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
    """The sub-networks of each step, from the grid ordered from the largest to the smallest. `axes` gives each
    point's size on every axis (larger is bigger), which `sandwich_minimal` needs to find the minimal points."""

    def __init__(self, ordered: list[SubNet], settings: SamplingSettings,
                 axes: Callable[[SubNet], tuple[int, ...]] | None = None):
        self.ordered, self.settings = list(ordered), settings
        self.smallest = [self.ordered[-1]]
        if settings.policy == "sandwich_minimal":
            if axes is None:
                raise ValueError("sandwich_minimal needs each point's axes")
            self.smallest = minimal_points(self.ordered[1:], axes) or self.ordered[-1:]

    def sample(self, step: int) -> list[SubNet]:
        """The sub-networks trained at optimizer step `step`, largest first."""
        settings, grid = self.settings, self.ordered
        if settings.policy == "all" or len(grid) <= 2:
            return list(grid)
        draw = random.Random(f"{settings.seed}:{step}")
        if settings.policy == "uniform":
            chosen = draw.sample(grid, min(settings.random_subnets, len(grid)))
        else:
            middle = [subnet for subnet in grid[1:] if subnet not in self.smallest]
            chosen = [grid[0], *self.smallest, *draw.sample(middle, min(settings.random_subnets, len(middle)))]
        return sorted(chosen, key=grid.index)

    def passes_per_step(self) -> float:
        """Sub-network forward/backward passes per optimizer step (per micro-batch)."""
        settings, size = self.settings, len(self.ordered)
        if settings.policy == "all" or size <= 2:
            return float(size)
        if settings.policy == "uniform":
            return float(min(settings.random_subnets, size))
        fixed = 1 + len(self.smallest)
        return float(fixed + min(settings.random_subnets, size - fixed))


def minimal_points(subnets: list[SubNet], axes: Callable[[SubNet], tuple[int, ...]]) -> list[SubNet]:
    """The points no other point is at or below on every axis, in the order given."""
    sizes = {subnet: axes(subnet) for subnet in subnets}

    def below(other: SubNet, subnet: SubNet) -> bool:
        # Two points of equal axes (a width that names the teacher's own) count once: the first given.
        if other == subnet or not all(a <= b for a, b in zip(sizes[other], sizes[subnet], strict=True)):
            return False
        return sizes[other] != sizes[subnet] or subnets.index(other) < subnets.index(subnet)

    return [subnet for subnet in subnets if not any(below(other, subnet) for other in subnets)]
