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

from dq_lightning.errors import UserError
from dq_lightning.evaluation.robustness import MEASURES, default_out_dir

REPORT = "robustness.json"
COLUMN_PREFIX = "robust"


def check_rate(rate: float | None, flag: str = "--robustness") -> float | None:
    if rate is not None and not 0 <= rate <= 1:
        raise UserError(f"{flag} {rate:g} (make: ROBUSTNESS): a perturbation rate is a share of words, in [0, 1]")
    return rate


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


def command(model_dir: Path, rate: float, data_dir: str | None, test_file: str | None) -> list[str]:
    source = ["--test-file", test_file] if test_file else ["--data-dir", data_dir] if data_dir else []
    return [sys.executable, "-m", "dq_lightning", "robustness", "--run", str(model_dir), "--rate", f"{rate:g}",
            *source]


def measure_all(run_dirs: list[Path], rate: float, data_dir: str | None, test_file: str | None,
                run_logged) -> list[tuple[str, str, str]]:
    """Score every directory of `run_dirs` not scored at `rate` yet; the failures as (run, stage, error)."""
    from dq_lightning.sweep.runner import last_error

    failed = []
    for run_dir in run_dirs:
        if report_path(run_dir, rate).is_file():
            continue
        log = run_dir / "robustness.log"
        print(f"{run_dir.name}: robustness at rate {rate:g} ...", flush=True)
        if run_logged(command(run_dir, rate, data_dir, test_file), log) != 0:
            failed.append((run_dir.name, "robustness", last_error(log)))
            print(f"{run_dir.name}: FAILED in robustness: {last_error(log)} (log: {log})", flush=True)
    return failed
