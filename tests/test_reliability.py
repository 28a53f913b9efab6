"""Crash, resume, divergence and unsafe files: what must never cost a sweep."""

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from dq_lightning.config_files import read_composed
from tests.conftest import PROJECT_ROOT, run_cli


def quick_config(tmp_path, shared_data, cache_dir, every_n_steps, **trainer):
    """teacher-tiny.yaml made small, logging every step's loss to CSV."""
    config = read_composed(PROJECT_ROOT / "experiments/xsum/teacher-tiny.yaml")
    config["model"]["init_args"].update(model="micro", generation={"num_beams": 1, "max_length": 6})
    config["data"]["init_args"].update(data_dir=str(shared_data / "xsum"), cache_dir=str(cache_dir), vocab_size=500,
                                       max_train_samples=64, max_eval_samples=4, max_source_length=64,
                                       max_target_length=16, batch_size=4)
    config["trainer"].update({"limit_val_batches": 0, "log_every_n_steps": 1, "enable_progress_bar": False, **trainer})
    config["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                   "init_args": {"save_dir": "${...default_root_dir}", "name": "csv"}}
    config["trainer"]["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                       "init_args": {"dirpath": "${....default_root_dir}/checkpoints", "save_top_k": 0,
                                                     "save_last": True, "every_n_train_steps": every_n_steps}}]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def step_losses(root) -> dict[int, float]:
    losses = {}
    for metrics in sorted(root.glob("csv/version_*/metrics.csv")):
        with open(metrics) as rows:
            for row in csv.DictReader(rows):
                if row.get("train/loss"):
                    losses[int(row["step"])] = float(row["train/loss"])
    return losses


def fit_killed_after_first_checkpoint(config, root, *flags, linger=0.5):
    """Starts a fit, SIGKILLs its whole process group (every DDP rank) `linger` seconds after its first
    checkpoint, and returns the step of the checkpoint left on disk."""
    command = [sys.executable, "-m", "dq_lightning", "fit", "--config", str(config),
               f"--trainer.default_root_dir={root}", *flags]
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    last = root / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(linger)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return torch.load(last, weights_only=True, map_location="cpu")["global_step"]


def assert_resumed_exactly(tmp_path, config, max_steps, steps_per_epoch, *flags, linger=0.5):
    whole = run_cli("fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path / 'whole'}", *flags)
    assert whole.returncode == 0, whole.stderr[-2000:]
    reference = step_losses(tmp_path / "whole")
    assert len(reference) >= max_steps - 1

    root = tmp_path / "killed"
    resumed_from = fit_killed_after_first_checkpoint(config, root, *flags, linger=linger)
    assert 0 < resumed_from < max_steps
    assert resumed_from % steps_per_epoch != 0  # mid-epoch: the data position matters
    resumed = run_cli("fit", "--config", str(config), f"--trainer.default_root_dir={root}",
                      f"--ckpt_path={root / 'checkpoints' / 'last.ckpt'}", *flags)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = {step: loss for step, loss in step_losses(root).items() if step >= resumed_from}
    assert max(after) == max(reference) and len(after) == max(reference) - resumed_from + 1
    for step, loss in after.items():
        assert loss == pytest.approx(reference[step], rel=1e-5, abs=1e-6), (step, resumed_from)


@pytest.mark.slow  # three fits, one killed mid-epoch: `make test-slow`
@pytest.mark.timeout(900)
def test_sigkilled_fit_resumes_exactly(tmp_path, shared_data, cache_dir):
    # 64 rows / batch 4 = 16 steps per epoch; 40 steps cross two epoch boundaries; checkpoints every 6 steps
    # never fall on an epoch boundary.
    config = quick_config(tmp_path, shared_data, cache_dir, every_n_steps=6, max_steps=40)
    assert_resumed_exactly(tmp_path, config, 40, 16)


@pytest.mark.slow  # three 2-process fits, one killed mid-epoch: `make test-slow`
@pytest.mark.timeout(900)
def test_sigkilled_two_process_ddp_fit_resumes_exactly(tmp_path, shared_data, cache_dir):
    # Lightning swaps in a DistributedSampler, so the saved data position must reach the loader it iterates,
    # and each rank's dropout RNG must come back as its own. Rank 0's loss at every step after the resume
    # depends on both ranks' earlier batches and dropout (through the averaged gradients).
    # 64 rows / 2 ranks / batch 4 = 8 steps per epoch; checkpoints every 3 steps are never on a boundary.
    # A 2-process step takes tens of milliseconds: kill soon after the first checkpoint, before the run ends.
    config = quick_config(tmp_path, shared_data, cache_dir, every_n_steps=3, max_steps=32)
    assert_resumed_exactly(tmp_path, config, 32, 8, "--trainer.accelerator=cpu", "--trainer.devices=2",
                           "--trainer.strategy=ddp", linger=0.05)


