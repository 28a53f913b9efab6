import csv
import json
import hashlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dq_lightning.errors import UserError
from dq_lightning.sweep.report import FIXED_COLUMNS, TAIL_COLUMNS
from dq_lightning.sweep.check_cli import check_points
from dq_lightning.sweep.spec import command_for, expand_grid, load_sweep
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
    check_points(sweep, path, expand_grid(sweep, path), instantiate=False)  # parses every point; raises if rejected


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
        check_points(sweep, "demo-tiny.yaml", expand_grid(sweep), instantiate=False)


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


@pytest.mark.slow  # real sweep workers and their fits: kill-and-resume, two workers (make test-slow)
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
    # The killed sweep's claim on the second run is stale (its process is gone): taken over, not waited on.
    assert "[2/2] 2-2-8_2-1: took over the claim of pid" in resumed.stdout, resumed.stdout
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
    assert all(int(row["threads"]) >= 1 for row in table)  # what the run's numbers depend on
    assert float(table[1]["compression"]) > float(table[0]["compression"]) > 1
    assert (sweep_dir / "tradeoff.png").stat().st_size > 10_000
    assert "| 2-2-8_2-1 | dq | 2-2-8 | 2-1 |" in resumed.stdout
    assert float(table[0]["test/rougeL_low"]) <= float(table[0]["test/rougeL"]) <= float(table[0]["test/rougeL_high"])

    # The finished grid scored on another test file, without retraining; the runs' own results stay as they were.
    other = tmp_path / "other.jsonl"
    other.write_text("".join((shared_data / "xsum" / "validation.jsonl").read_text().splitlines(True)[:6]))
    own = {run: (run / "test_metrics.json").read_bytes() for run in (first, second)}
    retested = subprocess.run([*sweep_command(path, runs, shared_data), "--report-only", "--test-file", str(other)],
                              cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert retested.returncode == 0, retested.stdout + retested.stderr
    assert f"test set: {other}" in retested.stdout
    labels = [p.name for p in (first / "tests").iterdir()]
    assert len(labels) == 1 and labels[0].startswith("other-")
    for run in (first, second):
        assert (run / "test_metrics.json").read_bytes() == own[run]
        rows = (run / "tests" / labels[0] / "test_predictions.jsonl").read_text().splitlines()
        assert len(rows) == 4  # the sweep's runs keep --data.max_eval_samples=4
        first_summary = json.loads(other.read_text().splitlines()[0])["summary"]
        assert first_summary.startswith(json.loads(rows[0])["reference"][:20])
    with open(sweep_dir / f"results.{labels[0]}.csv") as handle:
        assert [row["status"] for row in csv.DictReader(handle)] == ["finished", "finished"]


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_every_grid_point_is_checked_before_any_run(tmp_path, teacher_dir, shared_data, cache_dir):
    """A typo'd value among good ones stops the sweep before its first run, naming the point and parameter."""
    path = two_point_sweep(tmp_path, teacher_dir, shared_data, cache_dir)
    sweep = yaml.safe_load(path.read_text())
    sweep["parameters"]["model.bits"]["values"] = ["8-8-8", "2-2-8", "2-2-5"]  # 5 bits is not supported
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    runs = tmp_path / "runs"
    (runs / "xsum" / "sweep").mkdir(parents=True)
    (runs / "xsum" / "sweep" / "results.csv").write_text("run_id,status\nold,finished\n")
    before = digest(runs)
    result = subprocess.run(sweep_command(path, runs, shared_data), cwd=PROJECT_ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert len(error_lines(result)) == 1, result.stderr
    assert "grid point 2-2-5_2-1" in error_lines(result)[0] and "model.bits=2-2-5" in error_lines(result)[0]
    assert "a_bits=5" in error_lines(result)[0]
    assert "fit ..." not in result.stdout  # no run started, not even the valid ones
    assert digest(runs) == before


@pytest.mark.slow  # a real sweep of two failing and one finishing fit (make test-slow)
def test_failed_runs_are_recorded_and_the_sweep_exits_non_zero_naming_them(tmp_path, teacher_dir, shared_data,
                                                                          cache_dir):
    """A run that fails only once it runs (here: a malformed validation file of one point's data folder) is
    recorded, the sweep carries on, and its exit code and one error line say how many failed and which."""
    bad = tmp_path / "bad_data"
    shutil.copytree(shared_data / "xsum", bad)
    (bad / "validation.jsonl").write_text((shared_data / "xsum" / "validation.jsonl").read_text().splitlines()[0]
                                          + "\n{\"id\": \"2\", \"document\": \"unterminated\n")
    path = two_point_sweep(tmp_path, teacher_dir, shared_data, cache_dir)
    sweep = yaml.safe_load(path.read_text())
    sweep["parameters"] = {"data.data_dir": {"values": [str(shared_data / "xsum"), str(bad)]},
                           "model.bits": {"value": "8-8-8"}, "model.depth": {"value": "2-1"}}
    sweep["command"] = [c for c in sweep["command"] if c != "--trainer.max_epochs=2"] + ["--trainer.max_steps=1"]
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    data_before = digest(shared_data / "xsum")
    command = sweep_command(path, tmp_path / "runs", shared_data)[:-2]  # the data folder is the parameter here
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = error_lines(result)
    assert len(errors) == 1, result.stderr
    with open(tmp_path / "runs" / "xsum" / "sweep" / "results.csv") as rows:
        table = {row["run_id"]: row for row in csv.DictReader(rows)}
    failed = next(run_id for run_id in table if "bad_data" in run_id)
    good = next(run_id for run_id in table if "bad_data" not in run_id)
    assert table[failed]["status"] == "failed" and "validation.jsonl:2" in table[failed]["error"]
    assert table[good]["status"] == "finished", table[good]["error"]
    assert errors[0].startswith("error: 1 of 2 runs failed: ") and failed in errors[0], errors[0]
    assert "validation.jsonl:2" in errors[0] and good not in errors[0]
    assert digest(shared_data / "xsum") == data_before


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


# -- several workers, one grid --------------------------------------------------------------------------
CLAIMER = """
import json, os, sys, time
from pathlib import Path
from dq_lightning.claims import Claim, acquire
go, done, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
while not go.exists():
    time.sleep(0.01)
won = [d for d in sys.argv[4:] if isinstance(acquire(Path(d)), Claim)]
out.write_text(json.dumps(won))
while not done.exists():  # hold the claims until every process has tried: a dead claimer's claim is stale
    time.sleep(0.05)
"""


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_each_point_is_claimed_by_exactly_one_of_several_processes(tmp_path):
    """Claims are atomic across processes, for fresh points and for stale claims taken over at the same time."""
    import json
    import socket

    dirs = [tmp_path / f"point{i}" for i in range(12)]
    for directory in dirs[6:]:  # half of them hold a claim of a process that died on this host
        directory.mkdir()
        (directory / "claim.json").write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid(),
                                                          "token": "old"}))
    go, done = tmp_path / "go", tmp_path / "done"
    outputs = [tmp_path / f"won{i}.json" for i in range(4)]
    processes = [subprocess.Popen([sys.executable, "-c", CLAIMER, str(go), str(done), str(out), *map(str, dirs)],
                                  cwd=PROJECT_ROOT) for out in outputs]
    try:
        time.sleep(2)  # all four started and waiting
        go.touch()
        deadline = time.time() + 120
        while not all(out.exists() for out in outputs):
            assert time.time() < deadline and all(p.poll() is None for p in processes)
            time.sleep(0.1)
        won = [json.loads(out.read_text()) for out in outputs]
    finally:
        done.touch()
        for process in processes:
            process.wait(timeout=60)
    winners = sorted(d for w in won for d in w)
    assert winners == sorted(map(str, dirs)), won  # every point claimed once: none twice, none lost


