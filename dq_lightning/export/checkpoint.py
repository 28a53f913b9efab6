"""Reading a DQ student back from its Lightning checkpoint, for export.

Checkpoints are read with `torch.load(weights_only=True)`: nothing in them is executed.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from dq_lightning.errors import UserError


class NotQuantized(UserError):
    """The checkpoint's student is full precision (32-32-32): nothing to pack."""


def load_student(checkpoint_path: str | Path, teacher: str | None = None, quantized: bool = True):
    """The `DQStudentModule` of a checkpoint, rebuilt from its hyper-parameters and teacher directory, its
    student prepared for quantization (and converted, if the checkpoint holds converted codes) and loaded,
    in eval mode. Returns (module, checkpoint). `quantized=False` also takes a full-precision student."""
    from dq_lightning.checkpoints import read_student_checkpoint
    from dq_lightning.compat import upgrade_student_hparams
    from dq_lightning.modules.student import DQStudentModule
    from dq_lightning.quant import in_form_of

    checkpoint = read_student_checkpoint(checkpoint_path)
    hparams = upgrade_student_hparams(checkpoint["hyper_parameters"])
    accepted = inspect.signature(DQStudentModule.__init__).parameters
    settings = {key: value for key, value in hparams.items() if key in accepted and key != "self"}
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
    from dq_lightning.models.directory import hf_directory_task

    name = hf_directory_task(Path(teacher).expanduser())
    return get_task(name) if name else None


def trained_source_length(checkpoint: dict[str, Any]) -> int | None:
    """The source length (tokens) the checkpoint's DataModule truncated to, when LightningCLI recorded it."""
    data = checkpoint.get("datamodule_hyper_parameters")
    length = data.get("max_source_length") if isinstance(data, dict) else None
    return length if isinstance(length, int) and length > 0 else None

