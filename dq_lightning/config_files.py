"""Composed config files: what every run shares is written once and each shipped config names what it builds on.

A config file may start with `base: [file, ...]` (paths relative to that file). `--config X` then stands for
`--config <X's bases, their own bases first> --config X`: the parser merges them in that order, so X's own
values win, and interpolations (`${...default_root_dir}`) are resolved after the merge. jsonargparse's own
nested `config:` key is not used because it does not merge a nested file's sections with the outer file's.

A callback's `monitor: task` stands for the configured task's metric (`val/rougeL`, `val/bleu`: `TaskSpec`),
so that one base config serves the summarization tasks and translation alike; a config's `task_monitor`
(`val/rougeLsum` in the paper DQ configs, the official model selection) replaces the task's metric there.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import yaml

from dq_lightning.errors import UserError

BASE_KEY = "base"
TASK_MONITOR = "task"
TASK_MONITOR_KEY = "task_monitor"
_CONFIG_FLAGS = ("--config", "-c")


def _bases_of(path: Path) -> list[Path]:
    """The files `path` builds on, as paths; none when it cannot be read (the parser reports that file)."""
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    named = loaded.get(BASE_KEY) if isinstance(loaded, dict) else None
    if named is None:
        return []
    if isinstance(named, str):
        named = [named]
    if not isinstance(named, list) or not all(isinstance(name, str) for name in named):
        raise UserError(f"{path}: {BASE_KEY}: give a list of config files (paths relative to {path.parent})")
    bases = [Path(os.path.normpath(path.parent / name)) for name in named]
    for base in bases:
        if not base.is_file():
            raise UserError(f"{path}: {BASE_KEY}: {base} is not a file")
    return bases


def with_bases(path: Path, chain: tuple[Path, ...] = ()) -> list[Path]:
    """`path` preceded by everything it builds on, depth first; each file once."""
    if path.resolve() in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path.resolve()))
        raise UserError(f"{path}: {BASE_KEY}: the configs build on each other in a circle ({cycle})")
    ordered: list[Path] = []
    for base in _bases_of(path):
        ordered += [p for p in with_bases(base, (*chain, path.resolve())) if p not in ordered]
    return [*ordered, path]


def expand_bases(argv: list[str]) -> list[str]:
    """`argv` with each `--config X` preceded by `--config B` for every file B that X builds on."""
    expanded: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        name = None
        if token in _CONFIG_FLAGS and index + 1 < len(argv):
            name, index = argv[index + 1], index + 1
        elif token.startswith("--config="):
            name = token.split("=", 1)[1]
        elif token == f"--{BASE_KEY}" or token.startswith(f"--{BASE_KEY}="):
            raise UserError(f"--{BASE_KEY}: a key of config files (the files a config builds on), not a flag; "
                            f"pass each file with --config")
        if name is None:
            expanded.append(token)
        else:
            for path in with_bases(Path(name)):
                expanded += ["--config", str(path)]
        index += 1
    return expanded


def data_class(data: Any) -> type | None:
    """The class of a configured DataModule (a jsonargparse Namespace or a dict), or None."""
    if not hasattr(data, "get") or not data.get("class_path"):
        return None
    module, _, name = str(data["class_path"]).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except Exception:  # noqa: BLE001 - the parser accepted it; instantiating it reports its own errors
        return None
    return cls if isinstance(cls, type) else None


def data_task(data: Any) -> str:
    """The task of a configured DataModule: its class's `task_name`, or `init_args.task` (pre-training)."""
    cls = data_class(data)
    if cls is None:
        return ""
    return str((data.get("init_args") or {}).get("task") or getattr(cls, "task_name", "") or "")


def resolve_task_monitors(config: Any) -> None:
    """Replace `monitor: task` in the configured callbacks by the config's `task_monitor` or, unset, the task's
    metric, in place."""
    chosen = config.get(TASK_MONITOR_KEY)
    if chosen is not None and not (isinstance(chosen, str) and chosen.startswith("val/") and len(chosen) > 4):
        raise UserError(f"--{TASK_MONITOR_KEY}={chosen!r}: give a validation metric such as val/rougeLsum "
                        "(or leave it unset for the task's metric)")
    callbacks = [callback for callback in (config.get("trainer") or {}).get("callbacks") or []
                 if (callback.get("init_args") or {}).get("monitor") == TASK_MONITOR]
    if not callbacks:
        return
    from dq_lightning.data.tasks import get_task

    task = data_task(config.get("data"))
    if chosen is None and not task:
        raise UserError(f"monitor: {TASK_MONITOR} (in trainer.callbacks) needs a DataModule of a known task; "
                        f"set each callback's monitor (e.g. val/loss)")
    for callback in callbacks:
        callback["init_args"]["monitor"] = chosen or get_task(task).monitor


def _merge(into: dict, other: dict) -> dict:
    """`other` merged into `into` as the parser merges config files: sections deeply, other values replaced."""
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


def setting_origin(path: str | Path, section: str, name: str) -> Path | None:
    """The file that gives `section.name` its value in config `path`: `path` itself or one of its bases."""
    for file in reversed(with_bases(Path(path))):
        loaded = yaml.safe_load(file.read_text())
        part = loaded.get(section) if isinstance(loaded, dict) else None
        if isinstance(part, dict) and name in part:
            return file
    return None


def read_composed(path: str | Path) -> dict:
    """The settings of config file `path` with its bases merged in, as plain YAML (no parsing, no
    interpolation): for checks that read a setting before the parser runs. OSError and YAMLError propagate."""
    merged: dict = {}
    for file in with_bases(Path(path)):
        loaded = yaml.safe_load(file.read_text())
        if isinstance(loaded, dict):
            _merge(merged, loaded)
    merged.pop(BASE_KEY, None)
    return merged
