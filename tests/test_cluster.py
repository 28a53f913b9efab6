"""Paper scale on a cluster: the global batch kept on any hardware, SLURM/torchrun templates and resume, agents."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from dq_lightning import cluster
from dq_lightning.callbacks.global_batch import GlobalBatchSize, accumulation_for
from dq_lightning.errors import UserError
from dq_lightning.config_files import with_bases, read_composed
from tests.conftest import PROJECT_ROOT, run_cli

XSUM_TINY = "experiments/xsum/teacher-tiny.yaml"
QUICK = ["--model.model=micro", "--data.max_train_samples=16", "--data.max_eval_samples=4",
         "--data.max_source_length=64", "--data.max_target_length=16",
         "--model.generation={num_beams: 1, max_length: 6, min_length: 1}", "--trainer.max_epochs=2",
         "--trainer.check_val_every_n_epoch=2", "--trainer.logger=false", "--trainer.enable_progress_bar=false"]
SBATCH = PROJECT_ROOT / "experiments" / "cluster" / "slurm.sbatch"
SWEEP_SBATCH = PROJECT_ROOT / "experiments" / "cluster" / "slurm-sweep.sbatch"


# -- the derivation --------------------------------------------------------------------------------
@pytest.mark.parametrize("devices,nodes,per_device,global_batch,expected", [
    (1, 1, 8, 16, 2),  # the official script: one GPU, 8 per device, 2 accumulated
    (2, 1, 8, 16, 1),
    (4, 1, 4, 16, 1),  # the paper configs as shipped
    (1, 1, 4, 16, 4),
    (2, 2, 2, 16, 2),  # two nodes
    (8, 1, 2, 16, 1),  # GPUS=8
    (4, 2, 2, 16, 1),
    (1, 2, 8, 16, 1),
    (3, 1, 1, 48, 16),
])
def test_accumulation_is_global_over_devices_nodes_and_per_device(devices, nodes, per_device, global_batch, expected):
    assert accumulation_for(global_batch, per_device, devices, nodes) == expected
    assert expected * devices * nodes * per_device == global_batch


def test_indivisible_global_batch_is_one_line_naming_every_setting():
    with pytest.raises(UserError) as error:
        accumulation_for(16, 8, 4, 1)  # 4 GPUs x 8 = 32 > 16
    text = str(error.value)
    assert "\n" not in text
    for setting in ("global_batch_size=16", "trainer.devices", "trainer.num_nodes", "data.batch_size",
                    "4 x 1 x 8 = 32"):
        assert setting in text, text
    assert "choose data.batch_size from 1, 2, 4" in text

    with pytest.raises(UserError, match="3 processes cannot share 16 sequences evenly"):
        accumulation_for(16, 1, 3, 1)
    with pytest.raises(UserError, match=r"2 x 2 x 3 = 12.*choose data.batch_size from 1, 2, 4"):
        accumulation_for(16, 3, 2, 2)
    with pytest.raises(UserError, match="global_batch_size=0 must be a positive whole number"):
        accumulation_for(0, 8, 1, 1)


class _Data(pl.LightningDataModule):
    def __init__(self, batch_size: int = 8):
        super().__init__()
        self.save_hyperparameters()


def test_callback_sets_the_trainers_accumulation_from_devices_and_nodes():
    # Building a 2-node DDP trainer launches nothing: its devices and nodes are what the derivation reads.
    trainer = pl.Trainer(accelerator="cpu", devices=2, num_nodes=2, strategy="ddp", logger=False)
    record = GlobalBatchSize(16).apply(trainer, _Data(batch_size=2))
    assert trainer.accumulate_grad_batches == 2
    assert record == {"global_batch_size": 16, "per_device_batch_size": 2, "devices": 2, "num_nodes": 2,
                      "world_size": 4, "accumulate_grad_batches": 2}


def test_callback_refuses_an_explicit_accumulation_that_contradicts_the_global_batch():
    trainer = pl.Trainer(accelerator="cpu", devices=1, accumulate_grad_batches=3, logger=False)
    with pytest.raises(UserError, match=r"trainer.accumulate_grad_batches=3 conflicts with global_batch_size=16, "
                                        r"which gives 2"):
        GlobalBatchSize(16).apply(trainer, _Data(batch_size=8))
    agreeing = pl.Trainer(accelerator="cpu", devices=1, accumulate_grad_batches=2, logger=False)
    assert GlobalBatchSize(16).apply(agreeing, _Data(batch_size=8))["accumulate_grad_batches"] == 2


def test_every_paper_config_keeps_16_sequences_per_step_on_its_own_devices():
    for path in sorted((PROJECT_ROOT / "experiments").glob("*/*-paper.yaml")):
        if path.parent.name == "base":
            continue  # checked as part of each config built on it
        config = read_composed(path)
        if path.name.startswith("pretrain"):
            continue
        assert config.get("global_batch_size") == 16, path
        assert "accumulate_grad_batches" not in config["trainer"], path  # derived, never fixed
        per_device, devices = config["data"]["init_args"]["batch_size"], config["trainer"]["devices"]
        assert accumulation_for(16, per_device, devices, config["trainer"].get("num_nodes", 1)) >= 1, path
        assert any("amazon-science/dq-bart" in file.read_text() for file in with_bases(path)), path  # cites it


# -- the command line ------------------------------------------------------------------------------
def assert_one_error_line(result, *fragments):
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_indivisible_global_batch_is_one_error_line_before_training(shared_data, cache_dir, tmp_path):
    root = tmp_path / "run"
    result = run_cli("fit", "--config", XSUM_TINY, *QUICK, f"--data.data_dir={shared_data / 'xsum'}",
                     f"--data.cache_dir={cache_dir}", "--data.vocab_size=500", f"--trainer.default_root_dir={root}",
                     "--global_batch_size=10", "--data.batch_size=4")
    assert_one_error_line(result, "global_batch_size=10", "trainer.devices", "trainer.num_nodes", "data.batch_size",
                          "1 x 1 x 4 = 4")
    assert not (root / "config.yaml").exists() and not (root / "checkpoints").exists()


@pytest.mark.slow  # two training processes: about a minute on 2 busy cores
@pytest.mark.timeout(900)
def test_ddp_fit_derives_the_accumulation_and_records_it(teacher_dir, shared_data, cache_dir, tmp_path):
    root = tmp_path / "ddp"
    result = run_cli("fit", "--config", XSUM_TINY, *QUICK, f"--data.data_dir={shared_data / 'xsum'}",
                     f"--data.cache_dir={cache_dir}", f"--data.tokenizer={teacher_dir}",
                     f"--trainer.default_root_dir={root}", "--global_batch_size=16", "--data.batch_size=4",
                     "--trainer.devices=2", "--trainer.strategy=ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "MEMBER: 2/2" in output
    assert ("global batch: 16 sequences per optimizer step = 2 devices x 1 nodes x 4 per device x 2 accumulated "
            "batches") in output
    saved = yaml.safe_load((root / "config.yaml").read_text())
    assert saved["global_batch_size"] == 16 and saved["trainer"]["accumulate_grad_batches"] == 2
    # 16 rows over 2 processes of batch 4: 2 batches each per epoch, accumulated into 1 optimizer step.
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2  # 2 epochs x 1 step (4 without the accumulation)
    assert checkpoint["callbacks"]["GlobalBatchSize"]["accumulate_grad_batches"] == 2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow  # two torchrun "nodes" on this machine
@pytest.mark.timeout(900)
def test_torchrun_two_nodes_honour_num_nodes_in_the_global_batch(teacher_dir, shared_data, tmp_path):
    root, port = tmp_path / "nodes", _free_port()
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = []
    for rank in (0, 1):
        command = [str(torchrun), "--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}",
                   "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "dq_lightning", "fit",
                   "--config", XSUM_TINY, *QUICK, f"--data.data_dir={shared_data / 'xsum'}",
                   f"--data.cache_dir={tmp_path / f'cache{rank}'}", f"--data.tokenizer={teacher_dir}",
                   f"--trainer.default_root_dir={root}", "--global_batch_size=16", "--data.batch_size=4",
                   "--trainer.devices=1", "--trainer.num_nodes=2", "--trainer.strategy=ddp"]
        nodes.append(subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [node.communicate(timeout=840)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]
    assert "MEMBER: 1/2" in outputs[0] and "MEMBER: 2/2" in outputs[1]
    assert "All distributed processes registered. Starting with 2 processes" in outputs[0]
    assert ("global batch: 16 sequences per optimizer step = 1 devices x 2 nodes x 4 per device x 2 accumulated "
            "batches") in outputs[0]
    assert yaml.safe_load((root / "config.yaml").read_text())["trainer"]["accumulate_grad_batches"] == 2
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2


# -- resume after a SLURM requeue ------------------------------------------------------------------
def _touch(path: Path, age_s: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def _trainer_config(root: Path, **checkpoint) -> dict:
    """Trainer settings as the CLI has parsed them: the run folder and one ModelCheckpoint."""
    return {"default_root_dir": str(root), "callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(root / "saved"), **checkpoint}}]}


def test_ckpt_path_last_takes_the_requeue_checkpoint_when_it_is_newer(tmp_path):
    trainer = _trainer_config(tmp_path, save_last=True)
    assert cluster.resume_path(trainer, "last") == "last"  # nothing saved yet: Lightning starts from scratch
    last = _touch(tmp_path / "saved" / "last.ckpt", age_s=600)
    assert cluster.resume_path(trainer, "last") == str(last)
    hpc = _touch(tmp_path / "hpc_ckpt_1.ckpt", age_s=60)  # written on SIGUSR1, after the last periodic save
    assert cluster.resume_path(trainer, "last") == str(hpc)
    _touch(tmp_path / "saved" / "last.ckpt", age_s=0)  # the resumed run saved again since
    assert cluster.resume_path(trainer, "last") == str(last)
    assert cluster.resume_path(trainer, None) is None
    assert cluster.resume_path(trainer, "some/file.ckpt") == "some/file.ckpt"


# -- W&B agents: the machine's GPUs and data for runs of a sweep stored on the server ------------------
def test_agent_args_are_appended_only_for_runs_of_an_agent(monkeypatch):
    monkeypatch.setenv(cluster.AGENT_ARGS_ENV, "--trainer.devices=4 '--data.data_dir=/data/x sum'")
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    assert cluster.with_agent_args(["fit", "--config", "c.yaml"]) == ["fit", "--config", "c.yaml"]
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    monkeypatch.setenv("DQ_SWEEP_DIR", "runs/xsum/sweep-paper")
    assert cluster.with_agent_args(["fit"]) == ["fit", "--trainer.devices=4", "--data.data_dir=/data/x sum"]
    # This process's own command line: sys.argv gets them (DDP processes start from it), the variable goes.
    monkeypatch.setattr(sys, "argv", ["dq_lightning", "fit", "--model.bits=2-2-8"])
    assert cluster.with_agent_args(sys.argv[1:]) == ["fit", "--model.bits=2-2-8", "--trainer.devices=4",
                                                     "--data.data_dir=/data/x sum"]
    assert sys.argv[-1] == "--data.data_dir=/data/x sum" and cluster.AGENT_ARGS_ENV not in os.environ


def test_an_agents_run_gets_the_machines_flags(shared_data, cache_dir, tmp_path):
    env = {"WANDB_SWEEP_ID": "abc123", "WANDB_RUN_ID": "run1", "DQ_SWEEP_DIR": str(tmp_path / "sweep"),
           cluster.AGENT_ARGS_ENV: "--model.lr=0.00123 --trainer.max_epochs=7"}
    result = run_cli("fit", "--config", XSUM_TINY, "--model.lr=0.5", "--print_config", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "lr: 0.00123" in result.stdout and "max_epochs: 7" in result.stdout


# -- the SLURM templates ---------------------------------------------------------------------------
@pytest.mark.parametrize("script", [SBATCH, SWEEP_SBATCH], ids=lambda p: p.name)
def test_sbatch_templates_parse(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    directives = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --requeue" in directives


def _fake_bin(tmp_path: Path) -> Path:
    """`srun` that records its arguments, standing in for SLURM."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$FAKE_SRUN_ARGS"\n')
    srun.chmod(0o755)
    return bin_dir


