"""Claims on run folders, so that two processes never train into one folder.

Several offline sweep workers (two sweeps started by mistake, or one per node on a shared filesystem) walk the
same grid, and two `fit` commands (two `make teacher` in two terminals) may start together before their run
folder exists. Before training, a worker creates `<run_dir>/claim.json` for its grid point, and a fit creates
`.<folder name>.claim.json` beside its run folder (`claim_beside`: outside it, so that `--replace_run` can move
the folder away while the claim stays), holding its host, pid, the pid's start time and a random token, in one
step that fails if the file exists: a hard link to a fully written file, which is atomic on local disks, NFS,
Lustre and GPFS and never shows a half-written claim (O_EXCL is the fallback where hard links are not
supported). The claim is removed when the work ends, whether it finished, failed or was interrupted.

A claim whose process died is stale: on its own host a worker can tell (the pid is gone, a zombie, or now a
different process) and takes the point over. Another host's process cannot be checked from here, so a worker
holding a claim touches it every `HEARTBEAT_S` seconds, and another host's claim not touched for
`STALE_AFTER_S` (a node that crashed or lost power) is stale too. The margin is wide because file times on a
shared filesystem come from the server's clock while the age is measured with this host's.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

CLAIM = "claim.json"
# A worker holds the ".breaking" lock only for the few system calls of a takeover; one older than this was
# left by a worker killed in between.
BREAKING_TIMEOUT_S = 60.0
HEARTBEAT_S = 60.0
STALE_AFTER_S = 15 * 60.0


def _process_start(pid: int) -> str | None:
    """When `pid` started (Linux: clock ticks since boot), so a recycled pid is not taken for the claimer."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the name in parentheses may hold spaces
    return fields[19] if len(fields) > 19 else None


def _process_alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        if state in ("Z", "X"):  # killed, not yet reaped by its parent
            return False
    except (OSError, IndexError):
        pass
    now = _process_start(pid)
    return not (started and now and now != started)


def describe(holder: dict) -> str:
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"


def _untouched_for(path: Path) -> float:
    with contextlib.suppress(OSError):
        return time.time() - path.stat().st_mtime
    return 0.0


def stale(holder: dict, claim_path: Path) -> bool:
    """Whether a claim's process is dead: on its own host, its pid; on another host, no heartbeat for
    `STALE_AFTER_S`."""
    if not holder:  # unreadable: a worker died between O_EXCL create and write (fallback path only)
        return _untouched_for(claim_path) > BREAKING_TIMEOUT_S
    if holder.get("host") != socket.gethostname():
        return _untouched_for(claim_path) > STALE_AFTER_S
    try:
        pid = int(holder["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    return not _process_alive(pid, holder.get("pid_start"))


def _create_exclusive(path: Path, content: bytes) -> bool:
    """Create `path` holding `content` unless it exists, in one atomic step; True if this call created it."""
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    staging.write_bytes(content)
    try:
        os.link(staging, path)
        return True
    except FileExistsError:
        # Over NFS a retried link whose first reply was lost reports EEXIST although it worked: the
        # staging file's link count tells.
        return os.stat(staging).st_nlink == 2
    except OSError:  # no hard links on this filesystem (some FUSE and SMB mounts)
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "wb") as out:
            out.write(content)
        return True
    finally:
        with contextlib.suppress(OSError):
            staging.unlink()


def _read(path: Path) -> tuple[bytes | None, dict]:
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        return None, {}
    try:
        holder = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        holder = {}
    return content, holder if isinstance(holder, dict) else {}


@dataclass
class Claim:
    """This worker's claim on one run directory."""

    path: Path
    content: bytes
    took_over: dict | None = None  # the stale claim it replaced
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def __post_init__(self) -> None:
        threading.Thread(target=self._heartbeat, name=f"claim heartbeat {self.path}", daemon=True).start()

    def _heartbeat(self) -> None:
        """Touch the claim while this worker holds it, so workers on other hosts see it alive."""
        while not self._stop.wait(HEARTBEAT_S):
            content, _ = _read(self.path)
            if content != self.content:
                return  # taken over: this worker was judged dead
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Remove the claim if it is still this worker's (never another's that replaced it)."""
        self._stop.set()
        content, _ = _read(self.path)
        if content == self.content:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def _take_over(path: Path, stale_content: bytes) -> None:
    """Remove a stale claim, unless another worker has replaced it meanwhile.

    Takeovers are serialised by a ".breaking" file: without it, two workers that both judged the same claim
    stale could each remove one, the second removing the first one's fresh claim.
    """
    breaking = path.with_name(path.name + ".breaking")
    me = json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode()
    if not _create_exclusive(breaking, me):
        with contextlib.suppress(OSError):
            if time.time() - breaking.stat().st_mtime > BREAKING_TIMEOUT_S:
                breaking.unlink()
        return
    try:
        content, _ = _read(path)
        if content == stale_content:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    finally:
        with contextlib.suppress(FileNotFoundError):
            breaking.unlink()


def claim_beside(folder: Path) -> Path:
    """Where a claim on `folder` itself (not on work inside it) is kept: a hidden file beside it."""
    folder = Path(folder).absolute()
    return folder.parent / f".{folder.name}.claim.json"


def acquire(run_dir: Path, path: Path | None = None) -> Claim | dict:
    """Claim `run_dir` for this process (in `path`, by default `<run_dir>/claim.json`): a `Claim`, or the
    record of the live process holding it."""
    path = Path(path) if path is not None else run_dir / CLAIM
    path.parent.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    record = {"host": socket.gethostname(), "pid": pid, "pid_start": _process_start(pid),
              "claimed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": uuid.uuid4().hex}
    content = (json.dumps(record, indent=2) + "\n").encode()
    took_over = None
    for _ in range(3):  # a takeover raced by another worker's ends in its claim on the next round
        if _create_exclusive(path, content):
            return Claim(path, content, took_over)
        current, holder = _read(path)
        if current is None:
            continue  # released meanwhile
        if not stale(holder, path):
            return holder or {"host": "?", "pid": "?"}
        _take_over(path, current)
        took_over = holder
    _, holder = _read(path)
    return holder or {"host": "?", "pid": "?"}
