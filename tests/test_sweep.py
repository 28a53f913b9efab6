import csv
import itertools
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from dq_lightning.errors import UserError
from dq_lightning.sweep.report import FIXED_COLUMNS, TAIL_COLUMNS
from dq_lightning.sweep.spec import check_parameters, command_for, expand_grid, load_sweep
from tests.conftest import PROJECT_ROOT

SWEEPS = sorted((PROJECT_ROOT / "sweeps").glob("*.yaml"))
TASKS = ("demo", "xsum", "cnn_dailymail", "eli5", "wmt16_en_ro")


def test_every_task_has_a_paper_and_a_tiny_sweep():
    names = {path.name for path in SWEEPS}
    for task in TASKS:
        assert f"{task}.yaml" in names and f"{task}-tiny.yaml" in names


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_file_is_wandb_format_and_accepted_by_the_cli(path):
    sweep = load_sweep(path)
    task = path.stem.split("-")[0]  # xsum-tiny, xsum-recipes-tiny: task xsum
    scale = "tiny" if path.stem.endswith("-tiny") else "paper"
    assert sweep["method"] == "grid"
    assert sweep["metric"]["name"] == ("val/bleu" if task == "wmt16_en_ro" else "val/rougeL")
    command = command_for(sweep, ["--model.bits=2-2-8"])
    assert command[1:6] == ["-m", "dq_lightning", "fit", "--config", f"experiments/{task}/dq-{scale}.yaml"]
    check_parameters(sweep, path, expand_grid(sweep, path))  # parses every value; raises if rejected


def test_paper_grid_covers_the_papers_points():
    points = expand_grid(load_sweep(PROJECT_ROOT / "sweeps" / "xsum.yaml"))
    chosen = {(p.params["model.mode"], p.params["model.bits"], p.params["model.depth"]) for p in points}
    for bits in ("8-8-8", "2-8-8", "2-2-8"):
        for depth in ("6-6", "6-3", "6-1", "3-1", "1-1"):
            assert ("dq", bits, depth) in chosen
    assert ("quant_only", "2-2-8", "6-6") in chosen and ("dq", "32-32-32", "6-3") in chosen


def test_local_expansion_is_exactly_the_grid(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({
        "method": "grid", "metric": {"name": "val/rougeL"}, "command": ["python", "${args}"],
        "parameters": {"model.mode": {"value": "dq"}, "model.bits": {"values": ["8-8-8", "2-2-8"]},
                       "model.depth": {"values": ["6-6", "6-3", "3-1"]}}}, sort_keys=False))
    points = expand_grid(load_sweep(path))
    expected = list(itertools.product(["dq"], ["8-8-8", "2-2-8"], ["6-6", "6-3", "3-1"]))
    assert [tuple(p.params.values()) for p in points] == expected
    assert len({p.run_id for p in points}) == 6
    assert points[0].flags == ["--model.mode=dq", "--model.bits=8-8-8", "--model.depth=6-6"]


def test_unknown_parameter_is_named_before_anything_runs(tmp_path):
    sweep = load_sweep(PROJECT_ROOT / "sweeps" / "demo-tiny.yaml")
    sweep["parameters"]["model.w_bitz"] = {"values": [2]}
    with pytest.raises(UserError, match="unknown parameter 'model.w_bitz'"):
        check_parameters(sweep, "demo-tiny.yaml", expand_grid(sweep))


def two_point_sweep(tmp_path, teacher_dir, shared_data, cache_dir):
    command = ["${env}", "python", "-m", "dq_lightning", "fit", "--config", "experiments/xsum/dq-tiny.yaml",
               f"--model.teacher={teacher_dir}", f"--data.cache_dir={cache_dir}", "--data.max_train_samples=16",
               "--data.max_eval_samples=4", "--data.max_source_length=64", "--data.max_target_length=16",
               "--data.batch_size=4", "--trainer.max_epochs=2", "--model.generation={num_beams: 1, max_length: 6}",
               "--trainer.enable_progress_bar=false", "${args}"]
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump({"method": "grid", "metric": {"name": "val/rougeL", "goal": "maximize"},
                                    "parameters": {"model.bits": {"values": ["8-8-8", "2-2-8"]},
                                                   "model.depth": {"value": "2-1"}},
                                    "command": command}, sort_keys=False))
    return path


def sweep_command(path, runs, shared_data):
    return [sys.executable, "-m", "dq_lightning", "sweep", "--task", "xsum", "--sweep-file", str(path),
            "--runs", str(runs), "--data-dir", str(shared_data / "xsum")]


