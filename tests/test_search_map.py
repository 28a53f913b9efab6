"""`search-map`: the genetic layer-map search (dq_lightning.search).

The operators, settings and the resumable loop are tested with a stub fitness (a plain function of the
genome, counting its calls); the real fitness (a short DQ fit) runs on the micro teacher of conftest.py.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from pathlib import Path

import pytest
import torch

from dq_lightning.distill.layer_map import layer_map
from dq_lightning.errors import UserError
from dq_lightning.search.fitness import Fitness
from dq_lightning.search.genome import MapSpace
from dq_lightning.search.operators import crossover, elites, mutate, next_generation, tournament
from dq_lightning.search.population import hand_made_seeds, initial_population
from dq_lightning.search.search import run_search
from dq_lightning.search.settings import SearchSettings
from dq_lightning.search.state import STATE_FILE
from tests.conftest import run_cli

SPACES = [MapSpace((6, 6), (6, 3)), MapSpace((6, 6), (3, 1)), MapSpace((4, 4), (4, 4)),
          MapSpace((6, 6), (6, 3), allow_unsorted=True), MapSpace((12, 6), (5, 6), allow_unsorted=True),
          MapSpace((3, 5), (1, 2), allow_unsorted=True)]


def _rank(genome) -> tuple:
    return (-sum(genome[0]) - 2 * sum(genome[1]),)


@pytest.mark.parametrize("space", SPACES, ids=str)
def test_operators_keep_maps_valid_over_many_draws(space):
    rng = random.Random(0)
    population = [space.random_genome(rng) for _ in range(8)]
    for _ in range(500):
        first, second = rng.sample(population, 2)
        assert space.is_valid(crossover(first, second, space, rng))
        assert space.is_valid(mutate(first, space, rng))
        assert space.is_valid(tournament(population, _rank, 3, rng))
        garbage = [rng.randrange(-2, 14) for _ in range(space.student_layers[0] + 2)]
        assert space.is_valid_map(0, space.repair(0, garbage, rng))
    bred = next_generation(population, _rank, space, rng, size=9, elite=2, tournament_size=3, crossover_rate=0.9,
                           mutation_rate=0.5)
    assert len(bred) == 9 and all(space.is_valid(genome) for genome in bred)
    best = elites(population, _rank, 2)
    assert bred[:len(best)] == best and len(best) == min(2, len(set(population)))


def test_validity_checks_what_a_map_may_be():
    space = MapSpace((6, 6), (3, 2))
    assert space.is_valid(((0, 2, 5), (1, 4)))
    for bad in [((0, 2), (1, 4)), ((0, 2, 6), (1, 4)), ((2, 0, 5), (1, 4)), ((0, 0, 5), (1, 4))]:
        assert not space.is_valid(bad), bad
    assert MapSpace((6, 6), (3, 2), allow_unsorted=True).is_valid(((2, 0, 5), (4, 1)))
    assert not MapSpace((6, 6), (3, 2), allow_unsorted=True).is_valid(((0, 0, 5), (1, 4)))


def test_mutation_moves_one_index_when_a_move_exists():
    space, rng = MapSpace((6, 6), (6, 3)), random.Random(1)
    genome = ((0, 1, 2, 3, 4, 5), (0, 2, 5))
    for _ in range(200):
        mutated = mutate(genome, space, rng)
        assert mutated[0] == genome[0]  # every encoder layer is copied: only the decoder can move
        assert len(set(mutated[1]) - set(genome[1])) == 1
    full = ((0, 1, 2, 3), (0, 1, 2, 3))
    assert mutate(full, MapSpace((4, 4), (4, 4)), rng) == full
    swapped = mutate(full, MapSpace((4, 4), (4, 4), allow_unsorted=True), rng)
    assert swapped != full and all(sorted(m) == [0, 1, 2, 3] for m in swapped)


def test_first_generation_is_the_hand_made_maps_then_distinct_random_ones():
    space = MapSpace((6, 6), (6, 3))
    seeds = hand_made_seeds(space)
    encoder = (0, 1, 2, 3, 4, 5)
    assert seeds == {(encoder, (0, 2, 5)): ["dq-bart", "max_spacing"], (encoder, (1, 3, 5)): ["uniform"],
                     (encoder, (0, 1, 2)): ["first"], (encoder, (3, 4, 5)): ["last"]}
    population = initial_population(space, 10, random.Random(0))
    assert population[:4] == list(seeds)
    assert len(set(population)) == 10 and all(space.is_valid(genome) for genome in population)
    # A space smaller than the population: repeats, but never an invalid genome and never an endless draw.
    tiny = MapSpace((2, 2), (1, 1))
    assert len(initial_population(tiny, 7, random.Random(0))) == 7


def test_layer_map_takes_unsorted_maps_only_when_asked():
    with pytest.raises(UserError, match="strictly increasing"):
        layer_map(6, 3, [5, 0, 2])
    assert layer_map(6, 3, [5, 0, 2], allow_unsorted=True) == [5, 0, 2]
    with pytest.raises(UserError, match="repeats a layer"):
        layer_map(6, 3, [5, 0, 5], allow_unsorted=True)


def test_a_student_takes_an_unsorted_map_only_when_asked(teacher_dir):
    from dq_lightning.modules.student import DQStudentModule

    with pytest.raises(UserError, match="model.shape.decoder_layer_map=.*strictly increasing"):
        DQStudentModule(teacher=str(teacher_dir), depth="4-2", shape={"decoder_layer_map": [3, 0]})
    student = DQStudentModule(teacher=str(teacher_dir), depth="4-2",
                              shape={"decoder_layer_map": [3, 0], "unsorted_layer_maps": True})
    assert student.decoder_map == [3, 0]
    teacher_layers = student.teacher.get_decoder().layers
    assert torch.equal(student.model.get_decoder().layers[0].fc1.weight, teacher_layers[3].fc1.weight)


SETTINGS = dict(depth="6-3", bits="2-2-8", teacher_layers=(6, 6))


@pytest.mark.parametrize("changes, flag", [
    (dict(population=1), "--population 1"), (dict(depth="8-3"), "--depth 8-3"), (dict(depth="6-7"), "--depth 6-7"),
    (dict(depth="six"), "--depth 'six'"), (dict(bits="5-2-8"), "--bits 5-2-8"), (dict(bits="2-2"), "--bits 2-2"),
    (dict(elite=10), "--elite 10"), (dict(steps=0), "--steps 0"), (dict(crossover_rate=1.5), "--crossover-rate"),
    (dict(mutation_rate=-0.1), "--mutation-rate"), (dict(tournament=0), "--tournament 0"), (dict(seed=-1), "--seed")])
def test_settings_refuse_bad_values_in_one_line_naming_the_flag(changes, flag):
    with pytest.raises(UserError) as error:
        SearchSettings(**{**SETTINGS, **changes})
    assert str(error.value).startswith(flag) and "\n" not in str(error.value)


def test_default_budget_fits_the_docstring():
    settings = SearchSettings(**SETTINGS)
    assert settings.space.size() == 20 and settings.max_candidates == 20
    unsorted = SearchSettings(**SETTINGS, allow_unsorted=True)
    assert unsorted.max_candidates == 10 + 4 * 8 == 42


class Killed(Exception):
    """What the stub raises to stand for a search killed mid-generation."""


class StubFitness:
    """Fitness as a plain function of the genome (prefers low decoder layers); counts calls; can be told to
    fail after `fail_after` calls, as a search killed mid-generation."""

    def __init__(self, fail_after: int | None = None):
        self.calls: list = []
        self.fail_after = fail_after

    def __call__(self, genome) -> Fitness:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise Killed(f"killed after {self.fail_after} candidates")
        self.calls.append(genome)
        loyalty = 1 - (sum(genome[1]) + 0.1 * sum(genome[0])) / 100
        return Fitness(loyalty, loyalty, 1 - loyalty, 2 - loyalty, 0.01)


def small_settings(**changes) -> SearchSettings:
    return SearchSettings(**{**dict(depth="3-2", bits="2-2-8", teacher_layers=(5, 6), population=5,
                                    generations=4, elite=1, seed=3), **changes})


def search(out: Path, fitness, settings=None, restart=False):
    settings = settings or small_settings()
    return run_search(settings, fitness, out, {**settings.as_dict(), "config": "c.yaml"}, restart=restart,
                      say=lambda text: None)


def rows(out: Path) -> list[dict]:
    with open(out / "search.csv", newline="") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def test_a_genome_is_trained_once_however_often_it_comes_back(tmp_path):
    fitness = StubFitness()
    state = search(tmp_path, fitness)
    assert len(fitness.calls) == len(set(fitness.calls)) == len(state.cache)
    found = rows(tmp_path)
    assert len(found) == 5 * 4
    assert sum(row["trained"] == "True" for row in found) == len(fitness.calls)
    assert any(row["trained"] == "False" for row in found)  # elites (at least) came from the cache
    # A space smaller than the population: it is trained at most once per genome.
    small = StubFitness()
    search(tmp_path / "small", small, small_settings(depth="1-1", teacher_layers=(2, 2), population=6))
    assert len(small.calls) == len(set(small.calls)) <= 4


def test_search_is_deterministic_and_elitism_keeps_the_best(tmp_path):
    search(tmp_path / "a", StubFitness())
    search(tmp_path / "b", StubFitness())
    assert rows(tmp_path / "a") == rows(tmp_path / "b")
    best = [max(float(row["fitness"]) for row in rows(tmp_path / "a") if row["generation"] == str(g))
            for g in range(4)]
    assert best == sorted(best)
    other = StubFitness()
    search(tmp_path / "c", other, small_settings(seed=4))
    assert rows(tmp_path / "c") != rows(tmp_path / "a")  # the seed matters: the comparison above can fail


@pytest.mark.parametrize("killed_after", [1, 4, 5, 8])
def test_a_killed_search_continues_where_it_stopped_and_trains_nothing_twice(tmp_path, killed_after):
    uninterrupted = StubFitness()
    search(tmp_path / "whole", uninterrupted)
    first = StubFitness(fail_after=killed_after)
    with pytest.raises(Killed):
        search(tmp_path / "resumed", first)
    assert json.loads((tmp_path / "resumed" / STATE_FILE).read_text())["cache"]
    second = StubFitness()
    search(tmp_path / "resumed", second)
    assert not set(first.calls) & set(second.calls)
    assert first.calls + second.calls == uninterrupted.calls
    assert rows(tmp_path / "resumed") == rows(tmp_path / "whole")
    again = StubFitness()
    search(tmp_path / "resumed", again)  # a finished search run again trains nothing
    assert again.calls == []


def digest(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_state_of_other_settings_is_refused_until_restart(tmp_path):
    search(tmp_path, StubFitness())
    before = digest(tmp_path)
    with pytest.raises(UserError, match=r"population 5 -> 6.*--restart") as error:
        search(tmp_path, StubFitness(), small_settings(population=6))
    assert "\n" not in str(error.value)
    assert digest(tmp_path) == before
    restarted = StubFitness()
    search(tmp_path, restarted, small_settings(population=6), restart=True)
    assert restarted.calls and len(rows(tmp_path)) == 6 * 4


def test_best_json_holds_the_flags_of_the_best_map(tmp_path):
    search(tmp_path, StubFitness())
    best = json.loads((tmp_path / "best.json").read_text())
    found = rows(tmp_path)
    top = max(found, key=lambda row: float(row["fitness"]))
    assert best["fitness"] == pytest.approx(float(top["fitness"]))
    assert best["fit_flags"] == (f"--model.shape.encoder_layer_map={top['encoder_map'].replace(' ', '')} "
                                 f"--model.shape.decoder_layer_map={top['decoder_map'].replace(' ', '')}")
    assert best["best_hand_made"]["hand_made"]
    assert (tmp_path / "fitness.png").stat().st_size > 1000


# -- the real fitness and the command line, on the micro teacher ------------------------------------------------
def micro_config(tmp_path: Path, teacher_dir: Path, cache_dir: Path) -> Path:
    text = f"""
