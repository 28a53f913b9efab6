"""Reading a DQ student back from its Lightning checkpoint, for export.

Checkpoints are read with `torch.load(weights_only=True)`: nothing in them is executed.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch

from dq_lightning.errors import UserError, first_line

STUDENT_KEYS = ("teacher", "mode", "w_bits", "e_bits", "a_bits")


def read_checkpoint(path: str | Path, flag: str = "--ckpt") -> dict[str, Any]:
    """A Lightning checkpoint of a `DQStudentModule`, read with `torch.load(weights_only=True)`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a bad file raises many types (pickle, zip, EOF, weights_only)
        raise UserError(f"{flag} {path}: cannot read it as a checkpoint with torch.load(weights_only=True) "
                        f"({first_line(error)})") from None
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


class NotQuantized(UserError):
    """The checkpoint's student is full precision (32-32-32): nothing to pack."""


def load_student(checkpoint_path: str | Path, teacher: str | None = None, quantized: bool = True):
    """The `DQStudentModule` of a checkpoint, rebuilt from its hyper-parameters and teacher directory, its
    student prepared for quantization (and converted, if the checkpoint holds converted codes) and loaded,
    in eval mode. Returns (module, checkpoint). `quantized=False` also takes a full-precision student."""
    from dq_lightning.modules.student import DQStudentModule
    from dq_lightning.quant import in_form_of

    checkpoint = read_checkpoint(checkpoint_path)
    hparams = checkpoint["hyper_parameters"]
    accepted = inspect.signature(DQStudentModule.__init__).parameters
    settings = {key: value for key, value in hparams.items() if key in accepted and key != "self"}
    if "recipe" not in hparams:
        # Written before recipes existed: trained with what is now recipe dq_lightning.
        settings["recipe"] = "dq_lightning"
        if hparams.get("quantize_attention_inputs"):
            settings["attention_quant"] = "asym_probs"
    if teacher is not None:
        settings["teacher"] = str(teacher)
    try:
        module = DQStudentModule(**settings)
    except UserError as error:
        hint = "" if teacher is not None else \
            " (the student is rebuilt from its teacher directory; pass --teacher DIR if it has moved)"
        raise UserError(f"{error}{hint}") from None
    if module.quant_config is None and quantized:
        raise NotQuantized(f"--ckpt {checkpoint_path}: the student is not quantized; there is nothing to pack")
    module.use_checkpoint_width(checkpoint)  # a thinner student: the units it kept, stored in the checkpoint
    state = {key[len("model."):]: value for key, value in checkpoint["state_dict"].items()
             if key.startswith("model.")}
    student = module.model if module.quant_config is None else \
        in_form_of(module.model, module.quant_config, state, module.factory.new_student)
    module.model = student
    missing, unexpected = student.load_state_dict(state, strict=False)
    if missing or unexpected:
        details = "; ".join(part for part in (
            f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}" if missing else "",
            f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}" if unexpected else "")
            if part)
        raise UserError(f"--ckpt {checkpoint_path}: its student does not match the model rebuilt from its "
                        f"hyper-parameters and teacher {settings['teacher']} ({details})")
    student.eval()
    return module, checkpoint


def resolve_task(checkpoint: dict[str, Any], teacher: str, task: str | None):
    """The task whose decoding settings the student uses: `task`, else the checkpoint's DataModule class
    (LightningCLI records it), else the teacher directory's `dq_lightning.json`; None if none says."""
    from dq_lightning.data.datamodule import DATAMODULES
    from dq_lightning.data.tasks import get_task

    if task is not None:
        return get_task(task)
    data = checkpoint.get("datamodule_hyper_parameters")
    class_name = str(data.get("_class_path", "")).rpartition(".")[2] if isinstance(data, dict) else ""
    for name, datamodule in DATAMODULES.items():
        if datamodule.__name__ == class_name:
            return get_task(name)
    name = hf_directory_task(Path(teacher).expanduser())
    return get_task(name) if name else None


def hf_directory_info(directory: Path) -> dict[str, Any]:
    """What a Hugging Face directory written by this project records about its training
    (`dq_lightning.json`: task, source length, ...); {} for any other directory."""
    try:
        info = json.loads((directory / "dq_lightning.json").read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def hf_directory_task(directory: Path):
    """The task a Hugging Face directory written by this project records (`dq_lightning.json`), or None; as
    written, so a value that names no task is the caller's to refuse."""
    return hf_directory_info(directory).get("task") or None


def hf_directory_task_info(path: Path) -> dict:
    """The source and target language codes of the task a teacher directory was trained on (its
    `dq_lightning.json`), which decide how sources are laid out, and the source length it was trained with;
    {} when it says none."""
    from dq_lightning.data.tasks import TASKS

    info = hf_directory_info(path)
    name, trained_length = info.get("task"), info.get("max_source_length")
    spec = TASKS.get(name) if isinstance(name, str) else None
    task = {"source_lang": spec.source_lang, "target_lang": spec.target_lang} \
        if spec is not None and spec.source_lang else {}
    if isinstance(trained_length, int) and trained_length > 0:
        task["max_source_length"] = trained_length
    return task


def trained_source_length(checkpoint: dict[str, Any]) -> int | None:
    """The source length (tokens) the checkpoint's DataModule truncated to, when LightningCLI recorded it."""
    data = checkpoint.get("datamodule_hyper_parameters")
    length = data.get("max_source_length") if isinstance(data, dict) else None
    return length if isinstance(length, int) and length > 0 else None

