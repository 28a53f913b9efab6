"""The processes and threads of a sweep: how many runs train at once, how they share the cores, how a stop
(Ctrl-C, SIGTERM) reaches every worker, and the line that says why a run failed. Below the sweep's runner and
its robustness pass, which both use them."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from dq_lightning.errors import UserError


def last_error(log: Path) -> str:
    """The most telling line of a failed run's log: our one-line error, else the exception line."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except FileNotFoundError:
        return "no log"
    for line in reversed(lines):
        if line.startswith("error:"):
            return line
    for line in reversed(lines):
        if "Error" in line.split(":")[0] or "Exception" in line.split(":")[0]:
            return line[:500]
    return lines[-1][:500] if lines else "exited without output"


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler preempting the job, `kill`), unwound like Ctrl-C: the run is recorded as interrupted
    and its claim released, so a job requeued on another node can take the point over."""


def on_sigterm(signum, frame) -> None:
    raise Terminated()


class Stop:
    """How the main thread tells the worker threads of `--workers N` to stop: with the interrupt it got, so each
    stops its run as a single worker would (Ctrl-C reached the runs too; a SIGTERM did not)."""

    def __init__(self) -> None:
        self.reason: KeyboardInterrupt | None = None

    def set(self, reason: KeyboardInterrupt) -> None:
        self.reason = reason

    def raise_if_set(self) -> None:
        if self.reason is not None:
            raise type(self.reason)()


def run_threads(work, count: int, name: str, stopping: Stop) -> None:
    """`work()` in `count` threads until all return; Ctrl-C in the main thread tells them through `stopping`
    (they stop their child processes as a single worker would) and is raised once they have."""
    threads = [threading.Thread(target=work, name=f"{name} {number}", daemon=True) for number in range(1, count + 1)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():  # joined in slices: the main thread must stay free to take signals
                thread.join(0.2)
    except KeyboardInterrupt as interrupt:
        stopping.set(interrupt)
        for thread in threads:
            thread.join()
        raise


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_workers(value: str, points: int, gpus: int | None) -> int:
    """`--workers`: a positive number, or `auto`: one per core on a machine without GPUs (at most one per grid
    point), else one: every run spreads over all the GPUs."""
    if value == "auto":
        from dq_lightning.devices import cuda_devices

        return 1 if gpus or cuda_devices() else max(1, min(available_cores(), points))
    try:
        workers = int(value)
    except ValueError:
        workers = 0
    if workers < 1:
        raise UserError(f"--workers {value} (make: WORKERS): give a positive number of workers or auto")
    if workers > 1 and gpus:
        raise UserError(f"--workers {value} (make: WORKERS) with --gpus {gpus}: every run already uses all the "
                        f"GPUs (DDP); run one worker per machine")
    return workers


def thread_environment(workers: int) -> dict[str, str] | None:
    """The environment of each run when `workers` share this machine: its share of the cores as the number of
    threads, unless the user set one; None (inherit) for a single worker."""
    if workers == 1:
        return None
    threads = str(max(1, available_cores() // workers))
    return {**os.environ, **{name: os.environ.get(name, threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}}