model:
  class_path: dq_lightning.modules.student.DQStudentModule
  init_args: {{teacher: {teacher_dir}, lr: 1.0e-3, generation: {{num_beams: 1, max_length: 6, min_length: 1}}}}
data:
  class_path: dq_lightning.data.datamodule.XSumDataModule
  init_args:
    tokenizer: "${{...model.init_args.teacher}}"
    max_source_length: 64
    max_target_length: 16
    max_train_samples: 16
    max_eval_samples: 8
    batch_size: 4
    cache_dir: {cache_dir}
trainer:
  accelerator: cpu
"""
    path = tmp_path / "micro.yaml"
    path.write_text(text)
    return path


@pytest.mark.slow
def test_real_micro_search_is_deterministic(tmp_path, teacher_dir, shared_data, cache_dir, monkeypatch):
    from dq_lightning.distill.student import each_teacher_loaded_once
    from dq_lightning.search.fitness import DQFitness
    from dq_lightning.search.run_config import read_run_config

    monkeypatch.setenv("WANDB_MODE", "disabled")
    run = read_run_config(str(micro_config(tmp_path, teacher_dir, cache_dir)), str(shared_data / "xsum"))
    settings = SearchSettings(depth="2-1", bits="2-2-8", teacher_layers=(4, 4), population=3, generations=2,
                              steps=2, elite=1)
    fitnesses = []
    with each_teacher_loaded_once():
        for name in ("a", "b"):
            out = tmp_path / name
            run_search(settings, DQFitness(run, settings, out, "test"), out, settings.as_dict(), say=lambda t: None)
            fitnesses.append([(row["encoder_map"], row["decoder_map"], row["fitness"], row["task_loss"])
                              for row in rows(out)])
    assert fitnesses[0] == fitnesses[1]
    assert all(0 < float(fitness) <= 1 for _, _, fitness, _ in fitnesses[0])


def micro_command(config: Path, data: Path, out: Path) -> list[str]:
    return ["search-map", "--config", str(config), "--depth", "2-1", "--bits", "2-2-8", "--data-dir", str(data),
            "--population", "2", "--generations", "2", "--elite", "1", "--steps", "2", "--out", str(out)]


@pytest.mark.slow
def test_command_line_end_to_end(tmp_path, teacher_dir, shared_data, cache_dir):
    out = tmp_path / "search"
    result = run_cli(*micro_command(micro_config(tmp_path, teacher_dir, cache_dir), shared_data / "xsum", out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert {"search.csv", "best.json", "fitness.png", STATE_FILE} <= {path.name for path in out.iterdir()}
    best = json.loads((out / "best.json").read_text())
    assert best["fit_flags"] in result.stdout
    assert len(rows(out)) == 4
    trained = sum(row["trained"] == "True" for row in rows(out))
    assert len(list((out / "wandb").glob("offline-run-*"))) == trained  # one W&B run per trained candidate


def test_command_line_refuses_bad_input_in_one_line_and_leaves_the_folder_as_it_was(tmp_path, teacher_dir,
                                                                                    shared_data, cache_dir):
    out = tmp_path / "search"
    search(out, StubFitness())  # a folder holding another search (its identity is not this command's)
    (out / "notes.txt").write_text("mine")
    before = digest(out)
    command = micro_command(micro_config(tmp_path, teacher_dir, cache_dir), shared_data / "xsum", out)
    for flag, value, culprit in ((None, None, "--restart"), ("--depth", "2-9", "--depth 2-9"),
                                 ("--bits", "2-2-7", "--bits 2-2-7"), ("--population", "1", "--population 1"),
                                 ("--data-dir", str(tmp_path / "none"), "--data-dir")):
        changed = list(command)
        if flag:
            changed[changed.index(flag) + 1] = value
        refused = run_cli(*changed)
        lines = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
        assert refused.returncode == 2 and len(lines) == 1 and culprit in lines[0], refused.stderr[-2000:]
        assert digest(out) == before


def test_preflight_checks_the_flags_without_a_teacher(tmp_path):
    """make search-map runs --preflight before it would train a missing teacher: a typo costs no training."""
    common = ["search-map", "--config", "experiments/xsum/dq-tiny.yaml", "--out", str(tmp_path / "out"),
              "--preflight"]
    checked = run_cli(*common, "--depth", "6-3", "--bits", "2-2-8")
    assert checked.returncode == 0 and "flags checked" in checked.stdout, checked.stderr[-2000:]
    for flags, culprit in ((["--depth", "6x3", "--bits", "2-2-8"], "--depth '6x3'"),
                           (["--depth", "6-3", "--bits", "2-2"], "--bits 2-2"),
                           (["--depth", "6-3", "--bits", "2-2-8", "--population", "1"], "--population 1")):
        refused = run_cli(*common, *flags)
        lines = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
        assert refused.returncode == 2 and len(lines) == 1 and culprit in lines[0], refused.stderr[-2000:]
    assert not (tmp_path / "out").exists()
