"""Crash, resume, divergence and unsafe files: what must never cost a sweep."""

import csv
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from tests.conftest import PROJECT_ROOT, run_cli


def quick_config(tmp_path, shared_data, cache_dir, every_n_steps, **trainer):
    """teacher-tiny.yaml made small, logging every step's loss to CSV."""
    config = yaml.safe_load((PROJECT_ROOT / "experiments/xsum/teacher-tiny.yaml").read_text())
    config["model"]["init_args"].update(model="micro", generation={"num_beams": 1, "max_length": 6})
    config["data"]["init_args"].update(data_dir=str(shared_data / "xsum"), cache_dir=str(cache_dir), vocab_size=500,
                                       max_train_samples=64, max_eval_samples=4, max_source_length=64,
                                       max_target_length=16, batch_size=4)
    config["trainer"].update(limit_val_batches=0, log_every_n_steps=1, enable_progress_bar=False, **trainer)
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


@pytest.mark.slow  # three fits, one killed mid-epoch: `make test-slow`
@pytest.mark.timeout(900)
def test_sigkilled_fit_resumes_exactly(tmp_path, shared_data, cache_dir):
    # 64 rows / batch 4 = 16 steps per epoch; 40 steps cross two epoch boundaries.
    config = quick_config(tmp_path, shared_data, cache_dir, every_n_steps=6, max_steps=40)
    whole = run_cli("fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-2000:]
    reference = step_losses(tmp_path / "whole")
    assert len(reference) >= 39

    root = tmp_path / "killed"
    command = [sys.executable, "-m", "dq_lightning", "fit", "--config", str(config), f"--trainer.default_root_dir={root}"]
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    last = root / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    saved = torch.load(last, weights_only=True, map_location="cpu")
    resumed_from = saved["global_step"]
    assert 0 < resumed_from < 40

    resumed = run_cli("fit", "--config", str(config), f"--trainer.default_root_dir={root}", f"--ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = {step: loss for step, loss in step_losses(root).items() if step >= resumed_from}
    assert max(after) == max(reference) and len(after) == max(reference) - resumed_from + 1
    for step, loss in after.items():
        assert loss == pytest.approx(reference[step], rel=1e-5, abs=1e-6), (step, resumed_from)


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
