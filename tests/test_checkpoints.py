"""Checkpoints: an interrupted save never costs the previous one; a wrong `--ckpt_path` is refused up front."""

import errno
import hashlib

import lightning.pytorch as pl
import pytest
import torch

from dq_lightning.checkpoints import AtomicCheckpointIO, module_class
from dq_lightning.cli import CLI_OPTIONS, DQLightningCLI
from tests.conftest import run_cli
from tests.test_bad_input import QUICK
from tests.test_reliability import quick_config

TEACHER = "dq_lightning.modules.teacher.TeacherModule"
STUDENT = "dq_lightning.modules.student.DQStudentModule"


def files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("interruption", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk full", "Ctrl-C"])
def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, interruption):
    checkpoint_io, directory = AtomicCheckpointIO(), tmp_path / "checkpoints"
    checkpoint_io.save_checkpoint({"state_dict": {"w": torch.zeros(64)}, "global_step": 1}, directory / "last.ckpt")
    before = files(directory)

    def save_half(obj, out, *args, **kwargs):
        out.write(b"half a checkpoint " * 100)
        raise interruption

    monkeypatch.setattr(torch, "save", save_half)
    for name in ("last.ckpt", "epoch=0-step=2.ckpt"):  # over the previous checkpoint, and under a new name
        with pytest.raises(type(interruption)):
            checkpoint_io.save_checkpoint({"state_dict": {"w": torch.ones(64)}, "global_step": 2}, directory / name)
    assert files(directory) == before  # byte-identical, no temporary or truncated file left


