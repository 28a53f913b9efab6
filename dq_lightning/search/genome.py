"""The genome of the layer-map search: which teacher layer each student layer copies, per stack.

A genome is the pair (encoder map, decoder map), each a tuple of teacher layer indices, one per student layer.
By default a map is strictly increasing, as `dq_lightning.distill.layer_map` requires of explicit maps. With
`allow_unsorted` any order is valid, but never a repeat: `copy_student` would put one teacher module twice in
the student (two layers sharing one set of weights) and both would be distilled against the same teacher
layer; the student takes such maps with `unsorted_layer_maps` (`layer_map`'s `allow_unsorted`).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass

Map = tuple[int, ...]
Genome = tuple[Map, Map]  # (encoder map, decoder map)
STACKS = ("encoder", "decoder")


def genome_key(genome: Genome) -> str:
    """A genome as text, the key of the fitness cache in the JSON state: `[0, 1, 2]|[0, 2, 5]`."""
    return "|".join(json.dumps(list(indices)) for indices in genome)


def genome_of_key(key: str) -> Genome:
    encoder, decoder = (tuple(int(i) for i in json.loads(part)) for part in key.split("|"))
    return encoder, decoder


@dataclass(frozen=True)
class MapSpace:
    """The valid genomes of one search: per stack (encoder, decoder), the teacher's layers and the student's."""

    teacher_layers: tuple[int, int]
    """Layers of the teacher's encoder and decoder."""

    student_layers: tuple[int, int]
    """Layers of the student's encoder and decoder (each at most the teacher's)."""

    allow_unsorted: bool = False
    """Maps may list their distinct teacher layers in any order (default: strictly increasing)."""

    def is_valid_map(self, stack: int, indices: Map) -> bool:
        teacher, student = self.teacher_layers[stack], self.student_layers[stack]
        if len(indices) != student or len(set(indices)) != student:
            return False
        if not all(isinstance(i, int) and 0 <= i < teacher for i in indices):
            return False
        return self.allow_unsorted or list(indices) == sorted(indices)

    def is_valid(self, genome: Genome) -> bool:
        return len(genome) == 2 and all(self.is_valid_map(stack, tuple(genome[stack])) for stack in (0, 1))

    def size(self) -> int:
        """How many distinct genomes there are (a 6-3 student of a 6+6 teacher: 1 x 20 sorted)."""
        count = math.perm if self.allow_unsorted else math.comb
        return math.prod(count(t, s) for t, s in zip(self.teacher_layers, self.student_layers))

    def _ordered(self, indices: list[int]) -> Map:
        return tuple(indices if self.allow_unsorted else sorted(indices))

    def random_map(self, stack: int, rng: random.Random) -> Map:
        return self._ordered(rng.sample(range(self.teacher_layers[stack]), self.student_layers[stack]))

    def random_genome(self, rng: random.Random) -> Genome:
        return self.random_map(0, rng), self.random_map(1, rng)

    def repair(self, stack: int, indices: list[int], rng: random.Random) -> Map:
        """A valid map from `indices` (e.g. a crossover child): repeats dropped (the first kept), the gaps filled
        with random free teacher layers, then sorted unless order is free."""
        kept = list(dict.fromkeys(i for i in indices if 0 <= i < self.teacher_layers[stack]))
        kept = kept[:self.student_layers[stack]]
        free = [i for i in range(self.teacher_layers[stack]) if i not in kept]
        kept += rng.sample(free, self.student_layers[stack] - len(kept))
        return self._ordered(kept)
