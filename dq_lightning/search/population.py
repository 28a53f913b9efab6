"""The first generation: the hand-made maps as seeds, then random valid genomes.

The hand-made strategies of `dq_lightning.distill.layer_map` (dq-bart, max_spacing, uniform, first, last)
apply one strategy to both stacks, as `DQStudentModule(layer_map=...)` does; strategies that give the same
genome (dq-bart and max_spacing often do) are one seed, remembered under every name that gives it.
"""

from __future__ import annotations

import random

from dq_lightning.distill.layer_map import SAME_RULE_STRATEGIES, layer_map
from dq_lightning.search.genome import Genome, MapSpace

# Random draws tried per missing genome before a repeat is accepted (a space smaller than the population).
_DRAWS_PER_GENOME = 50


def hand_made_seeds(space: MapSpace) -> dict[Genome, list[str]]:
    """Each distinct hand-made genome and the strategies that give it, in `SAME_RULE_STRATEGIES` order."""
    seeds: dict[Genome, list[str]] = {}
    for strategy in SAME_RULE_STRATEGIES:
        genome = tuple(tuple(layer_map(teacher, student, strategy))
                       for teacher, student in zip(space.teacher_layers, space.student_layers))
        seeds.setdefault(genome, []).append(strategy)  # type: ignore[arg-type]
    return seeds


def initial_population(space: MapSpace, size: int, rng: random.Random) -> list[Genome]:
    """`size` genomes: the hand-made seeds first (as many as fit), then random ones, distinct while the space
    has genomes left."""
    population = list(hand_made_seeds(space))[:size]
    draws = 0
    while len(population) < size:
        genome = space.random_genome(rng)
        draws += 1
        if genome not in population or draws > _DRAWS_PER_GENOME * size:
            population.append(genome)
    return population
