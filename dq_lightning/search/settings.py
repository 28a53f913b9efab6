"""The settings of a layer-map search, validated when built; each error is one line naming the flag.

Default budget (a 6-3 student of the tiny xsum teacher at 2-2-8, on 2 CPU cores, within ~60 minutes):

- a candidate costs `steps` optimizer steps of 16 sequences (256 source / 64 target tokens; the student's
  forward and backward plus the teacher's forward), one teacher-forced pass over the 100 validation rows, and
  its set-up (student copy, quantizers, an offline W&B run). Measured on a busy 2-core machine with one
  thread: 1.4 s a step, 5.5 s the validation, ~3 s the set-up. Counting 1 s a step on an idle machine (one
  thread's speed; two threads do better), 60 steps + 6 s + 4 s ~ 70 s a candidate;
- at most `population + (generations - 1) x (population - elite)` = 10 + 4 x 8 = 42 candidates are trained
  (elites, and every genome met again, come from the cache): 42 x 70 s ~ 49 min, with ten minutes to spare;
- a 6-3 student of a 6+6 teacher has only C(6,6) x C(6,3) = 20 sorted maps, so there the cache stops the
  cost at 20 candidates (~23 min; the search is then close to exhaustive); with `allow_unsorted` (6! x
  6!/3! = 86,400 genomes) the 42-candidate bound is what holds.

60 steps are 960 sequences, 1.2 epochs of the 800 xsum training rows, a quarter of the full DQ fit (4 epochs):
enough for the student to recover from the jump to 2 bits, so that maps are compared after training, not at
their copy. A machine whose cores are shared with other jobs runs much slower with two threads than with one
(OpenMP threads waiting for each other): there, set OMP_NUM_THREADS=1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from dq_lightning.errors import UserError
from dq_lightning.search.genome import STACKS, MapSpace

FLAGS = {"population": "--population", "generations": "--generations", "steps": "--steps",
         "tournament": "--tournament", "crossover_rate": "--crossover-rate", "mutation_rate": "--mutation-rate",
         "elite": "--elite", "seed": "--seed"}


def _whole(name: str, value: Any, low: int, high: int | None = None, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f"at least {low}"
        raise UserError(f"{FLAGS[name]} {value!r}: must be a whole number, {bound}{why}")


def _rate(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise UserError(f"{FLAGS[name]} {value!r}: must be a probability between 0 and 1")


@dataclass(frozen=True)
class SearchSettings:
    """What is searched (depth, bits, the teacher's layers) and how (the genetic algorithm's settings)."""

    depth: str
    """Student "encoder-decoder" layers, e.g. "6-3"."""

    bits: str
    """Student W-E-A bits, e.g. "2-2-8"."""

    teacher_layers: tuple[int, int]
    """The teacher's encoder and decoder layers (read from the teacher)."""

    population: int = 10
    """Genomes per generation (at least 2)."""

    generations: int = 5
    """Generations, the first included."""

    steps: int = 60
    """Optimizer steps of each candidate's short DQ fit."""

    tournament: int = 3
    """Genomes drawn (with replacement) per tournament; the best becomes a parent."""

    crossover_rate: float = 0.9
    """Probability that a child crosses two parents (else it copies one)."""

    mutation_rate: float = 0.3
    """Probability that a child has one layer index moved."""

    elite: int = 2
    """Best genomes carried unchanged into the next generation."""

    seed: int = 0
    """Seeds the search's own draws and every candidate's fit (the same for all candidates)."""

    allow_unsorted: bool = False
    """Maps may list distinct teacher layers in any order (default: strictly increasing)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "teacher_layers", tuple(self.teacher_layers))
        self._check_student()
        _whole("population", self.population, 2, why=" (a genetic search needs two genomes to breed)")
        _whole("generations", self.generations, 1)
        _whole("steps", self.steps, 1)
        _whole("tournament", self.tournament, 1)  # drawn with replacement: any size is a tournament
        _whole("elite", self.elite, 0, self.population - 1, why=" (fewer than --population, or nothing breeds)")
        _whole("seed", self.seed, 0, 2**32 - 1)
        _rate("crossover_rate", self.crossover_rate)
        _rate("mutation_rate", self.mutation_rate)

    def _check_student(self) -> None:
        # The student's own parsers, imported here: their package imports torch, the rest of the search's logic
        # does not.
        from dq_lightning.quant.config import parse_depth, parse_wea

        try:
            student = parse_depth(self.depth)
        except UserError:
            raise UserError(f"--depth {self.depth!r}: not 'encoder-decoder' layers like '6-3'") from None
        for stack, layers, teacher in zip(STACKS, student, self.teacher_layers):
            if not 1 <= layers <= teacher:
                raise UserError(f"--depth {self.depth}: a student {stack} of {layers} layers cannot be copied from "
                                f"the teacher's {teacher} {stack} layers (1..{teacher})")
        object.__setattr__(self, "_student_layers", student)
        try:
            parse_wea(self.bits)
        except UserError as error:
            raise UserError(f"--bits {self.bits}: {error}") from None

    @property
    def space(self) -> MapSpace:
        return MapSpace(self.teacher_layers, self._student_layers, self.allow_unsorted)

    @property
    def max_candidates(self) -> int:
        """Candidates trained at most: the first generation, then the children of each later one, and never
        more than the genomes there are."""
        bound = self.population + (self.generations - 1) * (self.population - self.elite)
        return min(bound, self.space.size())

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "teacher_layers": list(self.teacher_layers)}
