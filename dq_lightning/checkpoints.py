"""Lightning checkpoints: saved so that a crash never costs the previous one, recording a stop mid-epoch as one
(`record_stop_mid_epoch`), and checked before a run uses one."""

from __future__ import annotations

import contextlib
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dq_lightning.compat import moved_class
from dq_lightning.errors import UserError, first_line

# Checkpoints written before the module class was recorded: told apart by a hyper-parameter only one class has.
_CLASS_BY_HPARAM = {"teacher": "dq_lightning.modules.student.DQStudentModule",
                    "model": "dq_lightning.modules.teacher.TeacherModule"}


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose local saves replace the target in one rename, on every filesystem.

    Lightning's `_atomic_save` writes through an fsspec transaction: a file in the system temp directory, then
    `shutil.move` onto the target. When that directory is on another filesystem than runs/, the move is a copy
    into the target, so a save interrupted by a kill or a full disk truncates the previous good `last.ckpt`
    (and a PermissionError from the move is swallowed: the save fails silently).
    Here the temporary file is beside the target, so `os.replace` is a rename: the target is the old
    checkpoint or the new one, never part of one. Remote paths keep Lightning's behaviour.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        fs, local_path = url_to_fs(str(path))
        if storage_options is not None or not isinstance(fs, LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        directory, name = os.path.split(os.path.abspath(local_path))
        os.makedirs(directory, exist_ok=True)
        # Hidden and without the .ckpt suffix: `--ckpt_path=last` and *.ckpt globs never pick it up.
        staging = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
        try:
            with open(staging, "wb") as out:
                torch.save(checkpoint, out)
                out.flush()
                os.fsync(out.fileno())  # the data is on disk before the name points at it
            os.replace(staging, os.path.join(directory, name))
        except BaseException:  # also Ctrl-C: no half-written file is left behind
            with contextlib.suppress(FileNotFoundError):
                os.remove(staging)
            raise
        with contextlib.suppress(OSError):  # persist the rename itself; not every platform can fsync a directory
            descriptor = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)