def test_nonfinite_loss_stops_with_the_step_named_and_keeps_the_checkpoint(tmp_path, shared_data, cache_dir):
    config = quick_config(tmp_path, shared_data, cache_dir, every_n_steps=1, max_steps=20)
    root = tmp_path / "diverged"
    result = run_cli("fit", "--config", str(config), f"--trainer.default_root_dir={root}", "--model.lr=1e30",
                     "--model.warmup_ratio=0", "--trainer.gradient_clip_val=null")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "non-finite loss at step" in error[0] and "train/loss=" in error[0], result.stderr
    failed_step = int(error[0].split("at step ")[1].split()[0])
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert checkpoint["global_step"] <= failed_step  # nothing was saved from the bad step


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_code_is_refused_not_executed(tmp_path, shared_data, cache_dir):
    config = quick_config(tmp_path, shared_data, cache_dir, every_n_steps=1, max_steps=2)
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    malicious = tmp_path / "evil.ckpt"
    with open(malicious, "wb") as out:
        pickle.dump({"state_dict": {}, "payload": payload}, out)
    result = run_cli("fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path / 'run'}",
                     f"--ckpt_path={malicious}")
    assert result.returncode != 0
    assert not marker.exists(), "loading a checkpoint executed code"
    assert "weights_only" in result.stderr or "Weights only" in result.stderr


# -- every way a fit can stop resumes exactly --------------------------------------------------------------------
def batch_order(path) -> dict[int, list[int]]:
    """{step: the examples of its batch}, the last record of each step (a resumed run trains some steps again)."""
    order = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        order[record["step"]] = record["examples"]
    return order


STOPS = {  # name: (flags of the stopped fit, the step it stops after)
    "SIGKILL": (["--trainer.callbacks+=tests.stops.StopAt", "--trainer.callbacks.step=12",
                 "--trainer.callbacks.how=KILL"], 12),
    "SIGINT": (["--trainer.callbacks+=tests.stops.StopAt", "--trainer.callbacks.step=12",
                "--trainer.callbacks.how=INT"], 12),
    "an exception in a callback": (["--trainer.callbacks+=tests.stops.StopAt", "--trainer.callbacks.step=12",
                                    "--trainer.callbacks.how=raise"], 12),
    # Before the first periodic save: last.ckpt is the one Lightning writes when the fit ends, mid-epoch.
    "max_steps": (["--trainer.max_steps=4"], 4),
    # Stops at the end of the first step after 2 s of training: the sleep at step 3 makes that step 3 (or 4).
    "max_time": (["--trainer.max_time=00:00:00:02", "--trainer.callbacks+=tests.stops.StopAt",
                  "--trainer.callbacks.step=3", "--trainer.callbacks.how=sleep", "--trainer.callbacks.seconds=3"], 4),
}


@pytest.mark.slow  # eleven small fits: `make test-slow`
@pytest.mark.timeout(1800)
def test_every_way_a_fit_stops_resumes_as_if_it_had_not(tmp_path, shared_data, cache_dir):
    """A fit stopped by SIGKILL, SIGINT, an exception in a callback, --trainer.max_steps or --trainer.max_time,
    then resumed with the plain command and --ckpt_path=last, trains the same batches in the same order with
    the same losses as one that never stopped. 64 rows / batch 4: 16 steps an epoch, 2 epochs; last.ckpt every
    5 steps, never on an epoch boundary; validation every epoch (it must not shift the training RNG)."""
    config = quick_config(tmp_path, shared_data, cache_dir, every_n_steps=5, max_epochs=2, limit_val_batches=1,
                          check_val_every_n_epoch=1, num_sanity_val_steps=0)

    def fit(root, *flags):
        log = ["--trainer.callbacks+=tests.stops.BatchLog", f"--trainer.callbacks.path={root / 'batches.jsonl'}"]
        return run_cli("fit", "--config", str(config), f"--trainer.default_root_dir={root}", *log, *flags)

    whole = fit(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    reference, order = step_losses(tmp_path / "whole"), batch_order(tmp_path / "whole" / "batches.jsonl")
    assert sorted(reference) == sorted(order) == list(range(32))
    assert len({tuple(examples) for examples in order.values()}) == 32  # two shuffled epochs, no repeats
    for name, (flags, stop_step) in STOPS.items():
        root = tmp_path / name.replace(" ", "_")
        stopped = fit(root, *flags)
        assert (stopped.returncode == 0) == name.startswith("max_"), (name, stopped.stderr[-3000:])
        saved = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
        assert 0 < saved["global_step"] <= stop_step and saved["global_step"] % 16, (name, saved["global_step"])
        resumed = fit(root, "--ckpt_path=last")
        assert resumed.returncode == 0, (name, resumed.stderr[-3000:])
        assert batch_order(root / "batches.jsonl") == order, name
        losses = step_losses(root)
        assert sorted(losses) == sorted(reference), name
        for step, loss in losses.items():
            assert loss == pytest.approx(reference[step], rel=1e-5, abs=1e-6), (name, step, saved["global_step"])


@pytest.mark.slow  # one small fit, in a fresh interpreter as the slow tests' commands are
def test_a_fit_stops_on_sigint_also_when_the_suite_runs_with_sigint_ignored(tmp_path, shared_data, cache_dir):
    """A shell starts a background job (`make test-slow &`) with SIGINT ignored, and a child inherits that: the
    SIGINT case above then trained to the end and passed as a fit that never stopped. Each command starts with
    SIGINT at its default, as a typed one does."""
    config = quick_config(tmp_path, shared_data, cache_dir, every_n_steps=5, max_epochs=1, num_sanity_val_steps=0)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stopped = run_cli("fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path / 'run'}",
                          *STOPS["SIGINT"][0])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stopped.returncode != 0, stopped.stderr[-3000:]
    assert max(step_losses(tmp_path / "run")) < 15  # stopped after step 12 of 16