def test_save_replaces_the_checkpoint_with_a_loadable_one(tmp_path):
    checkpoint_io, path = AtomicCheckpointIO(), tmp_path / "new_dir" / "last.ckpt"
    for step in (1, 2):
        checkpoint_io.save_checkpoint({"state_dict": {"w": torch.full((4,), float(step))}, "global_step": step}, path)
    loaded = torch.load(path, weights_only=True, map_location="cpu")
    assert loaded["global_step"] == 2 and torch.equal(loaded["state_dict"]["w"], torch.full((4,), 2.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_cli_trainer_saves_through_the_atomic_plugin(tmp_path, shared_data):
    def trainer(*extra):
        return DQLightningCLI(pl.LightningModule, pl.LightningDataModule, **CLI_OPTIONS, run=False, args=[
            "--config", "experiments/xsum/teacher-tiny.yaml", f"--data.data_dir={shared_data / 'xsum'}",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", *extra]).trainer

    assert type(trainer().strategy.checkpoint_io) is AtomicCheckpointIO
    # A CheckpointIO the user chose is kept.
    chosen = trainer("--trainer.plugins=lightning.pytorch.plugins.io.AsyncCheckpointIO").strategy.checkpoint_io
    assert type(chosen).__name__ == "AsyncCheckpointIO"


def test_module_class_of_older_checkpoints():
    assert module_class({"module_class": STUDENT, "hyper_parameters": {"_class_path": TEACHER}}) == STUDENT
    assert module_class({"hyper_parameters": {"_class_path": TEACHER, "teacher": "x"}}) == TEACHER  # LightningCLI
    assert module_class({"hyper_parameters": {"teacher": "runs/t/hf", "w_bits": 2}}) == STUDENT
    assert module_class({"hyper_parameters": {"model": "tiny", "lr": 1e-3}}) == TEACHER
    assert module_class({"state_dict": {}}) is None


def test_checkpoints_and_configs_from_before_the_modules_moved_still_resolve():
    import importlib

    assert module_class({"module_class": "dq_lightning.distill.module.DQStudentModule"}) == STUDENT
    assert module_class({"hyper_parameters": {"_class_path": "dq_lightning.teacher.TeacherModule"}}) == TEACHER
    for old, new in [("dq_lightning.distill.module", STUDENT), ("dq_lightning.teacher", TEACHER),
                     ("dq_lightning.data.pretrain", "dq_lightning.pretrain.datamodule.DenoisingDataModule")]:
        module, _, name = new.rpartition(".")
        assert getattr(importlib.import_module(old), name) is getattr(importlib.import_module(module), name)


# -- --ckpt_path, through the command line ----------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory, shared_data, cache_dir, teacher_dir):
    """A real TeacherModule checkpoint, a truncated copy, and a student run directory whose files no failure
    may touch."""
    root = tmp_path_factory.mktemp("ckpt_path")
    config = quick_config(root, shared_data, cache_dir, every_n_steps=1, max_steps=1)
    result = run_cli("fit", "--config", str(config), f"--trainer.default_root_dir={root / 'teacher'}")
    assert result.returncode == 0, result.stderr[-2000:]
    teacher_ckpt = root / "teacher" / "checkpoints" / "last.ckpt"
    truncated = root / "truncated.ckpt"
    truncated.write_bytes(teacher_ckpt.read_bytes()[:1000])
    run_dir = root / "student"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"student checkpoint bytes")
    (run_dir / "config.yaml").write_text("the config of the run that wrote last.ckpt\n")
    return {"root": root, "config": config, "teacher_ckpt": teacher_ckpt, "truncated": truncated,
            "run_dir": run_dir, "shared": shared_data, "cache": cache_dir, "teacher": teacher_dir}


def digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_checkpoints_record_their_module_class(world):
    assert torch.load(world["teacher_ckpt"], weights_only=True, map_location="cpu")["module_class"] == TEACHER


CASES = {
    "checkpoint of another module class": (lambda w: w["teacher_ckpt"],
                                           ["is a TeacherModule checkpoint; this run trains a DQStudentModule"]),
    "missing file": (lambda w: w["root"] / "no_such.ckpt", ["no such file"]),
    "truncated file": (lambda w: w["truncated"], ["cannot read it as a checkpoint"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_ckpt_path_is_refused_before_the_run(case, world):
    make_path, fragments = CASES[case]
    ckpt_path = make_path(world)
    before = digest(world["root"])
    result = run_cli("fit", "--config", "experiments/xsum/dq-tiny.yaml", f"--data.cache_dir={world['cache']}",
                     f"--data.data_dir={world['shared'] / 'xsum'}", f"--trainer.default_root_dir={world['run_dir']}",
                     f"--model.teacher={world['teacher']}", *QUICK, f"--ckpt_path={ckpt_path}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in [f"--ckpt_path={ckpt_path}", *fragments]:
        assert fragment in errors[0], errors[0]
    assert digest(world["root"]) == before, "a refused run altered or added files"


def test_checkpoint_of_the_same_class_resumes_at_the_lr_given_on_resume(world):
    first = torch.load(world["teacher_ckpt"], weights_only=True, map_location="cpu")
    lower = first["hyper_parameters"]["lr"] / 4
    result = run_cli("fit", "--config", str(world["config"]), f"--trainer.default_root_dir={world['root'] / 'resumed'}",
                     "--trainer.max_steps=2", f"--model.lr={lower}", f"--ckpt_path={world['teacher_ckpt']}")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = torch.load(world["root"] / "resumed" / "checkpoints" / "last.ckpt", weights_only=True,
                         map_location="cpu")
    assert resumed["global_step"] == 2 and resumed["module_class"] == TEACHER
    # The flag was honoured, not replaced by the checkpoint's lr: the schedule restarts from the lower base.
    assert resumed["hyper_parameters"]["lr"] == lower
    assert resumed["lr_schedulers"][0]["base_lrs"] == [lower, lower]
    before, after = (c["optimizer_states"][0]["param_groups"][0]["initial_lr"] for c in (first, resumed))
    assert after == pytest.approx(before / 4)


class _ParsedOnly(DQLightningCLI):
    def before_instantiate_classes(self) -> None:
        raise _Parsed(self.config[self.config.subcommand]["model"]["init_args"])


class _Parsed(Exception):
    pass


def test_model_flags_given_with_a_checkpoint_win_over_its_hyper_parameters(world):
    saved = torch.load(world["teacher_ckpt"], weights_only=True, map_location="cpu")["hyper_parameters"]
    with pytest.raises(_Parsed) as parsed:
        _ParsedOnly(pl.LightningModule, pl.LightningDataModule, **CLI_OPTIONS, args=[
            "test", "--config", str(world["config"]), "--model.generation={num_beams: 1, max_length: 5}",
            f"--model.init_args.label_smoothing={saved['label_smoothing'] / 2}", f"--ckpt_path={world['teacher_ckpt']}"])
    init_args = parsed.value.args[0]
    assert init_args["generation"] == {"num_beams": 1, "max_length": 5}
    assert init_args["label_smoothing"] == saved["label_smoothing"] / 2
    assert init_args["lr"] == saved["lr"]  # not given: the checkpoint's


@pytest.mark.parametrize("case", ["truncated file", "checkpoint of another module class"])
def test_ckpt_path_last_is_checked_as_the_file_it_stands_for(case, world, tmp_path):
    """`--ckpt_path=last` finds the run's last.ckpt; a damaged or foreign one is the same one error line as
    the file given by path (one code path), not a traceback from deep inside Lightning."""
    make_path, fragments = CASES[case]
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(make_path(world).read_bytes())
    before = digest(tmp_path)
    result = run_cli("fit", "--config", "experiments/xsum/dq-tiny.yaml", f"--data.cache_dir={world['cache']}",
                     f"--data.data_dir={world['shared'] / 'xsum'}", f"--trainer.default_root_dir={run_dir}",
                     f"--model.teacher={world['teacher']}", *QUICK, "--ckpt_path=last")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in [f"--ckpt_path=last ({last})", *fragments]:
        assert fragment in errors[0], errors[0]
    assert digest(tmp_path) == before