@pytest.mark.timeout(900)
def test_killed_sweep_resumes_without_rerunning_finished_runs(tmp_path, teacher_dir, shared_data, cache_dir):
    path = two_point_sweep(tmp_path, teacher_dir, shared_data, cache_dir)
    runs = tmp_path / "runs"
    sweep_dir = runs / "xsum" / "sweep"
    first, second = sweep_dir / "8-8-8_2-1", sweep_dir / "2-2-8_2-1"
    env = {**os.environ, "WANDB_MODE": "offline"}
    console = tmp_path / "sweep-console.txt"

    def explain():
        logs = [console] + sorted(sweep_dir.glob("*/status.json")) + sorted(sweep_dir.glob("*/run.log"))
        return "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in logs if p.exists())

    with open(console, "w") as out:
        process = subprocess.Popen(sweep_command(path, runs, shared_data), cwd=PROJECT_ROOT, env=env,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 600
        while not (second / "status.json").exists():  # the first run finished, the second has started
            assert process.poll() is None, explain()
            assert time.time() < deadline, explain()
            time.sleep(0.5)
        time.sleep(3)
        os.killpg(process.pid, signal.SIGKILL)  # the whole sweep, as a killed node would
        process.wait()
    assert '"finished"' in (first / "status.json").read_text(), explain()
    # dq-tiny.yaml sets test_after_fit: the fit process tested too, so the runner started no test process.
    assert "[1/2] 8-8-8_2-1: test ..." not in console.read_text(), explain()
    assert "test/rougeL" in (first / "test_metrics.json").read_text()
    finished_at = (first / "test_metrics.json").stat().st_mtime

    resumed = subprocess.run(sweep_command(path, runs, shared_data), cwd=PROJECT_ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr + explain()
    assert "[1/2] 8-8-8_2-1: finished earlier, skipped" in resumed.stdout, resumed.stdout
    assert (first / "test_metrics.json").stat().st_mtime == finished_at
    assert '"finished"' in (second / "status.json").read_text()

    with open(sweep_dir / "results.csv") as rows:
        table = list(csv.DictReader(rows))
    assert [row["run_id"] for row in table] == ["8-8-8_2-1", "2-2-8_2-1"]
    columns = list(table[0])
    assert columns[:len(FIXED_COLUMNS)] == FIXED_COLUMNS and columns[-len(TAIL_COLUMNS):] == TAIL_COLUMNS
    for key in ("val/rougeL", "test/rougeL", "test/label_loyalty", "test/prob_loyalty", "test/rougeLsum"):
        assert key in columns
    assert table[0]["bits"] == "8-8-8" and table[1]["decoder_layers"] == "1"
    assert float(table[1]["compression"]) > float(table[0]["compression"]) > 1
    assert (sweep_dir / "tradeoff.png").stat().st_size > 10_000
    assert "| 2-2-8_2-1 | dq | 2-2-8 | 2-1 |" in resumed.stdout


def test_failed_run_is_recorded_and_the_sweep_carries_on(tmp_path, teacher_dir, shared_data, cache_dir):
    path = two_point_sweep(tmp_path, teacher_dir, shared_data, cache_dir)
    sweep = yaml.safe_load(path.read_text())
    sweep["parameters"]["model.bits"]["values"] = ["2-2-5", "8-8-8"]  # 5 bits is not supported
    sweep["command"] = [c for c in sweep["command"] if c != "--trainer.max_epochs=2"] + ["--trainer.max_steps=1"]
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    result = subprocess.run(sweep_command(path, tmp_path / "runs", shared_data), cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    with open(tmp_path / "runs" / "xsum" / "sweep" / "results.csv") as rows:
        table = {row["run_id"]: row for row in csv.DictReader(rows)}
    assert table["2-2-5_2-1"]["status"] == "failed"
    assert "a_bits=5" in table["2-2-5_2-1"]["error"] or "5" in table["2-2-5_2-1"]["error"]
    assert table["8-8-8_2-1"]["status"] == "finished", table["8-8-8_2-1"]["error"]


def test_runner_tests_unless_the_fit_process_already_did(tmp_path):
    from dq_lightning.sweep.runner import tested_after_fit

    fit, test = tmp_path / "fit_metrics.json", tmp_path / "test_metrics.json"
    fit.write_text("{}")
    assert not tested_after_fit(tmp_path)  # fit finished, killed before its test: the runner tests
    test.write_text("{}")
    os.utime(fit, (time.time() - 60, time.time() - 60))
    assert tested_after_fit(tmp_path)
    os.utime(fit, (time.time() + 60, time.time() + 60))  # a later fit's metrics: the old test is stale
    assert not tested_after_fit(tmp_path)
