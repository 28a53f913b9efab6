"""Per-example test results, bootstrap intervals, seeds and the "does distillation pay off" report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from dq_lightning.errors import UserError
from dq_lightning.evaluation.bootstrap import check_resamples, interval, paired_difference
from dq_lightning.evaluation.per_example import (FILE_NAME, corpus_bleu, corpus_score, read_predictions, score_rows,
                                                 write_predictions)
from dq_lightning.files import write_json_atomic
from dq_lightning.sweep.front import label_of, plot_points
from dq_lightning.sweep.plot import plot_tradeoff
from dq_lightning.sweep.runner import report
from dq_lightning.sweep.spec import expand_grid, load_sweep

PAIRS = [("the cat sat on the mat today", "the cat sat on the mat"),
         ("a quick brown fox jumps", "the quick brown fox jumped over the dog"),
         ("rain is expected in the north of the country", "heavy rain expected across the north"),
         ("markets fell sharply", "stock markets fell on monday"),
         ("the minister resigned after the vote", "the minister resigned on tuesday after losing the vote")]


def rows_with(scores, metric="rougeL", references=None):
    return [{"index": i, "reference": (references or {}).get(i, f"ref {i}"), "prediction": "p", metric: float(s)}
            for i, s in enumerate(scores)]


def test_per_example_rouge_averages_to_the_corpus_score():
    from dq_lightning.metrics import OfflineROUGEScore

    rows = score_rows([{"index": i, "reference": r, "prediction": p} for i, (p, r) in enumerate(PAIRS)], False)
    corpus = OfflineROUGEScore(use_stemmer=True)([p for p, _ in PAIRS], [r for _, r in PAIRS])
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert corpus_score(rows, key) == pytest.approx(float(corpus[f"{key}_fmeasure"]) * 100, abs=1e-4)
    assert len({row["rougeL"] for row in rows}) > 1  # per-example scores differ


def test_summed_bleu_counts_give_torchmetrics_corpus_bleu():
    from torchmetrics.text import SacreBLEUScore

    rows = score_rows([{"index": i, "reference": r, "prediction": p} for i, (p, r) in enumerate(PAIRS)], True)
    corpus = float(SacreBLEUScore(tokenize="13a")([p for p, _ in PAIRS], [[r] for _, r in PAIRS])) * 100
    assert corpus > 0
    assert corpus_score(rows, "bleu") == pytest.approx(corpus, abs=1e-4)
    assert all(0 <= row["bleu"] <= 100 for row in rows)
    assert corpus_bleu(np.zeros(10)) == 0.0  # no words at all: 0, not NaN


def test_bootstrap_interval_covers_the_true_mean_at_about_the_stated_rate():
    rng = np.random.default_rng(1)
    trials, covered = 300, 0
    for trial in range(trials):
        sample = rng.normal(40.0, 12.0, size=100)
        bounds = interval(rows_with(sample), "rougeL", resamples=1000, seed=trial)
        assert bounds.low < bounds.point < bounds.high
        covered += bounds.low <= 40.0 <= bounds.high
    assert 0.90 <= covered / trials <= 0.98  # percentile bootstrap of a mean, n=100: just under 95%


def test_paired_difference_of_identical_predictions_is_exactly_zero():
    rows = score_rows([{"index": i, "reference": r, "prediction": p} for i, (p, r) in enumerate(PAIRS)], False)
    difference = paired_difference(rows, [dict(row) for row in rows], "rougeL", resamples=200)
    assert (difference.point, difference.low, difference.high, difference.p_value) == (0.0, 0.0, 0.0, 1.0)
    bleu_rows = score_rows([{"index": i, "reference": r, "prediction": p} for i, (p, r) in enumerate(PAIRS)], True)
    difference = paired_difference(bleu_rows, bleu_rows, "bleu", resamples=200)
    assert (difference.point, difference.low, difference.high) == (0.0, 0.0, 0.0)


def test_paired_difference_finds_a_consistent_gain_that_unpaired_intervals_would_hide():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 60, size=80)  # examples differ a lot in difficulty ...
    better = base + rng.normal(1.0, 0.5, size=80)  # ... the gain is small but on nearly every example
    a, b = interval(rows_with(better), "rougeL", seed=0), interval(rows_with(base), "rougeL", seed=0)
    assert a.low < b.high  # the two runs' own intervals overlap
    difference = paired_difference(rows_with(better), rows_with(base), "rougeL", seed=0)
    assert 0 < difference.low < difference.point < difference.high
    assert difference.p_value < 0.01


def test_paired_difference_refuses_runs_tested_on_different_examples():
    with pytest.raises(UserError, match="different examples"):
        paired_difference(rows_with([1, 2, 3]), rows_with([1, 2]), "rougeL")
    with pytest.raises(UserError, match="different references at test row 1"):
        paired_difference(rows_with([1, 2, 3]), rows_with([1, 2, 3], references={1: "other"}), "rougeL")


@pytest.mark.parametrize("count", [99, 0, -5, 2.5, True])
def test_bootstrap_count_below_100_is_refused(count):
    with pytest.raises(UserError, match=r"--bootstrap=.*at least 100"):
        check_resamples(count)


def test_predictions_file_errors_name_file_and_line(tmp_path):
    path = tmp_path / FILE_NAME
    path.write_text(json.dumps({"index": 0, "reference": "r", "prediction": "p", "rougeL": 1.0}) + "\n"
                    + json.dumps({"index": 1, "reference": "r", "prediction": "p"}) + "\n")
    with pytest.raises(UserError, match=rf"{FILE_NAME}:2: missing rougeL"):
        read_predictions(path, "rougeL")
    path.write_text('{"index": 0,\n')
    with pytest.raises(UserError, match=rf"{FILE_NAME}:1: malformed JSON"):
        read_predictions(path, "rougeL")
    path.write_text(json.dumps({"index": 0, "reference": "r", "prediction": "p", "bleu_stats": [1, 2]}) + "\n")
    with pytest.raises(UserError, match=rf"{FILE_NAME}:1: bleu_stats is not a valid score"):
        read_predictions(path, "bleu")


@pytest.mark.parametrize("seeds, shown", [([0, "one"], "'one'"), ([1.5], "1.5"), ([True], "True")])
def test_seed_lists_must_be_integers(tmp_path, seeds, shown):
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps({"method": "grid", "metric": {"name": "val/rougeL"}, "command": ["${args}"],
                                "parameters": {"model.mode": {"values": ["dq"]}, "seed_everything": {"values": seeds}}}))
    with pytest.raises(UserError, match=rf"sweep.yaml: parameter 'seed_everything': seeds must be integers, got {shown}"):
        load_sweep(path)


# -- the sweep report, on run directories written by hand --------------------------------------------------

def write_run(run_dir: Path, mode: str, bits: str, scores: list[float], seed: int | None = None,
              references: list[str] | None = None, extra: dict | None = None,
              test_extra: dict | None = None) -> None:
    params = {"model.mode": mode, "model.bits": bits, "model.depth": "6-3", **(extra or {})}
    if seed is not None:
        params["seed_everything"] = seed
    compression = {"8-8-8": 4.5, "2-2-8": 11.7}.get(bits, 1.0)
    write_json_atomic(run_dir / "status.json", {"status": "finished", "params": params, "wall_time_s": 1.0})
    write_json_atomic(run_dir / "fit_metrics.json", {"metrics": {"val/rougeL": float(np.mean(scores))},
                      "summary": {"mode": mode, "bits": bits, "encoder_layers": 6, "decoder_layers": 3}})
    write_json_atomic(run_dir / "test_metrics.json", {"metrics": {"test/rougeL": float(np.mean(scores)),
                                                                  "test/compression": compression,
                                                                  **(test_extra or {})}})
    references = references or [f"reference {i}" for i in range(len(scores))]
    write_predictions(run_dir / FILE_NAME, [{"index": i, "reference": references[i], "prediction": "p",
                                             "rougeL": float(s)} for i, s in enumerate(scores)])


def sweep_file(tmp_path, seeds=None) -> Path:
    parameters = {"model.mode": {"values": ["dq", "quant_only"]}, "model.bits": {"values": ["8-8-8", "2-2-8"]},
                  "model.depth": {"values": ["6-3"]}}
    if seeds:
        parameters["seed_everything"] = {"values": seeds}
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps({"method": "grid", "metric": {"name": "val/rougeL", "goal": "maximize"},
                                "parameters": parameters, "command": ["python", "-m", "dq_lightning", "fit", "${args}"]}))
    return path


def test_report_has_intervals_deltas_and_the_distillation_table(tmp_path, capsys):
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(5, 40, size=60)
    teacher_dir, sweep_dir = tmp_path / "teacher", tmp_path / "sweep"
    write_json_atomic(teacher_dir / "test_metrics.json", {"metrics": {"test/rougeL": float(difficulty.mean() + 3)}})
    write_predictions(teacher_dir / FILE_NAME, [{"index": i, "reference": f"reference {i}", "prediction": "p",
                                                 "rougeL": float(s + 3)} for i, s in enumerate(difficulty)])
    gains = {"8-8-8": 2.0, "2-2-8": 0.0}
    for bits, gain in gains.items():
        write_run(sweep_dir / f"dq_{bits}_6-3", "dq", bits, list(difficulty + gain + rng.normal(0, 0.3, 60)))
        write_run(sweep_dir / f"quant_only_{bits}_6-3", "quant_only", bits, list(difficulty + rng.normal(0, 0.3, 60)))
    path = sweep_file(tmp_path)
    rows = report(load_sweep(path), expand_grid(load_sweep(path), path), sweep_dir, teacher_dir, "t", "disabled")
    printed = capsys.readouterr().out

    with open(sweep_dir / "results.csv") as handle:
        table = {row["run_id"]: row for row in csv.DictReader(handle)}
    for run_id, row in table.items():
        low, point, high = (float(row[f"test/rougeL{suffix}"]) for suffix in ("_low", "", "_high"))
        assert low < point < high, run_id
        if run_id != "teacher":
            assert float(row["test/rougeL_vs_teacher_high"]) < 0  # every student is clearly below the teacher
            assert float(row["test/rougeL_vs_teacher_p"]) < 0.05
    assert "Does distillation pay off?" in printed and printed.count("| bits=") == 2
    lines = {line.split(" | ")[0]: line for line in printed.splitlines() if line.startswith("| bits=")}
    assert "dq better" in lines["| bits=8-8-8 depth=6-3"]
    assert "no difference shown" in lines["| bits=2-2-8 depth=6-3"]
    assert (sweep_dir / "report.md").read_text().strip() in printed
    assert (sweep_dir / "tradeoff.png").stat().st_size > 10_000
    assert all(p.high > p.low for p in plot_points(rows, "rougeL"))  # every marker has an error bar


def test_seeds_are_aggregated_and_compared_as_seed_averaged_systems(tmp_path, capsys):
    rng = np.random.default_rng(2)
    difficulty = rng.uniform(5, 40, size=40)
    sweep_dir = tmp_path / "sweep"
    for seed in (0, 1, 2):
        for bits in ("8-8-8", "2-2-8"):
            write_run(sweep_dir / f"dq_{bits}_6-3_{seed}", "dq", bits, list(difficulty + 1.5 + rng.normal(0, 1, 40)),
                      seed=seed)
            write_run(sweep_dir / f"quant_only_{bits}_6-3_{seed}", "quant_only", bits,
                      list(difficulty + rng.normal(0, 1, 40)), seed=seed)
    path = sweep_file(tmp_path, seeds=[0, 1, 2])
    rows = report(load_sweep(path), expand_grid(load_sweep(path), path), sweep_dir, tmp_path / "none", "t",
                  "disabled")
    printed = capsys.readouterr().out
    assert "Seeds: the grid points run with several seeds" in printed
    assert printed.count(" | 3 |") == 4  # four (point, mode) lines with n = 3
    assert "| 3/3 |" in printed and "dq better" in printed
    points = plot_points(rows, "rougeL")
    assert len(points) == 4 and all(p.seeds == 3 and p.high > p.low for p in points)


def recipe_sweep_file(tmp_path) -> Path:
    path = tmp_path / "recipes.yaml"
    path.write_text(json.dumps({"method": "grid", "metric": {"name": "val/rougeL", "goal": "maximize"},
                                "parameters": {"model.recipe": {"values": ["dq-bart", "tbt"]},
                                               "model.mode": {"values": ["dq"]},
                                               "model.bits": {"values": ["8-8-8", "2-2-8"]},
                                               "model.depth": {"values": ["6-3"]}},
                                "command": ["python", "-m", "dq_lightning", "fit", "${args}"]}))
    return path


def test_report_pairs_each_value_of_a_swept_parameter_against_the_first(tmp_path, capsys):
    """A sweep over recipes: tbt minus dq-bart at every bit width, both sides' share of the teacher's score and
    their loyalty, on run directories written by hand (tbt gains 3 points at 2-2-8 and nothing at 8-8-8)."""
    rng = np.random.default_rng(3)
    difficulty = rng.uniform(5, 40, size=60)
    teacher_dir, sweep_dir = tmp_path / "teacher", tmp_path / "sweep"
    teacher_score = float(difficulty.mean() + 4)
    write_json_atomic(teacher_dir / "test_metrics.json", {"metrics": {"test/rougeL": teacher_score}})
    write_predictions(teacher_dir / FILE_NAME, [{"index": i, "reference": f"reference {i}", "prediction": "p",
                                                 "rougeL": float(s + 4)} for i, s in enumerate(difficulty)])
    gains = {("dq-bart", "8-8-8"): 2.0, ("tbt", "8-8-8"): 2.0, ("dq-bart", "2-2-8"): -6.0, ("tbt", "2-2-8"): -3.0}
    loyalty = {"dq-bart": 0.4, "tbt": 0.6}
    for (recipe, bits), gain in gains.items():
        write_run(sweep_dir / f"{recipe}_dq_{bits}_6-3", "dq", bits,
                  list(difficulty + gain + rng.normal(0, 0.3, 60)), extra={"model.recipe": recipe},
                  test_extra={"test/label_loyalty": loyalty[recipe], "test/prob_loyalty": loyalty[recipe] + 0.1})
    path = recipe_sweep_file(tmp_path)
    report(load_sweep(path), expand_grid(load_sweep(path), path), sweep_dir, teacher_dir, "t", "disabled")
    printed = capsys.readouterr().out

    assert "model.recipe: tbt minus dq-bart" in printed
    assert "| tbt - dq-bart |" in printed
    lines = {line.split(" | ")[0]: line.split(" | ") for line in printed.splitlines() if line.startswith("| bits=")}
    assert set(lines) == {"| bits=8-8-8 depth=6-3", "| bits=2-2-8 depth=6-3"}
    low_bit = lines["| bits=2-2-8 depth=6-3"]
    assert float(low_bit[7]) == pytest.approx(3.0, abs=0.3)  # the paired difference, tbt minus dq-bart
    assert low_bit[10] == "tbt better"
    assert lines["| bits=8-8-8 depth=6-3"][10] == "no difference shown"
    mean = float(difficulty.mean())
    expected = f"{100 * (mean - 6) / teacher_score:.0f}% / {100 * (mean - 3) / teacher_score:.0f}%"
    assert low_bit[5] == expected  # each side's share of the teacher's score
    assert low_bit[11:13] == ["0.400 / 0.600", "0.500 / 0.700 |"]
    assert (sweep_dir / "report.md").read_text().strip() in printed


def test_runs_that_name_no_seed_are_never_reported_as_seeds_of_one_point(tmp_path, capsys):
    """Two runs another sweep file left in the directory, same bits and depth, different data: each keeps the
    parameters its status.json records, and the report shows no "seeds" section pooling them."""
    rng = np.random.default_rng(4)
    sweep_dir = tmp_path / "sweep"
    for examples, gain in ((200, 0.0), (800, 5.0)):
        write_run(sweep_dir / f"labeled_{examples}", "dq", "2-2-8", list(rng.uniform(5, 40, 30) + gain),
                  extra={"data.labeled_examples": examples})
    path = sweep_file(tmp_path)
    rows = report(load_sweep(path), expand_grid(load_sweep(path), path), sweep_dir, tmp_path / "none", "t",
                  "disabled")
    printed = capsys.readouterr().out
    assert {row["run_id"]: row["params"].get("data.labeled_examples") for row in rows} == \
        {"dq_8-8-8_6-3": None, "dq_2-2-8_6-3": None, "quant_only_8-8-8_6-3": None, "quant_only_2-2-8_6-3": None,
         "labeled_200": 200, "labeled_800": 800}
    assert "Seeds:" not in printed
    assert "data.labeled_examples: 800 minus 200" in printed


def test_plot_renders_error_bars(tmp_path):
    rows = [{"run_id": "a", "mode": "dq", "bits": "2-2-8", "compression": 10.0, "test/rougeL": 30.0,
             "test/rougeL_low": 28.0, "test/rougeL_high": 32.0},
            {"run_id": "b", "mode": "quant_only", "bits": "2-2-8", "compression": 10.0, "test/rougeL": 29.0}]
    with_bar, without = tmp_path / "bar.png", tmp_path / "plain.png"
    plot_tradeoff(rows, "rougeL", with_bar, "t")
    plot_tradeoff([{**rows[0], "test/rougeL_low": "", "test/rougeL_high": ""}, rows[1]], "rougeL", without, "t")
    assert with_bar.stat().st_size > 10_000
    assert with_bar.read_bytes() != without.read_bytes()


def test_plot_tells_a_thinner_student_from_a_shallower_one(tmp_path):
    shallow = {"run_id": "a", "mode": "dq", "bits": "2-2-8", "encoder_layers": 6, "decoder_layers": 3,
               "width": "full", "compression": 10.0, "test/rougeL": 30.0}
    thinner = {**shallow, "run_id": "b", "decoder_layers": 6, "width": "heads=3,ffn=512,d_model=96 impt",
               "compression": 11.0}
    assert label_of(shallow) == "2-2-8 6-3" and label_of({**shallow, "width": None}) == "2-2-8 6-3"
    assert label_of(thinner) == "2-2-8 6-6 heads=3,ffn=512,d_model=96 impt"
    hollow, filled = tmp_path / "hollow.png", tmp_path / "filled.png"
    plot_tradeoff([shallow, thinner], "rougeL", hollow, "t")
    plot_tradeoff([shallow, {**thinner, "width": "full"}], "rougeL", filled, "t")
    assert hollow.read_bytes() != filled.read_bytes()


@pytest.mark.parametrize("low, high, p, verdict", [
    (0.2, 1.0, 0.01, "dq better"), (-1.6, -0.1, 0.02, "quant_only better"),
    (-1.59, -0.02, 0.055, "borderline"),  # measured on the wmt16_en_ro grid: corpus BLEU is skewed
    (-0.5, 0.5, 0.03, "borderline"), (-0.5, 0.5, 0.6, "no difference shown")])
def test_a_winner_is_declared_only_when_interval_and_p_agree(low, high, p, verdict):
    from dq_lightning.sweep.comparisons import paired_verdict

    assert paired_verdict({"low": low, "high": high, "p": p}, "dq", "quant_only").startswith(verdict)
