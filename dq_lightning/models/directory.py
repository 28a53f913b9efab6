"""What a Hugging Face directory written by this project records about its training (`dq_lightning.json`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
