"""Bad command lines and run folders, run as the user would run them (issue 17): a second fit into a run
folder, GPUs the machine lacks (flags, paper configs, make GPUS= and SCALE=paper), parser type errors and
misspelt flags, bad `--ckpt_path`, unreadable or unwritable paths, no data while offline. Each is exit 2 with
exactly one `error:` line naming the culprit, no traceback, and the files already there byte-identical; the
run-folder cases that are allowed (resume, --replace_run) leave one run's files."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from tests.conftest import PROJECT_ROOT, run_cli
from dq_lightning.config_files import read_composed
from tests.test_bad_input_data import ENV, QUICK, digest, one_error

TEACHER_TINY = "experiments/xsum/teacher-tiny.yaml"
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the refusal on a machine without GPUs")


def teacher_fit(root, cache_dir, shared_data, *extra, config=TEACHER_TINY):
    return ["fit", "--config", config, f"--data.data_dir={shared_data / 'xsum'}", f"--data.cache_dir={cache_dir}",
            f"--trainer.default_root_dir={root}", "--model.model=micro", "--data.vocab_size=300", *QUICK, *extra]


def files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_data, cache_dir):
    """A run folder written by a real one-step fit: checkpoints/last.ckpt, config.yaml, fit_metrics.json."""
    root = tmp_path_factory.mktemp("run_folder") / "run"
    result = run_cli(*teacher_fit(root, cache_dir, shared_data), env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (root / "checkpoints" / "last.ckpt").is_file() and (root / "config.yaml").is_file()
    return root


@pytest.fixture
def copy_of_run(run, tmp_path):
    """The run folder copied (a moved folder: its checkpoints' callback state still names the old path)."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


# -- one run per run folder ----------------------------------------------------------------------------------
@pytest.mark.parametrize("ckpt", ["none", "another run's checkpoint"])
def test_second_fit_into_a_run_folder_is_refused(ckpt, run, copy_of_run, cache_dir, shared_data):
    before, listing = digest(copy_of_run), files(copy_of_run)
    extra = [f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"] if ckpt != "none" else []
    result = run_cli(*teacher_fit(copy_of_run, cache_dir, shared_data, *extra), env=ENV)
    one_error(result, f"--trainer.default_root_dir={copy_of_run}", "holds an earlier run", "checkpoints/last.ckpt",
              "--ckpt_path=last", "--replace_run=true")
    assert digest(copy_of_run) == before and files(copy_of_run) == listing  # no last-v1.ckpt, no new config


def test_replace_run_moves_the_earlier_run_aside(copy_of_run, cache_dir, shared_data):
    before = {path.removeprefix(str(copy_of_run)): sha for path, sha in digest(copy_of_run).items()}
    result = run_cli(*teacher_fit(copy_of_run, cache_dir, shared_data, "--replace_run=true"), env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    moved = [p for p in copy_of_run.parent.iterdir() if p.name.startswith("run.replaced-")]
    assert len(moved) == 1, list(copy_of_run.parent.iterdir())
    assert {path.removeprefix(str(moved[0])): sha for path, sha in digest(moved[0]).items()} == before
    assert files(copy_of_run / "checkpoints") == ["last.ckpt"]


def test_resume_and_test_keep_one_runs_files(copy_of_run, cache_dir, shared_data):
    fit_config = (copy_of_run / "config.yaml").read_bytes()
    result = run_cli(*teacher_fit(copy_of_run, cache_dir, shared_data, "--ckpt_path=last", "--trainer.max_steps=2"),
                     env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    names = files(copy_of_run / "checkpoints")
    assert "last.ckpt" in names and not any("-v" in name for name in names), names  # no last-v1.ckpt beside it
    assert torch.load(copy_of_run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert (copy_of_run / "config.yaml").read_bytes() != fit_config  # the resumed run's settings, as it ran

    resumed_config = (copy_of_run / "config.yaml").read_bytes()
    result = run_cli("test", *teacher_fit(copy_of_run, cache_dir, shared_data)[1:],
                     f"--ckpt_path={copy_of_run / 'checkpoints' / 'last.ckpt'}", env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (copy_of_run / "config.yaml").read_bytes() == resumed_config  # the fit's config survives a test
    assert yaml.safe_load((copy_of_run / "test-config.yaml").read_text())["ckpt_path"].endswith("last.ckpt")


def test_a_saved_config_reused_with_another_root_writes_only_there(copy_of_run, tmp_path):
    """config.yaml keeps the run's paths relative to trainer.default_root_dir, as the shipped configs spell
    them: testing a copied run into a new folder with its config writes nothing into the copied folder."""
    saved = yaml.safe_load((copy_of_run / "config.yaml").read_text())["trainer"]
    dirpaths = [c["init_args"]["dirpath"] for c in saved["callbacks"] if c.get("init_args", {}).get("dirpath")]
    assert dirpaths and all(path.startswith("${....default_root_dir}/") for path in dirpaths), dirpaths
    before, elsewhere = digest(copy_of_run), tmp_path / "elsewhere"
    result = run_cli("test", "--config", str(copy_of_run / "config.yaml"), f"--trainer.default_root_dir={elsewhere}",
                     f"--ckpt_path={copy_of_run / 'checkpoints' / 'last.ckpt'}", env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert digest(copy_of_run) == before
    assert (elsewhere / "test-config.yaml").is_file(), files(elsewhere)


@pytest.mark.parametrize("loggers", ["one", "a list"])
def test_saved_paths_inside_the_root_become_interpolations_of_it(tmp_path, loggers):
    from dq_lightning.cli import keep_paths_relative_to_root

    logger = {"class_path": "dq_lightning.loggers.WandbLogger", "init_args": {"save_dir": "runs/a"}}
    config = {"trainer": {"default_root_dir": "runs/a/", "logger": logger if loggers == "one" else [logger],
                          "callbacks": [{"class_path": "ModelCheckpoint", "init_args": {"dirpath": "runs/a/ckpt"}},
                                        {"class_path": "ModelCheckpoint", "init_args": {"dirpath": "runs/ab"}},
                                        {"class_path": "MetricsFile", "init_args": {"mode": "max"}}]}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    keep_paths_relative_to_root(path)
    trainer = yaml.safe_load(path.read_text())["trainer"]
    saved_logger = trainer["logger"] if loggers == "one" else trainer["logger"][0]
    assert saved_logger["init_args"]["save_dir"] == ("${...default_root_dir}" if loggers == "one"
                                                     else "${....default_root_dir}")
    assert [c["init_args"].get("dirpath") for c in trainer["callbacks"]] == [
        "${....default_root_dir}/ckpt", "runs/ab", None]  # runs/ab is beside the root, not inside it


def test_error_after_the_run_started_keeps_config_yaml(copy_of_run, cache_dir, shared_data):
    # Resumed with a learning rate that diverges at the third step, before the first checkpoint of this process
    # (every 50 steps): the run has started, failed, and must leave the earlier run's config.yaml.
    before = digest(copy_of_run)
    result = run_cli(*teacher_fit(copy_of_run, cache_dir, shared_data, "--ckpt_path=last", "--model.lr=1e30",
                                  "--model.warmup_ratio=0", "--trainer.gradient_clip_val=null",
                                  "--data.max_train_samples=64", "--trainer.max_steps=30"), env=ENV)
    one_error(result, "non-finite loss at step")
    assert digest(copy_of_run) == before


def refused_fit(run, tmp_path, cache_dir, shared_data, flags, fragments):
    """A teacher fit with `flags` into a new folder: one error naming `fragments`, nothing written anywhere."""
    before, root = digest(run), tmp_path / "new-run"
    result = run_cli(*teacher_fit(root, cache_dir, shared_data, *flags), env=ENV)
    one_error(result, *fragments)
    assert not root.exists() and digest(run) == before
    return result


# -- GPUs this machine does not have ------------------------------------------------------------------------
GPU_CASES = {
    "--trainer.accelerator=gpu": (["--trainer.accelerator=gpu"], ["--trainer.accelerator=gpu", "has none"]),
    "--trainer.accelerator=cuda": (["--trainer.accelerator=cuda"], ["--trainer.accelerator=cuda", "has none"]),
    "gpu and --trainer.devices=4": (["--trainer.accelerator=gpu", "--trainer.devices=4"],
                                    ["--trainer.accelerator=gpu", "has none"]),
    "a paper config": (["--config", "experiments/xsum/teacher-paper.yaml"],
                       ["experiments/xsum/teacher-paper.yaml", "trainer.accelerator: gpu", "has none"]),
}


@no_gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_on_a_machine_without_one(case, run, tmp_path, cache_dir, shared_data):
    refused_fit(run, tmp_path, cache_dir, shared_data, *GPU_CASES[case])


@pytest.fixture
def make_sandbox(tmp_path):
    """The Makefile in a scratch directory (its runs/ land there), using this interpreter: nothing installed."""
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    for name in ("experiments", "sweeps"):
        (tmp_path / name).symlink_to(PROJECT_ROOT / name)
    shutil.copy2(PROJECT_ROOT / "Makefile", tmp_path / "Makefile")
    shutil.copy2(PROJECT_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "stamp").touch()  # newer than pyproject.toml: the install rule has nothing to do
    return tmp_path


MAKE_CASES = {
    "make teacher GPUS=2 TASK=xsum": (["teacher", "GPUS=2", "TASK=xsum"],
                                      ["--trainer.accelerator=gpu", "make: GPUS=2", "has none"]),
    "make teacher SCALE=paper TASK=xsum": (["teacher", "SCALE=paper", "TASK=xsum", "DATA_DIR={xsum}"],
                                           ["teacher-paper.yaml", "make: SCALE=paper", "SCALE=tiny"]),
    "make sweep SCALE=paper": (["sweep", "SCALE=paper"], ["dq-paper.yaml", "SCALE=tiny"]),
}


@no_gpu
@pytest.mark.parametrize("case", list(MAKE_CASES))
def test_make_asking_for_gpus_the_machine_lacks(case, make_sandbox, shared_data):
    targets, fragments = MAKE_CASES[case]
    targets = [target.format(xsum=shared_data / "xsum") for target in targets]
    result = subprocess.run(["make", "--no-print-directory", *targets, f"PY={sys.executable}",
                             f"STAMP={make_sandbox / 'stamp'}"], cwd=make_sandbox, capture_output=True, text=True,
                            timeout=600, env={**os.environ, **ENV})
    one_error(result, *fragments)
    assert not (make_sandbox / "runs").exists()


# -- the parser's errors name the flag ------------------------------------------------------------------------
PARSER_CASES = {
    "--model.lr=abc": (["--model.lr=abc"], ["--model.lr=abc", "expected a float"]),
    "--data.batch_size=x": (["--data.batch_size=x"], ["--data.batch_size=x", "expected an int"]),
    "--trainer.max_epochs=foo": (["--trainer.max_epochs=foo"], ["--trainer.max_epochs=foo", "expected an int"]),
    "--model.lr without a value": (["--model.lr"], ["--model.lr", "expected a value"]),
    "misspelt trainer flag": (["--trainer.max_epohcs=3"],
                              ["unknown option --trainer.max_epohcs=3", "did you mean --trainer.max_epochs?"]),
    "misspelt model flag": (["--model.lrr=1e-4"], ["--model.lrr=1e-4", "TeacherModule has no option 'lrr'",
                                                   "did you mean --model.lr?"]),
    "misspelt data flag": (["--data.batchsize=3"], ["--data.batchsize=3", "did you mean --data.batch_size?"]),
}


@pytest.mark.parametrize("case", list(PARSER_CASES))
def test_parser_error_names_the_flag_in_the_error_line(case, run, tmp_path, cache_dir, shared_data):
    result = refused_fit(run, tmp_path, cache_dir, shared_data, *PARSER_CASES[case])
    assert "usage:" not in result.stderr and "Union subtypes" not in result.stderr, result.stderr[-3000:]


def test_parser_error_from_a_config_file_names_key_and_file(tmp_path, cache_dir, shared_data):
    config = read_composed(PROJECT_ROOT / TEACHER_TINY)
    config["model"]["init_args"]["lr"] = "fast"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = run_cli(*teacher_fit(tmp_path / "new-run", cache_dir, shared_data, config=str(path)), env=ENV)
    one_error(result, "model.lr=fast", f"--config {path}", "expected a float")


# -- --ckpt_path, permissions, data ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["missing", "not a checkpoint"])
def test_bad_ckpt_path(case, run, tmp_path, cache_dir, shared_data):
    path = tmp_path / "garbage.ckpt"
    if case == "not a checkpoint":
        path.write_bytes(b"not a checkpoint at all")
    before = digest(run)
    result = run_cli(*teacher_fit(run, cache_dir, shared_data, f"--ckpt_path={path}"), env=ENV)
    one_error(result, f"--ckpt_path={path}", "no such file" if case == "missing" else "cannot read it")
    assert digest(run) == before


# Root reads and writes anything whatever the mode bits, so under root (CI containers) the subprocess gets the
# refusals a user would get from the kernel: os.access says no, and opening or creating there raises
# PermissionError. As any other user the chmod alone does it.
DENY_SHIM = '''
import builtins, io, json, os

_UNREADABLE = [os.path.abspath(p) for p in json.loads(os.environ.get("DQ_TEST_UNREADABLE", "[]"))]
_UNWRITABLE = [os.path.abspath(p) for p in json.loads(os.environ.get("DQ_TEST_UNWRITABLE", "[]"))]


def _under(path, roots):
    try:
        path = os.path.abspath(os.fsdecode(path))
    except TypeError:
        return False
    return any(path == root or path.startswith(root + os.sep) for root in roots)


def _deny(path):
    raise PermissionError(13, "Permission denied", os.fsdecode(path))


_access, _open, _mkdir = os.access, builtins.open, os.mkdir


def access(path, mode, *args, **kwargs):
    if isinstance(path, (str, bytes, os.PathLike)):
        if mode & os.R_OK and _under(path, _UNREADABLE) or mode & os.W_OK and _under(path, _UNWRITABLE):
            return False
    return _access(path, mode, *args, **kwargs)


def open_(file, mode="r", *args, **kwargs):
    if isinstance(file, (str, bytes, os.PathLike)):
        writes = any(flag in mode for flag in "wax+")
        if _under(file, _UNREADABLE) or writes and _under(os.path.dirname(os.path.abspath(file)), _UNWRITABLE):
            _deny(file)
    return _open(file, mode, *args, **kwargs)


def mkdir(path, *args, **kwargs):
    if _under(os.path.dirname(os.path.abspath(os.fsdecode(path))), _UNWRITABLE):
        _deny(path)
    return _mkdir(path, *args, **kwargs)


os.access, builtins.open, io.open, os.mkdir = access, open_, open_, mkdir
'''


def denied(tmp_path, unreadable=(), unwritable=()) -> dict:
    """chmod the paths, and under root the environment of a subprocess that is refused them all the same."""
    for path in unreadable:
        path.chmod(0)
    for path in unwritable:
        path.chmod(0o555)
    if os.geteuid() != 0:
        return dict(ENV)
    shim = tmp_path / "deny_shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(DENY_SHIM)
    return {**ENV, "PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "DQ_TEST_UNREADABLE": json.dumps([str(p) for p in unreadable]),
            "DQ_TEST_UNWRITABLE": json.dumps([str(p) for p in unwritable])}


def test_unreadable_config_file(tmp_path, cache_dir, shared_data):
    config = tmp_path / "mine.yaml"
    shutil.copy(PROJECT_ROOT / TEACHER_TINY, config)
    env = denied(tmp_path, unreadable=[config])
    try:
        result = run_cli(*teacher_fit(tmp_path / "new-run", cache_dir, shared_data, config=str(config)), env=env)
    finally:
        config.chmod(0o644)
    one_error(result, f"--config {config}", "not readable")
    assert not (tmp_path / "new-run").exists()


@pytest.mark.parametrize("case", ["existing folder", "folder to create"])
def test_unwritable_default_root_dir(case, tmp_path, cache_dir, shared_data):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "notes.txt").write_text("mine\n")
    root = locked if case == "existing folder" else locked / "run"
    env = denied(tmp_path, unwritable=[locked])
    try:
        result = run_cli(*teacher_fit(root, cache_dir, shared_data), env=env)
    finally:
        locked.chmod(0o755)
    one_error(result, f"--trainer.default_root_dir={root}", "not writable", "permission denied")
    assert files(locked) == ["notes.txt"]


def test_default_root_dir_below_a_file(tmp_path, cache_dir, shared_data):
    (tmp_path / "afile").write_text("mine\n")
    result = run_cli(*teacher_fit(tmp_path / "afile" / "run", cache_dir, shared_data), env=ENV)
    one_error(result, f"--trainer.default_root_dir={tmp_path / 'afile' / 'run'}", "is a file, not a directory")
    assert (tmp_path / "afile").read_text() == "mine\n"


def test_no_data_folder_while_offline(tmp_path, run):
    # A fresh cache: the Hub dataset cannot be in it. conftest keeps HF_DATASETS_OFFLINE=1 for every test.
    before, root = digest(run), tmp_path / "new-run"
    result = run_cli("fit", "--config", TEACHER_TINY, f"--data.cache_dir={tmp_path / 'cache'}",
                     f"--trainer.default_root_dir={root}", "--model.model=micro", *QUICK,
                     env={**ENV, "HF_DATASETS_OFFLINE": "1"})
    one_error(result, "--data.data_dir is not set", "EdinburghNLP/xsum", "HF_DATASETS_OFFLINE=1",
              "--data.data_dir=DIR")
    assert not root.exists() and not (tmp_path / "cache").exists() and digest(run) == before


@pytest.mark.parametrize("case", ["missing folder", "a file"])
def test_data_dir_that_is_not_a_folder(case, tmp_path, cache_dir):
    data_dir = tmp_path / "nowhere"
    if case == "a file":
        data_dir.write_text("train.jsonl is not a folder\n")
    root = tmp_path / "new-run"
    result = run_cli("fit", "--config", TEACHER_TINY, f"--data.data_dir={data_dir}", f"--data.cache_dir={cache_dir}",
                     f"--trainer.default_root_dir={root}", "--model.model=micro", *QUICK, env=ENV)
    one_error(result, f"--data.data_dir={data_dir}", "no such directory" if case == "missing folder"
              else "not a directory")
    assert not root.exists()


def test_gpu_request_names_the_setting_that_cannot_be_met(monkeypatch):
    """One decision for the CLI and the sweep: no GPU blames the accelerator, too many GPUs blames devices."""
    from dq_lightning import devices
    from dq_lightning.errors import UserError

    monkeypatch.setattr(devices, "cuda_devices", lambda: 2)
    devices.check_gpu_request("cpu", 8, "accel")          # a CPU run never asks
    devices.check_gpu_request("gpu", "auto", "accel")     # whatever there is
    devices.check_gpu_request("cuda", [0, 1], "accel")
    with pytest.raises(UserError, match=r"^devs asks for 3 GPUs, but this machine has 2; hint$"):
        devices.check_gpu_request("gpu", "0,1,2", "accel", devices_culprit="devs", too_few_hint="; hint")
    monkeypatch.setattr(devices, "cuda_devices", lambda: 0)
    with pytest.raises(UserError, match=r"^accel asks for a GPU, but this machine has none .*; cpu$"):
        devices.check_gpu_request("GPU", 1, "accel", devices_culprit="devs", no_gpu_hint="; cpu")
