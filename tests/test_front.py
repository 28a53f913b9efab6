"""The trade-off front: monotone, exactly the non-dominated points, the close ones marked; several series on one
chart; the same chart in the W&B summary run; several sweeps compared by `python -m dq_lightning report`."""

from __future__ import annotations

import csv
import json
import os
import re
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from dq_lightning.evaluation.per_example import FILE_NAME, write_predictions
from dq_lightning.files import write_json_atomic
from dq_lightning.sweep.front import (BEATEN, FRONT, FRONT_RULE, REFERENCE, WITHIN, PlotPoint, pareto_front,
                                      plot_points, series_fronts, status_of)
from dq_lightning.sweep.plot import tradeoff_figure
from dq_lightning.sweep.wandb_chart import COLUMNS, FIELDS, PRESET_NAME, spec_placeholders, spec_text
from tests.conftest import PROJECT_ROOT

# The demo sweep of the issue (dq, test ROUGE-L with about ±1.7 bootstrap intervals): the old front fell from
# 8-8-8 6-6 to 8-8-8 6-3 (4.5x, 19.6), climbed to 2-2-8 6-6 (9.9x, 21.0), then fell again.
DEMO = [("8-8-8", "6-6", 3.6, 21.6), ("8-8-8", "6-3", 4.5, 19.6), ("8-8-8", "3-1", 7.2, 12.5),
        ("2-2-8", "6-6", 9.9, 21.0), ("2-2-8", "6-3", 11.7, 18.2), ("2-2-8", "3-1", 15.6, 10.9)]


def demo_row(bits, depth, compression, score, mode="dq", half=1.7, **extra):
    encoder, decoder = depth.split("-")
    return {"run_id": f"{mode}_{bits}_{depth}", "status": "finished", "mode": mode, "bits": bits,
            "encoder_layers": int(encoder), "decoder_layers": int(decoder), "width": "full",
            "compression": compression, "test/rougeL": score, "test/rougeL_low": score - half,
            "test/rougeL_high": score + half, **extra}


def point(x, y, half=0.0, row=None):
    return PlotPoint(x, y, y - half, y + half, row or {"mode": "dq"})


def dominated(p, points):
    return any(q.x >= p.x and q.y > p.y for q in points)


@pytest.mark.parametrize("seed", range(20))
def test_front_is_exactly_the_non_dominated_points_and_never_rises(seed):
    rng = np.random.default_rng(seed)
    # Few distinct compressions and rounded scores: ties in both, as grids of bits x depth x mode give.
    points = [point(float(rng.choice([3.6, 4.5, 7.2, 9.9, 11.7, 15.6])), float(np.round(rng.uniform(5, 25), 0)))
              for _ in range(int(rng.integers(1, 14)))]
    front = pareto_front(points)
    assert sorted(map(id, front)) == sorted(id(p) for p in points if not dominated(p, points))
    assert [p.x for p in front] == sorted(p.x for p in front)
    assert all(later.y <= earlier.y for earlier, later in zip(front, front[1:]))


def test_demo_front_no_longer_zigzags_and_marks_the_close_point():
    points = plot_points([demo_row(*line) for line in DEMO], "rougeL")
    fig = tradeoff_figure(points, "test rougeL", "demo")
    (line,) = [artist for artist in fig.axes[0].lines if artist.get_gid() == "front"]
    xs, ys = list(line.get_xdata()), list(line.get_ydata())
    assert xs == [3.6, 9.9, 11.7, 15.6] and ys == [21.6, 21.0, 18.2, 10.9]  # joined in order, never rising
    status = {p.x: s for p, s in ((p, status_of(points)[id(p)]) for p in points)}
    assert status[4.5] == WITHIN  # 19.6 [17.9, 21.3] vs 21.0 [19.3, 22.7] further right: not told apart
    assert status[7.2] == BEATEN  # 12.5 [10.8, 14.2]: beaten beyond the bars by 2-2-8 6-6
    within = [c for c in fig.axes[0].collections if c.get_gid() == "within"]
    beaten = [c for c in fig.axes[0].collections if c.get_gid() == "beaten"]
    assert [list(c.get_offsets()[:, 0]) for c in within] == [[4.5]]
    assert len(within[0].get_facecolors()) == 0 or within[0].get_facecolors()[0][3] == 0  # hollow
    assert [list(c.get_offsets()[:, 0]) for c in beaten] == [[7.2]]
    legend = fig.axes[0].get_legend()
    assert legend.get_title().get_text() == "\n".join(textwrap.wrap(FRONT_RULE, 48))  # the rule, in the legend