def record_stop_mid_epoch(checkpoint: dict[str, Any], trainer) -> None:
    """Make a checkpoint saved after the batch loop stopped before the end of an epoch say where it stopped.

    A fit that ends mid-epoch (`--trainer.max_steps`, `--trainer.max_time`, `trainer.should_stop`) still runs
    Lightning's end-of-epoch bookkeeping, and a checkpoint saved then (ModelCheckpoint's `last.ckpt` when the
    fit ends, or at the epoch's end, or after the validation a stop triggers) records the epoch as finished: a
    resume starts the next epoch, and the rest of the stopped one is never trained. Rewritten here to the
    progress a checkpoint saved at the end of the last trained batch has (what a periodic `last.ckpt` holds),
    the resume continues with the next batch of the same epoch; the DataModule's saved position (`batches`)
    already says the same. Checkpoints saved anywhere else are left alone.
    """
    loops = (checkpoint.get("loops") or {}).get("fit_loop")
    if trainer is None or not loops or "epoch_progress" not in loops:
        return
    epochs, batches = loops["epoch_progress"], loops["epoch_loop.batch_progress"]
    trained, per_epoch = batches["current"]["ready"], trainer.num_training_batches
    stopped_mid_epoch = (epochs["current"]["processed"] == epochs["current"]["started"]  # the epoch was closed
                         and not batches["is_last_batch"] and 0 < trained < per_epoch != float("inf")
                         and batches["current"]["completed"] == batches["current"]["processed"])
    if not stopped_mid_epoch:
        return
    for progress in (epochs["total"], epochs["current"]):
        progress["processed"] = progress["completed"] = progress["started"] - 1
    for progress in (batches["total"], batches["current"]):
        progress["completed"] = progress["processed"] - 1
    if trained % trainer.accumulate_grad_batches == 0:  # the last batch stepped: counted once more since
        loops["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1
    checkpoint["epoch"] = epochs["current"]["started"] - 1


def use_atomic_checkpoint_io(trainer) -> None:
    """Make `trainer` save through `AtomicCheckpointIO`, unless the user chose a CheckpointIO of their own."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


def module_class(checkpoint: dict[str, Any]) -> str | None:
    """The class path of the LightningModule that saved `checkpoint`, or None when it cannot be told."""
    hparams = checkpoint.get("hyper_parameters")
    hparams = hparams if isinstance(hparams, dict) else {}
    # Recorded by Seq2SeqModule.on_save_checkpoint; LightningCLI puts `_class_path` into the hyper-parameters.
    found = checkpoint.get("module_class") or hparams.get("_class_path")
    if found:
        return moved_class(found)
    return next((path for key, path in _CLASS_BY_HPARAM.items() if key in hparams), None)


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def check_ckpt_path(ckpt_path, model_class: str, verb: str = "trains", given: str | None = None) -> None:
    """Refuse, as a `UserError`, a `--ckpt_path` that is missing, unreadable or saved by a module class other
    than `model_class` (a class path). `given`: what the user typed, when `ckpt_path` is the file it stood for
    (`last`).

    Lightning's keywords (last, best, hpc, registry) and remote URLs are left to Lightning.
    """
    path = str(ckpt_path)
    if path in ("last", "best", "hpc") or path.lower().partition(":")[0] == "registry" or "://" in path:
        return
    flag = f"--ckpt_path={given} ({path})" if given and given != path else f"--ckpt_path={path}"
    if not os.path.isfile(path):
        raise UserError(f"{flag}: {'not a file' if os.path.exists(path) else 'no such file'}")
    try:
        # mmap: only the metadata is read, not the tensors; it needs the zip format (torch.save's default).
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # noqa: BLE001 - a bad file raises many types (pickle, zip, EOF, weights_only)
        reason = str(error).strip().split("\n")[0].split(". ")[0] or type(error).__name__  # torch's is a page
        raise UserError(f"{flag}: cannot read it as a checkpoint with torch.load(weights_only=True) "
                        f"({reason})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise UserError(f"{flag}: not a Lightning checkpoint (no state_dict)")
    saved = module_class(checkpoint)
    # Exactly the class: LightningCLI would replace the configured class by the checkpoint's (_parse_ckpt_path).
    if saved and saved != moved_class(model_class):
        raise UserError(f"{flag} is a {saved.rpartition('.')[2]} checkpoint; "
                        f"this run {verb} a {model_class.rpartition('.')[2]}")


STUDENT_KEYS = ("teacher", "mode")


def read_checkpoint_file(path: str | Path, flag: str = "--ckpt") -> Any:
    """What `torch.load(weights_only=True)` reads from the file the flag names; one error line if it cannot."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a bad file raises many types (pickle, zip, EOF, weights_only)
        raise UserError(f"{flag} {path}: cannot read it as a checkpoint with torch.load(weights_only=True) "
                        f"({first_line(error)})") from None


def read_student_checkpoint(path: str | Path, flag: str = "--ckpt") -> dict[str, Any]:
    """A Lightning checkpoint of a `DQStudentModule`, read with `torch.load(weights_only=True)`."""
    path = Path(path).expanduser()
    checkpoint = read_checkpoint_file(path, flag)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise UserError(f"{flag} {path}: not a Lightning checkpoint (no state_dict)")
    hparams = checkpoint.get("hyper_parameters")
    class_path = hparams.get("_class_path", "") if isinstance(hparams, dict) else ""
    if (not isinstance(hparams, dict) or not all(key in hparams for key in STUDENT_KEYS)
            or (class_path and not class_path.endswith("DQStudentModule"))):
        if isinstance(hparams, dict) and class_path:
            what = f"it holds a {class_path.rpartition('.')[2]}"
        elif isinstance(hparams, dict) and "model" in hparams and "teacher" not in hparams:
            what = f"it looks like a TeacherModule checkpoint (model={hparams['model']})"
        else:
            what = "its hyper-parameters name no teacher, mode and bits"
        raise UserError(f"{flag} {path}: not a DQ student checkpoint ({what}); export packs the checkpoint of a "
                        "DQStudentModule run (python -m dq_lightning fit --config experiments/<task>/dq-*.yaml)")
    return checkpoint
