"""Robustness of a sweep's teacher and finished runs (opt-in: `sweep --robustness RATE`, make ROBUSTNESS=RATE).

Each model is scored by `python -m dq_lightning robustness` (its own process, logged to the run's
`robustness.log`) into `<run>/robustness/rate-<rate>/robustness.json`, once: a sweep run again skips what
is there. The report reads every rate found back as columns `robust<rate>/<measure>` of results.csv and the
W&B summary (e.g. `robust0.1/drop`, `robust0.1/label_loyalty`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from dq_lightning.evaluation.robustness import MEASURES, default_out_dir

REPORT = "robustness.json"
COLUMN_PREFIX = "robust"


def report_path(run_dir: Path, rate: float) -> Path:
    return default_out_dir(run_dir, rate) / REPORT


def columns(run_dir: Path) -> dict[str, Any]:
    """The measured model's robustness at every rate measured for `run_dir`, as result columns."""
    found: dict[str, Any] = {}
    for path in sorted(run_dir.glob(f"robustness/rate-*/{REPORT}")):
        try:
            report = json.loads(path.read_text())
            model = report["models"][0]
            rate = float(report["rate"])
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            continue  # a half-written or foreign file: measured again when the sweep asks for it
        found.update({f"{COLUMN_PREFIX}{rate:g}/{measure}": model[measure] for measure in MEASURES
                      if model.get(measure) is not None})
    return found


def command(model_dir: Path, rate: float, data_dir: str | None, test_file: str | None,
            decode_cache: Path | None = None) -> list[str]:
    source = ["--test-file", test_file] if test_file else ["--data-dir", data_dir] if data_dir else []
    cache = ["--decode-cache", str(decode_cache)] if decode_cache is not None else []
    return [sys.executable, "-m", "dq_lightning", "robustness", "--run", str(model_dir), "--rate", f"{rate:g}",
            *source, *cache]


def measure_all(run_dirs: list[Path], rate: float, data_dir: str | None, test_file: str | None, run_logged,
                workers: int = 1, env: dict[str, str] | None = None,
                decode_cache: Path | None = None) -> list[tuple[str, str, str]]:
    """Score every directory of `run_dirs` not scored at `rate` yet; the failures as (run, stage, error).

    The first directory (the sweep's teacher) is scored alone, so that its decodes are in `decode_cache`
    before the students, which decode the teacher on the same sources, ask for them; the rest run
    `workers` at a time (each in `env`, its share of the cores)."""
    from dq_lightning.sweep.workers import Stop, last_error

    failed: list[tuple[str, str, str]] = []

    def score(run_dir: Path, stopping: Stop | None = None) -> None:
        if report_path(run_dir, rate).is_file():
            return  # scored already, or meanwhile by another sweep process (a second worker of the same sweep)
        log = run_dir / "robustness.log"
        print(f"{run_dir.name}: robustness at rate {rate:g} ...", flush=True)
        if run_logged(command(run_dir, rate, data_dir, test_file, decode_cache), log, env, stopping) != 0:
            failed.append((run_dir.name, "robustness", last_error(log)))
            print(f"{run_dir.name}: FAILED in robustness: {last_error(log)} (log: {log})", flush=True)

    for run_dir in run_dirs[:1] if workers > 1 else run_dirs:
        score(run_dir)
    if workers > 1:
        _in_threads(run_dirs[1:], workers, score, Stop())
    return failed


def _in_threads(run_dirs: list[Path], workers: int, score, stopping) -> None:
    """`score(run_dir, stopping)` for every directory, `workers` threads at a time; Ctrl-C stops them all."""
    import queue

    from dq_lightning.sweep.workers import run_threads

    pending: queue.SimpleQueue[Path] = queue.SimpleQueue()
    for run_dir in run_dirs:
        pending.put(run_dir)

    def work() -> None:
        while True:
            try:
                run_dir = pending.get_nowait()
            except queue.Empty:
                return
            try:
                score(run_dir, stopping)
            except KeyboardInterrupt:
                return  # stopped by the main thread, which raises the interrupt itself

    run_threads(work, workers, "robustness worker", stopping)