def test_stale_claims_are_taken_over_only_when_their_process_is_known_dead(tmp_path):
    import json
    import socket

    from dq_lightning import claims
    from dq_lightning.claims import Claim, _process_start, acquire

    host = socket.gethostname()
    dead = tmp_path / "dead"
    dead.mkdir()
    (dead / "claim.json").write_text(json.dumps({"host": host, "pid": dead_pid()}))
    claim = acquire(dead)
    assert isinstance(claim, Claim) and claim.took_over["host"] == host
    assert acquire(dead)["pid"] == os.getpid()  # now held by this live process: not claimable again
    claim.release()
    assert not (dead / "claim.json").exists()

    recycled = tmp_path / "recycled"  # a live pid whose process started at another time: a recycled pid
    recycled.mkdir()
    (recycled / "claim.json").write_text(json.dumps({"host": host, "pid": os.getpid(),
                                                     "pid_start": str(int(_process_start(os.getpid())) - 1)}))
    assert isinstance(acquire(recycled), Claim)

    remote = tmp_path / "remote"  # another host's pid cannot be checked from here: its heartbeat tells
    remote.mkdir()
    (remote / "claim.json").write_text(json.dumps({"host": host + "-elsewhere", "pid": dead_pid()}))
    held = json.loads((remote / "claim.json").read_text())
    assert acquire(remote) == held and (remote / "claim.json").read_text() == json.dumps(held)
    silent = time.time() - claims.STALE_AFTER_S - 5  # that host stopped touching its claim: it died
    os.utime(remote / "claim.json", (silent, silent))
    taken = acquire(remote)
    assert isinstance(taken, Claim) and taken.took_over == held
    taken.release()


