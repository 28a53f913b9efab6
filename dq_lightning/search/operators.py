"""The genetic operators: tournament selection, per-stack uniform crossover with repair, mutation, elitism.

Every operator returns valid genomes of its `MapSpace` (the tests draw thousands). Randomness comes only from
the `random.Random` passed in, which the search saves with its state, so a resumed search breeds exactly what
an uninterrupted one would.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from dq_lightning.search.genome import Genome, Map, MapSpace

RankKey = Callable[[Genome], tuple]  # higher is better


def tournament(population: Sequence[Genome], rank: RankKey, size: int, rng: random.Random) -> Genome:
    """The best of `size` genomes drawn with replacement from `population`."""
    contenders = [population[rng.randrange(len(population))] for _ in range(size)]
    return max(contenders, key=rank)


def crossover(first: Genome, second: Genome, space: MapSpace, rng: random.Random) -> Genome:
    """Per stack, each student layer takes its teacher layer from either parent (uniform crossover); a child
    map that repeats a layer, or is out of order when order matters, is repaired."""
    child = []
    for stack in (0, 1):
        mixed = [a if rng.random() < 0.5 else b for a, b in zip(first[stack], second[stack])]
        child.append(space.repair(stack, mixed, rng))
    return child[0], child[1]


def _moved(indices: Map, teacher_layers: int, allow_unsorted: bool, rng: random.Random) -> Map | None:
    """`indices` with one entry moved to a free teacher layer: half the time a free neighbour (a small step),
    otherwise any free layer. With every layer taken and order free, two entries swap. None: no move exists."""
    free = [i for i in range(teacher_layers) if i not in indices]
    position = rng.randrange(len(indices))
    if not free:
        if not allow_unsorted or len(indices) < 2:
            return None
        other = rng.choice([p for p in range(len(indices)) if p != position])
        swapped = list(indices)
        swapped[position], swapped[other] = swapped[other], swapped[position]
        return tuple(swapped)
    neighbours = [i for i in (indices[position] - 1, indices[position] + 1) if i in free]
    moved = list(indices)
    moved[position] = rng.choice(neighbours) if neighbours and rng.random() < 0.5 else rng.choice(free)
    return tuple(moved if allow_unsorted else sorted(moved))


def mutate(genome: Genome, space: MapSpace, rng: random.Random) -> Genome:
    """One move in one stack chosen at random among those where a move exists; a genome with no possible
    move (every layer of both stacks copied, in order) comes back unchanged."""
    stacks = [0, 1]
    rng.shuffle(stacks)
    for stack in stacks:
        moved = _moved(genome[stack], space.teacher_layers[stack], space.allow_unsorted, rng)
        if moved is not None:
            return (moved, genome[1]) if stack == 0 else (genome[0], moved)
    return genome


def elites(population: Sequence[Genome], rank: RankKey, count: int) -> list[Genome]:
    """The `count` best distinct genomes, best first (ties keep population order)."""
    return sorted(dict.fromkeys(population), key=rank, reverse=True)[:count]


def next_generation(population: Sequence[Genome], rank: RankKey, space: MapSpace, rng: random.Random, *,
                    size: int, elite: int, tournament_size: int, crossover_rate: float,
                    mutation_rate: float) -> list[Genome]:
    """The elites unchanged, then children: two tournament winners crossed over with probability
    `crossover_rate` (else the first winner is copied), the child mutated once with probability
    `mutation_rate`. Children may repeat a genome already evaluated; the fitness cache makes that free."""
    children = elites(population, rank, elite)
    while len(children) < size:
        child = tournament(population, rank, tournament_size, rng)
        if rng.random() < crossover_rate:
            child = crossover(child, tournament(population, rank, tournament_size, rng), space, rng)
        if rng.random() < mutation_rate:
            child = mutate(child, space, rng)
        children.append(child)
    return children
