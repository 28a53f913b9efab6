"""The search's state on disk, saved atomically after every candidate so a killed search continues.

`search_state.json` holds what the search was started with (`identity`: its settings, config and data), the
generation under way and its population, every row of search.csv so far, the fitness of every genome ever
trained (the cache: a genome is never trained twice, not across generations, not across a restart) and the
state of the search's random generator. A population is drawn and saved before its first candidate is
trained, and the generator is saved with it, so a resumed search breeds exactly what an uninterrupted one
would have.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dq_lightning.errors import UserError
from dq_lightning.files import write_json_atomic
from dq_lightning.search.fitness import Fitness
from dq_lightning.search.genome import Genome, genome_key, genome_of_key

STATE_FILE = "search_state.json"
RESTART_FLAG = "--restart"


@dataclass
class SearchState:
    identity: dict[str, Any]
    generation: int
    population: list[Genome]
    rng: list
    cache: dict[str, dict[str, Any]] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)

    def fitness_of(self, genome: Genome) -> Fitness | None:
        found = self.cache.get(genome_key(genome))
        return None if found is None else Fitness.from_dict(found)

    def remember(self, genome: Genome, fitness: Fitness) -> None:
        self.cache[genome_key(genome)] = fitness.as_dict()

    def random(self) -> random.Random:
        """The search's generator, at its saved state (`keep` saves it back)."""
        generator = random.Random()
        version, internal, gauss = self.rng
        generator.setstate((version, tuple(internal), gauss))
        return generator

    def keep(self, generator: random.Random) -> None:
        version, internal, gauss = generator.getstate()
        self.rng = [version, list(internal), gauss]

    def rows_of(self, generation: int) -> list[dict[str, Any]]:
        return [row for row in self.records if row["generation"] == generation]


def save_state(out_dir: Path, state: SearchState) -> None:
    data = asdict(state)
    data["population"] = [genome_key(genome) for genome in state.population]
    write_json_atomic(Path(out_dir) / STATE_FILE, data)


def _differences(saved: dict[str, Any], identity: dict[str, Any]) -> str:
    changed = [f"{name} {saved.get(name)!r} -> {identity.get(name)!r}"
               for name in sorted(set(saved) | set(identity)) if saved.get(name) != identity.get(name)]
    return ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")


def load_state(out_dir: Path, identity: dict[str, Any]) -> SearchState | None:
    """The saved state of the search `identity` describes, or None when there is none. A state of another
    search (other settings, config or data) is refused: continuing it would mix two searches' candidates."""
    path = Path(out_dir) / STATE_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        data["population"] = [genome_of_key(key) for key in data["population"]]
        state = SearchState(**data)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise UserError(f"{path}: not a readable search state ({error}); add {RESTART_FLAG} to start over") from None
    identity = json.loads(json.dumps(identity))  # tuples as lists, as the saved copy has them
    if state.identity != identity:
        changed = _differences(state.identity, identity)
        raise UserError(f"{path} belongs to a search with other settings ({changed}): run the same command to "
                        f"continue it, or add {RESTART_FLAG} to start over")
    return state