def test_held_out_tie_goes_through_the_higher_point_and_marks_the_lower():
    dq = point(11.7, 13.84, 1.2, {"mode": "dq"})
    quant_only = point(11.7, 14.30, 1.2, {"mode": "quant_only"})
    assert pareto_front([dq, quant_only]) == [quant_only]
    far_below = point(11.7, 9.0, 1.0)
    (front,) = series_fronts([dq, quant_only, far_below])
    assert front.front == [quant_only] and front.within == [dq] and front.beaten == [far_below]


@pytest.mark.parametrize("seed", range(10))
def test_marked_points_are_exactly_those_no_point_at_least_as_compressed_beats_beyond_the_bars(seed):
    rng = np.random.default_rng(100 + seed)
    points = [point(float(rng.choice([2.0, 4.0, 8.0, 16.0])), float(rng.uniform(10, 20)), float(rng.uniform(0, 2)))
              for _ in range(10)]
    (front,) = series_fronts(points)
    expected = [p for p in points if dominated(p, points)
                and not any(q.x >= p.x and q.low > p.high for q in points if q is not p)]
    assert sorted(map(id, front.within)) == sorted(map(id, expected))
    assert sorted(map(id, front.front + front.within + front.beaten)) == sorted(map(id, points))
    for p in front.within:  # a marked point's interval reaches every point at least as compressed
        assert all(q.low <= p.high for q in points if q.x >= p.x)


def test_every_dimension_of_a_run_is_a_series_with_its_own_front():
    rows = [{"run_id": "teacher", "mode": "teacher", "compression": 1.0, "test/rougeL": 24.0}]
    rows += [demo_row("8-8-8", "6-6", 3.6, 20.0, recipe="dq-bart"),
             demo_row("8-8-8", "6-6", 3.6, 21.0, recipe="dq_lightning"),
             demo_row("2-2-8", "6-6", 9.9, 19.0, recipe="dq-bart", source="supernet",
                      width="heads=3,ffn=512,d_model=96 impt"),
             demo_row("2-2-8", "6-6", 9.9, 18.0, mode="quant_only", recipe="dq-bart")]
    for seed, score in enumerate([17.0, 18.0, 19.0]):  # three seeds of one grid point: one marker
        rows.append({**demo_row("2-2-8", "6-3", 11.7, score, recipe="dq-bart"), "run_id": f"s{seed}", "seed": seed,
                     "test/label_loyalty": 0.5 + seed / 10})
    points = plot_points(rows, "rougeL")
    names = {p.series for p in points}
    assert names == {"teacher", "dq · recipe dq-bart · full width · trained", "dq · recipe dq_lightning · full width · "
                     "trained", "dq · recipe dq-bart · thinner · supernet", "quant_only · recipe dq-bart · full width "
                     "· trained"}
    fronts = {front.series: front for front in series_fronts(points)}
    assert "teacher" not in fronts and status_of(points)[id(points[0])] == REFERENCE
    seeded = [p for p in points if p.seeds > 1]
    assert len(seeded) == 1 and seeded[0].y == pytest.approx(18.0)
    assert seeded[0].high - seeded[0].y == pytest.approx(1.0)  # ±1 sd
    assert seeded[0].mean_of("test/label_loyalty") == pytest.approx(0.6)
    dq_bart = fronts["dq · recipe dq-bart · full width · trained"]
    assert [(p.x, p.y) for p in dq_bart.front] == [(3.6, 20.0), (11.7, 18.0)]
    fig = tradeoff_figure(points, "test rougeL", "series")
    assert len([line for line in fig.axes[0].lines if line.get_gid() == "front"]) == 4


def test_the_rule_in_the_readme_is_the_one_in_the_legend():
    readme = " ".join((PROJECT_ROOT / "README.md").read_text().split())
    assert FRONT_RULE in readme