def test_a_held_claim_is_touched_until_it_is_released(tmp_path, monkeypatch):
    from dq_lightning import claims

    monkeypatch.setattr(claims, "HEARTBEAT_S", 0.05)
    claim = claims.acquire(tmp_path)
    path = tmp_path / "claim.json"
    old = time.time() - 3600
    os.utime(path, (old, old))
    deadline = time.time() + 10
    while path.stat().st_mtime < old + 1800:
        assert time.time() < deadline, "the heartbeat never touched the claim"
        time.sleep(0.02)
    claim.release()
    assert not path.exists()


FAKE_FIT = """
import json, os, sys, time
args = sys.argv[1:]
root = next(a.split("=", 1)[1] for a in args if a.startswith("--trainer.default_root_dir="))
ckpt = next((a.split("=", 1)[1] for a in args if a.startswith("--ckpt_path=")), None)
log = os.environ["FAKE_FIT_LOG"]
with open(log, "a") as out:
    out.write(json.dumps({"stage": args[0], "root": root, "worker": os.getppid(), "pid": os.getpid(),
                          "ckpt_path": ckpt, "threads": os.environ.get("OMP_NUM_THREADS")}) + "\\n")
# The first runs wait for the other worker (another process, or with --workers another run of this one): the
# two really run at once.
together = os.environ.get("FAKE_FIT_TOGETHER", "worker")
deadline = time.time() + 60
while time.time() < deadline:
    with open(log) as lines:
        if len({json.loads(line)[together] for line in lines}) >= int(os.environ.get("FAKE_FIT_WORKERS", "1")):
            break
    time.sleep(0.1)
time.sleep(float(os.environ.get("FAKE_FIT_SECONDS", "0.3")))
os.makedirs(root, exist_ok=True)
with open(os.path.join(root, "fit_metrics.json"), "w") as out:
    json.dump({"metrics": {"val/rougeL": 1.0}}, out)
with open(os.path.join(root, "test_metrics.json"), "w") as out:  # as test_after_fit does
    json.dump({"metrics": {"test/rougeL": 1.0}}, out)
"""


def fake_sweep(tmp_path, teacher_dir, bits=("8-8-8", "2-2-8", "32-32-32"), depths=("2-1", "1-1")):
    """A demo sweep whose runs are a quick stand-in for `fit` (the grid is still checked with the real CLI)."""
    program = tmp_path / "fake_fit.py"
    program.write_text(FAKE_FIT)
    path = tmp_path / "fake.yaml"
    path.write_text(yaml.safe_dump({
        "method": "grid", "metric": {"name": "val/rougeL"},
        "parameters": {"model.bits": {"values": list(bits)}, "model.depth": {"values": list(depths)}},
        "command": ["python", str(program), "fit", "--config", "experiments/demo/dq-tiny.yaml",
                    f"--model.teacher={teacher_dir}", f"--data.tokenizer={teacher_dir}", "${args}"]},
        sort_keys=False))
    return path


def fake_runs(log):
    import json

    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.slow  # real sweep workers and their fits: kill-and-resume, two workers (make test-slow)
