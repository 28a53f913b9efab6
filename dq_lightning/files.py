"""Writing results so that a crash never leaves half a file or half a directory behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` beside `path`, then rename it over `path` (readers see the old or the new file, never half)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(descriptor, 0o644)  # mkstemp's 0600 would hide results from the other users of a share
        with os.fdopen(descriptor, "w", newline="") as out:
            out.write(text)
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(staging)
        raise


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def _pid_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def staging_directory(parent: Path, prefix: str) -> Path:
    """A new empty directory `<prefix><host>.<pid>.<random>` in `parent`, after removing the ones with the same
    prefix that a killed process of this host left there (a SIGKILL or power cut runs no `finally`). Another
    host's, or a live process's, are left alone: on a shared filesystem they may still be in use."""
    parent = Path(parent)
    host = socket.gethostname().replace(".", "_")
    for leftover in parent.glob(f"{prefix}{host}.*.*"):
        pid = leftover.name[len(prefix) + len(host) + 1:].split(".", 1)[0]
        if leftover.is_dir() and pid.isdigit() and not _pid_is_running(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{host}.{os.getpid()}.", dir=parent))


@contextlib.contextmanager
def replace_directory(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging directory beside `out_dir`; when the block succeeds, it becomes `out_dir`.

    The previous `out_dir` is kept until the new one is in place, and a failed block leaves it untouched.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    previous = out_dir.with_name(f".{out_dir.name}.previous")
    if previous.is_dir() and not out_dir.exists():
        # A writer killed between its two renames left the old copy here and none in place: put it back first.
        previous.rename(out_dir)
    staging = staging_directory(out_dir.parent, f".{out_dir.name}.staging.")
    try:
        yield staging
        if out_dir.exists():
            shutil.rmtree(previous, ignore_errors=True)
            out_dir.rename(previous)
        staging.rename(out_dir)
        shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_json(path: Path) -> dict:
    """A JSON record the tool wrote (status, metrics), or {} where there is none yet or it was cut short."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
