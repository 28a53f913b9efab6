"""The generational loop: evaluate a population (from the cache where it can), save, breed the next one.

`run_search` takes the fitness as a function of a genome, so the loop is tested with a stub and run with
`DQFitness`. The state is saved after every candidate (see `state`); search.csv follows it, and best.json and
fitness.png are rewritten when a generation is complete.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dq_lightning.search.fitness import Fitness
from dq_lightning.search.genome import Genome
from dq_lightning.search.operators import next_generation
from dq_lightning.search.outputs import plot_fitness, record, write_best, write_csv
from dq_lightning.search.population import hand_made_seeds, initial_population
from dq_lightning.search.settings import SearchSettings
from dq_lightning.search.state import STATE_FILE, SearchState, load_state, save_state

FitnessFunction = Callable[[Genome], Fitness]
OUTPUTS = ("search.csv", "best.json", "fitness.png", STATE_FILE)


def start_state(settings: SearchSettings, identity: dict[str, Any]) -> SearchState:
    generator = random.Random(settings.seed)
    state = SearchState(identity=identity, generation=0, rng=[],
                        population=initial_population(settings.space, settings.population, generator))
    state.keep(generator)
    return state


def prepare(out_dir: Path, settings: SearchSettings, identity: dict[str, Any], restart: bool) -> SearchState:
    """The state to run from: the saved one of this search, or a new one. Only checks: nothing is written
    (a refused command leaves the folder as it was)."""
    saved = None if restart else load_state(out_dir, identity)
    return saved or start_state(settings, identity)


def _evaluate(state: SearchState, settings: SearchSettings, fitness: FitnessFunction, out_dir: Path,
              seeds: dict[Genome, list[str]], say: Callable[[str], None]) -> None:
    """Every candidate of the generation under way not yet recorded, the state saved after each."""
    for slot in range(len(state.rows_of(state.generation)), len(state.population)):
        genome = state.population[slot]
        known = state.fitness_of(genome)
        scores = known if known is not None else fitness(genome)
        if known is None:
            state.remember(genome, scores)
        state.records.append(record(state.generation, slot, genome, scores, known is None, seeds.get(genome, [])))
        save_state(out_dir, state)
        write_csv(out_dir, state.records)
        say(f"generation {state.generation} (of 0..{settings.generations - 1}), candidate {slot}: "
            f"encoder {list(genome[0])} decoder {list(genome[1])} fitness {scores.value}"
            + ("" if known is None else " (cached)"))


def run_search(settings: SearchSettings, fitness: FitnessFunction, out_dir: Path, identity: dict[str, Any],
               restart: bool = False, title: str = "layer-map search",
               say: Callable[[str], None] = print) -> SearchState:
    """Run (or continue) the search in `out_dir`; returns its final state."""
    out_dir = Path(out_dir)
    state = prepare(out_dir, settings, identity, restart)
    if restart:
        for name in OUTPUTS:  # the earlier search's files would describe another search
            (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = hand_made_seeds(settings.space)
    while state.generation < settings.generations:
        _evaluate(state, settings, fitness, out_dir, seeds, say)
        write_best(out_dir, state.records, settings.as_dict(), str(identity.get("config", "")))
        plot_fitness(out_dir, state.records, title)
        if state.generation + 1 < settings.generations:
            generator = state.random()
            state.population = next_generation(
                state.population, lambda genome: state.fitness_of(genome).rank(), settings.space, generator,
                size=settings.population, elite=settings.elite, tournament_size=settings.tournament,
                crossover_rate=settings.crossover_rate, mutation_rate=settings.mutation_rate)
            state.keep(generator)
        state.generation += 1
        save_state(out_dir, state)
    return state