def test_sbatch_runs_the_fit_entry_point_under_srun_with_the_allocation_and_resume(tmp_path):
    text = SBATCH.read_text()
    assert "#SBATCH --signal=SIGUSR1@90" in text and re.search(r"^#SBATCH --ntasks-per-node=\d+$", text, re.M)
    record = tmp_path / "srun_args"
    env = {**os.environ, "PATH": f"{_fake_bin(tmp_path)}:{os.environ['PATH']}", "FAKE_SRUN_ARGS": str(record),
           "SLURM_SUBMIT_DIR": str(PROJECT_ROOT), "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "2",
           "SLURM_JOB_ID": "1234", "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(SBATCH), "experiments/xsum/dq-paper.yaml", "--model.bits=2-2-8"],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    args = record.read_text().splitlines()
    start = args.index(sys.executable)
    assert args[start:start + 5] == [sys.executable, "-m", "dq_lightning", "fit", "--config"]
    assert args[start + 5] == "experiments/xsum/dq-paper.yaml"
    for flag in ("--trainer.accelerator=gpu", "--trainer.devices=4", "--trainer.num_nodes=2", "--trainer.strategy=ddp"):
        assert flag in args, args
    assert args[args.index("--ckpt_path") + 1] == "last"
    assert args[-1] == "--model.bits=2-2-8"

    missing = subprocess.run(["bash", str(SBATCH), "experiments/xsum/nope.yaml"], capture_output=True, text=True,
                             env=env, cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.startswith("error: experiments/xsum/nope.yaml")


def test_sweep_array_runs_one_agent_online_and_one_sweep_worker_offline(tmp_path):
    text = SWEEP_SBATCH.read_text()
    assert "wandb agent" in text and "--array" in text and "SLURM_JOB_NAME=interactive" in text
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = bin_dir / "python"  # records what the template runs instead of running it
    python.write_text('#!/bin/bash\nif [ "$1" = -c ]; then echo "${FAKE_MODE}"; exit 0; fi\n'
                      'printf "%s\\n" "$@" > "$FAKE_ARGS"; env > "$FAKE_ARGS.env"\n')
    python.chmod(0o755)
    (tmp_path / "runs" / "xsum" / "sweep-paper").mkdir(parents=True)
    (tmp_path / "runs" / "xsum" / "sweep-paper" / "sweep_id").write_text("abc123\n")
    record = tmp_path / "args"
    env = {**os.environ, "PYTHON": str(python), "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_GPUS_ON_NODE": "4",
           "FAKE_ARGS": str(record)}

    online = subprocess.run(["bash", str(SWEEP_SBATCH), "xsum"], capture_output=True, text=True,
                            env={**env, "FAKE_MODE": "online"})
    assert online.returncode == 0, online.stderr
    assert record.read_text().splitlines() == ["-m", "wandb", "agent", "--project", "dq-lightning", "abc123"]
    agent_env = dict(line.split("=", 1) for line in Path(f"{record}.env").read_text().splitlines() if "=" in line)
    assert agent_env["DQ_SWEEP_DIR"] == "runs/xsum/sweep-paper"
    assert agent_env[cluster.AGENT_ARGS_ENV] == "--trainer.accelerator=gpu --trainer.devices=4 --trainer.strategy=ddp"
    assert agent_env["SLURM_JOB_NAME"] == "interactive"

    offline = subprocess.run(["bash", str(SWEEP_SBATCH), "xsum"], capture_output=True, text=True,
                             env={**env, "FAKE_MODE": "offline", "DATA_DIR": "/data/xsum"})
    assert offline.returncode == 0, offline.stderr
    assert record.read_text().splitlines() == ["-m", "dq_lightning", "sweep", "--task", "xsum", "--scale", "paper",
                                               "--gpus", "4", "--data-dir", "/data/xsum"]

    (tmp_path / "runs" / "xsum" / "sweep-paper" / "sweep_id").unlink()
    no_id = subprocess.run(["bash", str(SWEEP_SBATCH), "xsum"], capture_output=True, text=True,
                           env={**env, "FAKE_MODE": "online"})
    assert no_id.returncode == 2 and "make sweep-id TASK=xsum SCALE=paper" in no_id.stderr


def test_sweep_id_is_created_once_and_needs_a_login(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert cluster.main(["sweep-id", "--task", "xsum", "--scale", "paper", "--runs", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: creating a W&B sweep needs a W&B login") and error.count("\n") == 1
    assert not (tmp_path / "xsum").exists()
    id_file = tmp_path / "xsum" / "sweep-paper" / "sweep_id"
    id_file.parent.mkdir(parents=True)
    id_file.write_text("abc123\n")
    assert cluster.main(["sweep-id", "--task", "xsum", "--scale", "paper", "--runs", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "abc123\n"  # the existing sweep, as `make sweep` would join it


def test_ckpt_path_last_without_a_last_checkpoint_resumes_the_newest_epoch_checkpoint(tmp_path, capsys):
    """A run that saved only its best epochs (or died before its first periodic save) is resumed, not started
    again beside its own checkpoints."""
    trainer = _trainer_config(tmp_path, monitor="val/loss")
    _touch(tmp_path / "saved" / "epoch=0-step=10.ckpt", age_s=600)
    newest = _touch(tmp_path / "saved" / "epoch=1-step=20.ckpt", age_s=60)
    _touch(tmp_path / "saved" / "notes.txt", age_s=0)
    assert cluster.resume_path(trainer, "last") == str(newest)
    assert "resuming from epoch=1-step=20.ckpt" in capsys.readouterr().err
    last = _touch(tmp_path / "saved" / "last.ckpt", age_s=300)  # a last checkpoint wins even if older
    assert cluster.resume_path(trainer, "last") == str(last)


# -- make fit NODES=n: refuse what cannot work; a rendezvous that waits says for what ----------------------------
@pytest.fixture
def make_sandbox(tmp_path):
    """The Makefile in a scratch directory, using this interpreter and this checkout's package."""
    import shutil

    if shutil.which("make") is None:
        pytest.fail("no make on this machine")
    (tmp_path / "experiments").symlink_to(PROJECT_ROOT / "experiments")
    shutil.copy2(PROJECT_ROOT / "Makefile", tmp_path / "Makefile")
    shutil.copy2(PROJECT_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "stamp").touch()  # newer than pyproject.toml: the install rule has nothing to do
    return tmp_path


def _make_fit(sandbox, *variables):
    return subprocess.run(["make", "--no-print-directory", "fit", "CONFIG=experiments/xsum/dq-paper.yaml",
                           f"PY={sys.executable}", f"STAMP={sandbox / 'stamp'}", *variables], cwd=sandbox,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})


@pytest.mark.parametrize("variables, fragments", [
    (["NODES=abc", "GPUS=1"], ["NODES=abc", "positive whole number of nodes"]),
    (["NODES=2", "GPUS=two", "MASTER_ADDR=localhost"], ["GPUS=two", "positive whole number"]),
    (["NODES=2"], ["NODES=2 needs GPUS="]),
    (["NODES=2", "GPUS=1", "MASTER_ADDR=localhost", "MASTER_PORT=port"], ["MASTER_PORT=port"]),
])
def test_make_fit_refuses_cluster_settings_that_cannot_work(variables, fragments, make_sandbox):
    result = _make_fit(make_sandbox, *variables)
    assert_one_error_line(result, *fragments)
    assert not (make_sandbox / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of GPUs on a machine without them")
def test_make_fit_on_nodes_without_gpus_is_refused_at_once_not_left_waiting(make_sandbox):
    """`make fit NODES=2 GPUS=1` on a CPU machine waited in torchrun's rendezvous with no output until killed."""
    started = time.time()
    result = _make_fit(make_sandbox, "NODES=2", "GPUS=1", "MASTER_ADDR=localhost")
    assert_one_error_line(result, "GPUS=1 asks for a GPU", "leave GPUS and NODES unset")
    assert time.time() - started < 120


def test_a_rendezvous_that_times_out_names_what_it_waited_for(monkeypatch, capsys):
    """Node 1 of 2 alone: the rendezvous gives up after --timeout seconds with one line, not a traceback."""
    from dq_lightning import devices

    monkeypatch.setattr(devices, "cuda_devices", lambda: 1)  # GPUs are not what this test is about
    endpoint = f"127.0.0.1:{_free_port()}"
    started = time.time()
    code = cluster.main(["torchrun", "--nodes=2", "--gpus=1", f"--master={endpoint}", "--timeout=3", "--",
                         "fit", "--help"])
    assert code == 2 and time.time() - started < 60
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: the rendezvous at " + endpoint)
    assert "waited 3 s for NODES=2 nodes" in error and "every node" in error


def test_a_ddp_rendezvous_that_times_out_is_one_line_naming_it(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("WORLD_SIZE", "8")
    timed_out = dist.DistStoreError("Timed out after 1801 seconds waiting for clients. 4/8 clients joined.")
    try:
        raise RuntimeError("setting up the strategy failed") from timed_out
    except RuntimeError as wrapped:
        line = cluster.rendezvous_error(wrapped)
    assert line.startswith("the DDP processes' rendezvous at node0:29500 gave up waiting for 8 processes")
    assert "4/8 clients joined" in line
    assert cluster.rendezvous_error(ValueError("something else")) is None