def test_two_concurrent_workers_split_the_grid_without_training_a_point_twice(tmp_path, teacher_dir):
    path = fake_sweep(tmp_path, teacher_dir)
    runs, log = tmp_path / "runs", tmp_path / "fits.jsonl"
    env = {**os.environ, "WANDB_MODE": "disabled", "FAKE_FIT_LOG": str(log), "FAKE_FIT_WORKERS": "2"}
    command = [sys.executable, "-m", "dq_lightning", "sweep", "--task", "demo", "--sweep-file", str(path),
               "--runs", str(runs)]
    workers = [subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    outputs = [worker.communicate(timeout=600) for worker in workers]
    report = "\n".join(out + err for out, err in outputs)
    assert [worker.returncode for worker in workers] == [0, 0], report
    fits = fake_runs(log)
    sweep_dir = runs / "demo" / "sweep"
    points = [f"{b}_{d}" for b in ("8-8-8", "2-2-8", "32-32-32") for d in ("2-1", "1-1")]
    trained = sorted(Path(fit["root"]).name for fit in fits)
    assert trained == sorted(points), report  # each point once: none twice, none lost
    assert len({fit["worker"] for fit in fits}) == 2, report  # both workers trained
    assert "being trained by another worker" in report
    for point in points:
        assert '"finished"' in (sweep_dir / point / "status.json").read_text()
        assert not (sweep_dir / point / "claim.json").exists()
    with open(sweep_dir / "results.csv") as rows:  # the last report holds every result
        assert {row["run_id"]: row["status"] for row in csv.DictReader(rows)} == dict.fromkeys(points, "finished")


@pytest.mark.slow  # real sweep workers and their fits: kill-and-resume, two workers (make test-slow)
def test_one_sweep_with_two_workers_trains_two_points_at_once_each_once(tmp_path, teacher_dir, monkeypatch):
    path = fake_sweep(tmp_path, teacher_dir)
    runs, log = tmp_path / "runs", tmp_path / "fits.jsonl"
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = {**os.environ, "WANDB_MODE": "disabled", "FAKE_FIT_LOG": str(log), "FAKE_FIT_WORKERS": "2",
           "FAKE_FIT_TOGETHER": "pid"}
    done = subprocess.run([sys.executable, "-m", "dq_lightning", "sweep", "--task", "demo", "--sweep-file",
                           str(path), "--runs", str(runs), "--workers", "2"], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    fits = fake_runs(log)
    points = [f"{b}_{d}" for b in ("8-8-8", "2-2-8", "32-32-32") for d in ("2-1", "1-1")]
    assert sorted(Path(fit["root"]).name for fit in fits) == sorted(points), report  # each once, none lost
    assert "2 at once" in report and "being trained by another worker" not in report  # its own threads: silent
    from dq_lightning.sweep.workers import available_cores

    assert {fit["threads"] for fit in fits} == {str(max(1, available_cores() // 2))}
    with open(runs / "demo" / "sweep" / "results.csv") as rows:
        assert {row["run_id"]: row["status"] for row in csv.DictReader(rows)} == dict.fromkeys(points, "finished")


@pytest.mark.slow  # real sweep workers and their fits: kill-and-resume, two workers (make test-slow)
def test_a_terminated_sweep_with_two_workers_stops_both_runs_and_releases_both_claims(tmp_path, teacher_dir):
    path = fake_sweep(tmp_path, teacher_dir, bits=("8-8-8", "2-2-8"), depths=("2-1",))
    runs, log = tmp_path / "runs", tmp_path / "fits.jsonl"
    command = [sys.executable, "-m", "dq_lightning", "sweep", "--task", "demo", "--sweep-file", str(path),
               "--runs", str(runs), "--workers", "2"]
    env = {**os.environ, "WANDB_MODE": "disabled", "FAKE_FIT_LOG": str(log), "FAKE_FIT_SECONDS": "300"}
    worker = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    deadline = time.time() + 300
    while len(fake_runs(log)) < 2:
        assert worker.poll() is None and time.time() < deadline, worker.communicate()
        time.sleep(0.2)
    worker.send_signal(signal.SIGTERM)
    out, err = worker.communicate(timeout=120)
    assert worker.returncode == 143 and "Traceback" not in err, out + err
    for point in ("8-8-8_2-1", "2-2-8_2-1"):
        run_dir = runs / "demo" / "sweep" / point
        assert not (run_dir / "claim.json").exists()
        assert '"interrupted"' in (run_dir / "status.json").read_text()
    for fit in fake_runs(log):
        assert not Path(f"/proc/{fit['pid']}").exists()  # stopped and reaped, not left training


def test_workers_setting(monkeypatch):
    from dq_lightning.errors import UserError
    from dq_lightning.sweep import runner, workers

    monkeypatch.setattr(workers, "available_cores", lambda: 8)
    monkeypatch.setattr("dq_lightning.devices.cuda_devices", lambda: 0)
    assert runner.resolve_workers("auto", points=6, gpus=None) == 6  # no more workers than points
    assert runner.resolve_workers("auto", points=20, gpus=None) == 8
    assert runner.resolve_workers("auto", points=20, gpus=2) == 1
    monkeypatch.setattr("dq_lightning.devices.cuda_devices", lambda: 4)
    assert runner.resolve_workers("auto", points=20, gpus=None) == 1  # the runs take the GPUs
    assert runner.resolve_workers("3", points=20, gpus=None) == 3
    for value, gpus, named in (("0", None, "--workers 0"), ("two", None, "--workers two"),
                               ("2", 4, "with --gpus 4")):
        with pytest.raises(UserError, match=named):
            runner.resolve_workers(value, points=6, gpus=gpus)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")  # the user's own setting is kept
    env = runner.thread_environment(3)
    assert env["OMP_NUM_THREADS"] == "2" and env["MKL_NUM_THREADS"] == "3"
    assert runner.thread_environment(1) is None


@pytest.mark.slow  # real sweep workers and their fits: kill-and-resume, two workers (make test-slow)
def test_a_terminated_worker_releases_its_claim_and_stops_its_run(tmp_path, teacher_dir):
    """SIGTERM to the worker alone (a scheduler preempting it): its run is stopped, recorded as interrupted and
    its claim released, so any worker, on any host, can take the point; the next start trains it."""
    path = fake_sweep(tmp_path, teacher_dir, bits=("8-8-8",), depths=("2-1",))
    runs, log = tmp_path / "runs", tmp_path / "fits.jsonl"
    command = [sys.executable, "-m", "dq_lightning", "sweep", "--task", "demo", "--sweep-file", str(path),
               "--runs", str(runs)]
    env = {**os.environ, "WANDB_MODE": "disabled", "FAKE_FIT_LOG": str(log), "FAKE_FIT_SECONDS": "300"}
    worker = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    deadline = time.time() + 300
    while not fake_runs(log):
        assert worker.poll() is None and time.time() < deadline, worker.communicate()
        time.sleep(0.2)
    run_dir = runs / "demo" / "sweep" / "8-8-8_2-1"
    assert (run_dir / "claim.json").exists()
    worker.send_signal(signal.SIGTERM)
    out, err = worker.communicate(timeout=120)
    assert worker.returncode == 143 and "Traceback" not in err, out + err
    assert not (run_dir / "claim.json").exists()
    assert '"interrupted"' in (run_dir / "status.json").read_text()
    child = fake_runs(log)[0]["pid"]
    assert not Path(f"/proc/{child}").exists()  # stopped and reaped by the worker, not left training

    again = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
                           env={**env, "FAKE_FIT_SECONDS": "0"})
    assert again.returncode == 0, again.stdout + again.stderr
    assert '"finished"' in (run_dir / "status.json").read_text() and len(fake_runs(log)) == 2


# -- unreadable checkpoints -----------------------------------------------------------------------------
STUDENT = "dq_lightning.modules.student.DQStudentModule"


def test_an_unreadable_last_checkpoint_is_moved_aside_and_the_run_resumes_from_the_previous_good_one(
        tmp_path, teacher_dir):
    import torch

    path = fake_sweep(tmp_path, teacher_dir, bits=("8-8-8",), depths=("2-1",))
    runs, log = tmp_path / "runs", tmp_path / "fits.jsonl"
    run_dir = runs / "demo" / "sweep" / "8-8-8_2-1"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "status.json").write_text('{"status": "running", "attempts": 1}')  # a killed sweep's run
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 cut short by a full disk")
    good = run_dir / "checkpoints" / "epoch=0-step=4.ckpt"
    torch.save({"state_dict": {}, "module_class": STUDENT, "global_step": 4}, good)
    before = digest(run_dir)
    command = [sys.executable, "-m", "dq_lightning", "sweep", "--task", "demo", "--sweep-file", str(path),
               "--runs", str(runs)]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "WANDB_MODE": "disabled", "FAKE_FIT_LOG": str(log)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and not error_lines(result), result.stderr
    moved = list((run_dir / "checkpoints").glob("last.ckpt.corrupt-*"))
    assert len(moved) == 1
    lines = [line for line in result.stdout.splitlines() if "last.ckpt" in line and "moved it to" in line]
    assert len(lines) == 1 and moved[0].name in lines[0] and "resuming from epoch=0-step=4.ckpt" in lines[0], \
        result.stdout
    assert fake_runs(log)[0]["ckpt_path"] == str(good)
    after = digest(run_dir)
    assert after[f"checkpoints/{moved[0].name}"] == before["checkpoints/last.ckpt"]  # kept, byte for byte
    assert after["checkpoints/epoch=0-step=4.ckpt"] == before["checkpoints/epoch=0-step=4.ckpt"]


def test_resume_checkpoint_choices(tmp_path):
    """last.ckpt when it loads; else the newest readable other checkpoint; else none (from scratch)."""
    import torch

    from dq_lightning.sweep.runner import resume_checkpoint

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    said = []
    torch.save({"state_dict": {}, "module_class": STUDENT}, checkpoints / "last.ckpt")
    assert resume_checkpoint(tmp_path, STUDENT, said.append) == checkpoints / "last.ckpt" and not said
    torch.save({"state_dict": {}, "module_class": "dq_lightning.modules.teacher.TeacherModule"}, checkpoints / "last.ckpt")
    (checkpoints / "epoch=0-step=4.ckpt").write_bytes(b"")  # unreadable too: moved aside as well
    assert resume_checkpoint(tmp_path, STUDENT, said.append) is None
    assert "TeacherModule" in said[0] and "from scratch" in said[0]
    assert sorted(p.name.split(".corrupt-")[0] for p in checkpoints.iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]
    assert not list(checkpoints.glob("*.ckpt"))


@pytest.mark.slow  # real sweep workers and their fits: kill-and-resume, two workers (make test-slow)
@pytest.mark.timeout(900)
def test_an_empty_last_checkpoint_does_not_fail_every_restart(tmp_path, teacher_dir, shared_data, cache_dir):
    """A real run whose last.ckpt is empty (a full disk) starts again from scratch instead of failing on it."""
    path = two_point_sweep(tmp_path, teacher_dir, shared_data, cache_dir)
    sweep = yaml.safe_load(path.read_text())
    sweep["parameters"]["model.bits"] = {"value": "2-2-8"}
    sweep["command"] = [c for c in sweep["command"] if c != "--trainer.max_epochs=2"] + ["--trainer.max_steps=2"]
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    runs = tmp_path / "runs"
    run_dir = runs / "xsum" / "sweep" / "2-2-8_2-1"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "status.json").write_text('{"status": "running", "attempts": 1}')
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    result = subprocess.run(sweep_command(path, runs, shared_data), cwd=PROJECT_ROOT, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stdout + result.stderr + (run_dir / "run.log").read_text()[-3000:]
    assert "last.ckpt is empty (0 bytes): moved it to last.ckpt.corrupt-" in result.stdout
    assert "starts again from scratch" in result.stdout
    assert '"finished"' in (run_dir / "status.json").read_text()
    assert (run_dir / "checkpoints" / "last.ckpt").stat().st_size > 0
    assert [p.stat().st_size for p in (run_dir / "checkpoints").glob("last.ckpt.corrupt-*")] == [0]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_concurrent_workers_train_a_real_grid_once(tmp_path, teacher_dir, shared_data, cache_dir):
    """Two offline sweep workers started together on one tiny grid: each point trained by exactly one of them."""
    path = two_point_sweep(tmp_path, teacher_dir, shared_data, cache_dir)
    runs = tmp_path / "runs"
    env = {**os.environ, "WANDB_MODE": "offline"}
    workers = [subprocess.Popen(sweep_command(path, runs, shared_data), cwd=PROJECT_ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [worker.communicate(timeout=800)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], "\n".join(outputs)
    sweep_dir = runs / "xsum" / "sweep"
    for point in ("8-8-8_2-1", "2-2-8_2-1"):
        log = (sweep_dir / point / "run.log").read_text()
        assert log.count(" fit --config ") == 1, log[-3000:]  # one fit process for the point, by one worker
        assert '"finished"' in (sweep_dir / point / "status.json").read_text()
        assert sum(f"{point}: fit ..." in output for output in outputs) == 1, "\n".join(outputs)
    assert [sum(": fit ..." in line for line in output.splitlines()) for output in outputs] == [1, 1], \
        "\n".join(outputs)
    with open(sweep_dir / "results.csv") as rows:
        assert [row["status"] for row in csv.DictReader(rows)] == ["finished", "finished"]


# -- checked before anything trains ---------------------------------------------------------------------
def test_make_sweep_without_data_while_offline_stops_before_the_teacher(tmp_path):
    """`make sweep TASK=xsum` offline and without DATA_DIR: one error line naming DATA_DIR, nothing trained.

    Run from a scratch directory (sweeps/ and experiments/ linked in), so that nothing could reach runs/."""
    for name in ("sweeps", "experiments"):
        (tmp_path / name).symlink_to(PROJECT_ROOT / name)
    make = shutil.which("make")
    assert make, "make is needed for `make sweep`"
    result = subprocess.run([make, "-f", str(PROJECT_ROOT / "Makefile"), "-o", ".venv/.installed",
                             f"PY={sys.executable}", f"RUNS={tmp_path / 'runs' / 'xsum'}", "sweep", "TASK=xsum"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = error_lines(result)
    assert len(errors) == 1 and "DATA_DIR" in errors[0] and "--data-dir" in errors[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["experiments", "sweeps"]  # no teacher, no runs


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(cuda_available(), reason="this machine has GPUs: a paper-scale sweep would start")
def test_gpu_sweeps_are_refused_up_front_on_a_machine_without_gpus(tmp_path, teacher_dir, shared_data, cache_dir):
    runs = tmp_path / "runs"
    paper = subprocess.run([sys.executable, "-m", "dq_lightning", "sweep", "--task", "xsum", "--scale", "paper",
                            "--data-dir", str(shared_data / "xsum"), "--runs", str(runs)],
                           cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert paper.returncode == 2 and "Traceback" not in paper.stderr, paper.stderr
    assert len(error_lines(paper)) == 1, paper.stderr
    assert "experiments/xsum/dq-paper.yaml (trainer.accelerator: gpu) asks for a GPU" in error_lines(paper)[0]
    assert "SCALE=tiny" in error_lines(paper)[0]

    path = two_point_sweep(tmp_path, teacher_dir, shared_data, cache_dir)  # one grid point asks for a GPU
    sweep = yaml.safe_load(path.read_text())
    sweep["parameters"]["trainer.accelerator"] = {"values": ["cpu", "gpu"]}
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    point = subprocess.run(sweep_command(path, runs, shared_data), cwd=PROJECT_ROOT, capture_output=True,
                           text=True, timeout=600)
    assert point.returncode == 2 and "Traceback" not in point.stderr, point.stderr
    assert len(error_lines(point)) == 1, point.stderr
    assert "grid point 8-8-8_2-1_gpu" in error_lines(point)[0], error_lines(point)[0]
    assert "parameter trainer.accelerator=gpu asks for a GPU" in error_lines(point)[0]
    assert "fit ..." not in point.stdout and not runs.exists()


def test_online_sweep_hands_this_machines_flags_to_the_agents_runs(tmp_path, monkeypatch):
    """`make sweep GPUS=N DATA_DIR=...` logged in to W&B: the flags reach the runs through the agent's env."""
    import wandb

    from dq_lightning import cluster
    from dq_lightning.sweep import runner

    calls = []
    monkeypatch.setattr(wandb, "sweep", lambda sweep, project: "abc123")
    monkeypatch.setattr(runner.subprocess, "check_call", lambda command, env: calls.append((command, env)))
    extra = ["--trainer.devices=4", "--data.data_dir=/data/x sum"]
    runner.run_online({"parameters": {}}, tmp_path / "sweep", extra)
    (command, env), = calls
    assert command[-1] == "abc123" and (tmp_path / "sweep" / "sweep_id").read_text().strip() == "abc123"
    assert env["DQ_SWEEP_DIR"] == str(tmp_path / "sweep")
    for name in ("DQ_SWEEP_DIR", cluster.AGENT_ARGS_ENV):  # as the agent starts a run
        monkeypatch.setenv(name, env[name])
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    assert cluster.with_agent_args(["fit", "--config", "c.yaml"]) == ["fit", "--config", "c.yaml", *extra]


# -- one check, run in full by --preflight and by the sweep (issue 40) -------------------------------------------
def preflight_sweep(tmp_path, change):
    """The xsum tiny grid (two points) whose teacher is the one `make teacher` would train under `runs`, not
    there yet, with `change` applied to the sweep file."""
    sweep = yaml.safe_load((PROJECT_ROOT / "sweeps" / "xsum-tiny.yaml").read_text())
    runs = tmp_path / "runs"
    sweep["parameters"] = {"model.bits": {"values": ["8-8-8", "2-2-8"]}, "model.depth": {"value": "6-3"}}
    sweep["command"].insert(sweep["command"].index("${args}"), f"--model.teacher={runs}/xsum/teacher-tiny/hf")
    change(sweep)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path, runs


PREFLIGHT_CASES = {
    "unknown parameter": (lambda s: s["parameters"].update({"model.w_bitz": {"values": [2]}}),
                          ["unknown parameter 'model.w_bitz'"]),
    # The teacher make would train has 6 decoder layers (the tiny preset): checked against a stand-in of it.
    "value the built student refuses": (lambda s: s["parameters"].update({"model.depth": {"values": ["6-3", "6-9"]}}),
                                        ["grid point 8-8-8_6-9", "model.depth=6-9"]),
    "a config that does not exist": (lambda s: s["command"].__setitem__(s["command"].index("--config") + 1,
                                                                        "experiments/xsum/dq-tinyy.yaml"),
                                     ["--config experiments/xsum/dq-tinyy.yaml: no such file"]),
    # The sweep names every run's W&B run (--trainer.logger.init_args.name): with the logger off, every run failed.
    "a flag that makes every run fail": (lambda s: s["command"].insert(s["command"].index("${args}"),
                                                                       "--trainer.logger=false"),
                                         ["--trainer.logger.init_args.name", "--trainer.logger=false"]),
}


@pytest.mark.parametrize("case", list(PREFLIGHT_CASES))
def test_preflight_runs_the_sweeps_whole_check_before_the_teacher_exists(case, tmp_path, shared_data):
    change, fragments = PREFLIGHT_CASES[case]
    path, runs = preflight_sweep(tmp_path, change)
    result = subprocess.run([*sweep_command(path, runs, shared_data), "--preflight"], cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=600, env={**os.environ, "WANDB_MODE": "offline"})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and len(error_lines(result)) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines(result)[0], error_lines(result)[0]
    assert not runs.exists()


def test_preflight_passes_a_good_grid_checked_against_a_stand_in_of_the_teacher(tmp_path, shared_data):
    path, runs = preflight_sweep(tmp_path, lambda sweep: None)
    result = subprocess.run([*sweep_command(path, runs, shared_data), "--preflight"], cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=600, env={**os.environ, "WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "against a stand-in of the teacher" in result.stdout and "every run's commands checked" in result.stdout
    assert not runs.exists()


def test_a_point_that_failed_since_a_worker_started_is_not_tried_again_by_it(tmp_path, monkeypatch, capsys):
    """Every worker of a sweep used to try a failing point in turn: only workers started after the failure
    (the sweep run again) retry it."""
    from dq_lightning.sweep.runner import LocalSweep
    from dq_lightning.sweep.spec import SweepPoint

    points = [SweepPoint({"model.bits": bits}, bits, [f"--model.bits={bits}"]) for bits in ("8-8-8", "2-2-8")]
    sweep = {"command": ["python", "-m", "dq_lightning", "fit", "${args}"], "metric": {"name": "val/rougeL"}}
    local = LocalSweep(sweep, points, tmp_path, "grid", [], {})
    (tmp_path / "8-8-8").mkdir()
    failed = {"status": "failed", "stage": "fit", "error": "error: it failed", "updated_at": local.started + 1}
    (tmp_path / "8-8-8" / "status.json").write_text(json.dumps(failed))
    ran = []
    monkeypatch.setattr(LocalSweep, "run_point", lambda self, point, *args: ran.append(point.run_id))
    outcome = local.run()
    assert ran == ["2-2-8"]
    assert outcome.failed == [("8-8-8", "fit", "error: it failed")] and outcome.finished == ["2-2-8"]
    assert "failed in another worker since this one started" in capsys.readouterr().out
    failed["updated_at"] = local.started - 1  # failed before this worker started: retried
    (tmp_path / "8-8-8" / "status.json").write_text(json.dumps(failed))
    assert LocalSweep(sweep, points, tmp_path, "grid", [], {}).run().finished == ["8-8-8", "2-2-8"]