# -- the chart in W&B ------------------------------------------------------------------------------------------

def test_chart_spec_draws_log_compression_and_the_hover_the_issue_asks_for():
    spec = json.loads(spec_text())
    assert spec["encoding"]["x"]["scale"]["type"] == "log"
    fields, strings = spec_placeholders(spec_text())
    assert fields == set(FIELDS) and set(FIELDS.values()) <= set(COLUMNS)
    assert strings == {"title", "rule", "ylabel", "metric"}
    tooltip = {item["field"] for layer in spec["layer"] for item in layer.get("encoding", {}).get("tooltip", [])}
    for field in ("point", "y", "interval", "label_loyalty", "prob_loyalty", "status"):
        assert "${field:%s}" % field in tooltip
    front_layer = next(layer for layer in spec["layer"] if layer.get("transform"))
    assert front_layer["mark"]["type"] == "line"
    assert "${field:status}'] === 'front'" in front_layer["transform"][0]["filter"]


def wandb_records(run_dir: Path):
    """The records of an offline run's `.wandb` file (W&B's LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    block, header = 32768, 7
    (path,) = run_dir.glob("run-*.wandb")
    data, offset, pending = path.read_bytes(), header, b""
    assert data[:4] == b":W&B"
    while offset + header <= len(data):
        if block - offset % block < header:
            offset += block - offset % block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + header])
        if kind == 0 or offset + header + length > len(data):  # the end, or a record still being written
            break
        pending += data[offset + header:offset + header + length]
        offset += header + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def finished_records(run_dir: Path, timeout: float = 60.0) -> list:
    """The run's records once its exit record is on disk: W&B's service may still be writing them when
    `run.finish()` returns."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(run_dir))
        if any(record.WhichOneof("record_type") == "exit" for record in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def chart_config(run_dir: Path, key: str) -> dict:
    for record in finished_records(run_dir):
        if record.WhichOneof("record_type") == "config":
            for update in record.config.update:
                if list(update.nested_key) == ["_wandb", "visualize", key]:
                    return json.loads(update.value_json)
    raise AssertionError(f"no chart {key!r} in {run_dir}")


@pytest.fixture
def fresh_wandb():
    """W&B reads WANDB_ENTITY once per process, into its settings singleton: a test that sets it starts and
    leaves that singleton fresh."""
    import wandb

    wandb.teardown()
    yield
    wandb.teardown()


def write_demo_sweep(root: Path) -> tuple[Path, Path]:
    """The demo grid's run directories (sweeps/demo-tiny.yaml) with the issue's scores, per-example predictions
    around them, and a teacher, as a finished `make sweep` leaves them under `root`."""
    rng = np.random.default_rng(0)
    difficulty = rng.normal(0, 8, size=80)
    sweep_dir, teacher_dir = root / "demo" / "sweep", root / "demo" / "teacher-tiny"

    def write(run_dir, score, summary, params=None, compression=None):
        scores = score + difficulty - difficulty.mean()
        metrics = {"test/rougeL": float(scores.mean()), "test/label_loyalty": 0.7}
        if compression:
            metrics["test/compression"] = compression
        write_json_atomic(run_dir / "status.json", {"status": "finished", "params": params or {}})
        write_json_atomic(run_dir / "fit_metrics.json", {"metrics": {}, "summary": summary})
        write_json_atomic(run_dir / "test_metrics.json", {"metrics": metrics})
        write_predictions(run_dir / FILE_NAME, [{"index": i, "reference": f"r{i}", "prediction": "p",
                                                 "rougeL": float(s)} for i, s in enumerate(scores)])

    write(teacher_dir, 23.5, {})
    for bits, depth, compression, score in DEMO:
        encoder, decoder = depth.split("-")
        write(sweep_dir / f"dq_{bits}_{depth}", score,
              {"mode": "dq", "bits": bits, "encoder_layers": int(encoder), "decoder_layers": int(decoder)},
              {"model.mode": "dq", "model.bits": bits, "model.depth": depth}, compression)
    return sweep_dir, teacher_dir


def test_make_report_on_the_demo_sweep_draws_the_front_and_logs_the_chart_offline(tmp_path, monkeypatch, fresh_wandb):
    from dq_lightning.sweep.runner import main

    sweep_dir, _ = write_demo_sweep(tmp_path / "runs")
    monkeypatch.chdir(PROJECT_ROOT)  # the sweep file, as `make report TASK=demo` runs it
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_ENTITY", "dq-team")
    assert main(["--task", "demo", "--runs", str(tmp_path / "runs"), "--report-only"]) == 0
    report = (sweep_dir / "report.md").read_text()
    assert ("- dq: 8-8-8 6-6 (3.6x) 21.60 > 2-2-8 6-6 (9.9x) 21.00 > 2-2-8 6-3 (11.7x) 18.20 > 2-2-8 3-1 (15.6x) "
            "10.90; within the error bars: 8-8-8 6-3 (4.5x) 19.60") in report
    assert (sweep_dir / "tradeoff.png").stat().st_size > 10_000

    (run_dir,) = (sweep_dir / "wandb").glob("offline-run-*")
    chart = chart_config(run_dir, "tradeoff")["panel_config"]
    assert chart["panelDefId"] == f"dq-team/{PRESET_NAME}"
    assert chart["fieldSettings"] == FIELDS and chart["stringSettings"]["rule"] == FRONT_RULE
    assert chart["userQuery"]["queryFields"][0]["fields"][-1]["args"][0]["value"] == "tradeoff_table"
    media = run_dir / "files" / "media"
    (points_file,) = (media / "table").glob("tradeoff_table_*.table.json")
    table = json.loads(points_file.read_text())
    assert table["columns"] == COLUMNS
    by_point = {row[COLUMNS.index("grid_point")]: row for row in table["data"]}
    assert by_point["8-8-8 6-3"][COLUMNS.index("front")] == WITHIN
    assert by_point["8-8-8 3-1"][COLUMNS.index("front")] == BEATEN
    assert by_point["2-2-8 6-6"][COLUMNS.index("front")] == FRONT
    assert by_point["teacher"][COLUMNS.index("front")] == REFERENCE
    assert by_point["2-2-8 6-6"][COLUMNS.index("interval")].endswith("(95% bootstrap)")
    assert by_point["2-2-8 6-6"][COLUMNS.index("label_loyalty")] == pytest.approx(0.7)
    assert list((media / "table").glob("results_*.table.json")) and list((media / "images").glob("tradeoff_png_*"))


def test_offline_summary_run_without_an_entity_falls_back_to_the_builtin_scatter(tmp_path, monkeypatch, capsys,
                                                                               fresh_wandb):
    from dq_lightning.sweep.plot import plot_tradeoff
    from dq_lightning.sweep.report import log_wandb_summary

    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    rows = [demo_row(*line) for line in DEMO]
    png = plot_tradeoff(rows, "rougeL", tmp_path / "tradeoff.png", "t")
    log_wandb_summary(rows, "rougeL", png, "s", tmp_path, "offline")
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    assert chart_config(run_dir, "tradeoff")["panel_config"]["panelDefId"] == "wandb/scatter/v0"
    assert "set WANDB_ENTITY" in capsys.readouterr().err


def test_online_summary_creates_the_chart_preset_in_the_runs_entity(monkeypatch, capsys):
    import inspect

    import wandb

    from dq_lightning.sweep.wandb_chart import tradeoff_chart

    accepts = inspect.signature(wandb.Api.create_custom_chart)
    calls = []

    class Api:  # the installed wandb's signature, no server: the second creation finds the preset there
        def create_custom_chart(self, **arguments):
            accepts.bind(self, **arguments)
            calls.append(arguments)
            if len(calls) > 1:
                raise wandb.Error("a chart named dq-lightning-tradeoff-v1 already exists")

    monkeypatch.setattr(wandb, "Api", Api)
    points = plot_points([demo_row(*line) for line in DEMO], "rougeL")
    for _ in range(2):
        chart = tradeoff_chart(points, "rougeL", "test rougeL", "t", "dq-team", online=True)
        assert chart.spec.spec_name == f"dq-team/{PRESET_NAME}" and chart.spec.fields == FIELDS
    assert calls[0]["entity"] == "dq-team" and calls[0]["name"] == PRESET_NAME
    assert json.loads(calls[0]["spec"]) == json.loads(spec_text()) and calls[0]["spec_type"] == "vega2"
    assert capsys.readouterr().err == ""  # an existing preset is no warning


# -- several sweeps on one chart -------------------------------------------------------------------------------

def write_results(directory: Path, rows: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(directory / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return directory


def report_command(*args, cwd: Path):
    return subprocess.run([sys.executable, "-m", "dq_lightning", "report", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "WANDB_MODE": "disabled"})


def test_report_command_draws_two_sweeps_fronts_on_one_chart(tmp_path):
    teacher = {"run_id": "teacher", "status": "finished", "mode": "teacher", "compression": 1.0, "test/rougeL": 24.0}
    first = write_results(tmp_path / "a", [teacher] + [demo_row(*line) for line in DEMO])
    second = write_results(tmp_path / "b", [teacher] + [demo_row(b, d, c, s - 1.0) for b, d, c, s in DEMO])
    done = report_command("--sweep", first, "--label", "dq-bart", "--sweep", second / "results.csv", "--label",
                          "dq_lightning", "--out", tmp_path / "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "out" / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["sweep"] for row in rows] == ["dq-bart"] * 7 + ["dq_lightning"] * 7
    assert "- dq-bart · dq: 8-8-8 6-6 (3.6x) 21.60 >" in done.stdout
    assert "- dq_lightning · dq: 8-8-8 6-6 (3.6x) 20.60 >" in done.stdout
    teachers = [p for p in plot_points(rows, "rougeL") if p.is_teacher]
    assert [p.series for p in teachers] == ["teacher"]  # one teacher for both sweeps: one star
    assert (tmp_path / "out" / "tradeoff.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "report.md").read_text().strip() in done.stdout


@pytest.mark.parametrize("case, message", [
    ("missing", r"--sweep .*nowhere: no such sweep directory or results file"),
    ("empty_dir", r"--sweep .*empty: no results.csv in this directory"),
    ("labels", r"--label given 1 times for 2 --sweep"),
    ("same_label", r"--label x: names two sweeps"),
    ("no_results", r"--sweep .*pending: no finished run with a compression and a rougeL score"),
    ("no_scores", r"--sweep .*unscored: no finished run with a score \(no test/ or val/ column of rougeL, bleu\)"),
    ("metric", r"--metric bleu: --sweep .*a has no test/bleu or val/bleu column"),
    ("mixed", r"--sweep .*bleu scores bleu, an earlier --sweep rougeL"),
    ("overwrite", r"--out .*a: is where --sweep .*a keeps its results.csv"),
])
def test_report_command_refuses_bad_input_in_one_line(tmp_path, capsys, case, message):
    from dq_lightning.sweep.compare import main as report_main

    good = write_results(tmp_path / "a", [demo_row(*DEMO[0])])
    (tmp_path / "empty").mkdir()
    pending = write_results(tmp_path / "pending", [{"run_id": "r", "status": "pending", "mode": "dq", "compression": "",
                                                    "test/rougeL": ""}])
    unscored = write_results(tmp_path / "unscored", [{"run_id": "r", "status": "pending", "mode": "dq",
                                                      "compression": ""}])
    bleu = write_results(tmp_path / "bleu", [{"run_id": "r", "mode": "dq", "compression": 3.6, "test/bleu": 3.0}])
    args = {"missing": ["--sweep", good, "--sweep", tmp_path / "nowhere"],
            "empty_dir": ["--sweep", tmp_path / "empty"],
            "labels": ["--sweep", good, "--sweep", good, "--label", "x"],
            "same_label": ["--sweep", good, "--sweep", good, "--label", "x", "--label", "x"],
            "no_results": ["--sweep", pending],
            "no_scores": ["--sweep", unscored],
            "metric": ["--sweep", good, "--metric", "bleu"],
            "mixed": ["--sweep", good, "--sweep", bleu],
            "overwrite": ["--sweep", good, "--out", good]}[case]
    before = (good / "results.csv").read_text()
    capsys.readouterr()
    assert report_main([*map(str, args), *([] if "--out" in args else ["--out", str(tmp_path / "out")])]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(message, lines[0]), lines
    assert not (tmp_path / "out").exists() and (good / "results.csv").read_text() == before  # nothing written
