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
