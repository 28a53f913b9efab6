"""Training inputs without references: which training rows keep theirs, and files of sources alone.

A DQ student can learn from an input that has no summary or translation: every term of the DQ objective but the
task cross-entropy needs only the teacher (`dq_lightning.modules.student`, the teacher's own output as the decoder
input). Two sources of such inputs:

- `--data.unlabeled_file`: a JSON Lines file with the task's source column (any other column is ignored);
- `--data.labeled_examples N` / `--data.labeled_fraction F`: of the training split only N rows (or the share F)
  keep their references; with `--data.unlabeled_rest` (the default) the other rows train as unlabeled inputs,
  without it they are left out (a smaller labeled set).

The labeled rows are the first N of a permutation of the training rows drawn from `--data.labeled_seed`, so the
choice is reproducible, independent of the run's seed (runs over several seeds share one labeled set, which
paired comparisons need), and a smaller share is a subset of a larger one with the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dq_lightning.data.jsonl import check_jsonl
from dq_lightning.errors import UserError

SPLIT_FILE = "labeled_split.json"  # written into the run folder: which training rows kept their references


def check_labeled_settings(examples: int | None, fraction: float | None, seed: int,
                           per_labeled: float | None, unlabeled_rest: bool = True,
                           unlabeled_file: str | None = None) -> None:
    """Refuse settings of the labeled share and the mix that cannot mean anything, or that would change nothing
    (no share of the rows chosen, no file given: every row keeps its reference), naming the flag."""
    if examples is not None and fraction is not None:
        raise UserError(f"data.labeled_examples={examples} and data.labeled_fraction={fraction}: give one of them")
    if examples is not None and (isinstance(examples, bool) or not isinstance(examples, int) or examples < 0):
        raise UserError(f"data.labeled_examples={examples!r} must be a number of training rows (0 or more)")
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                 or not 0 <= fraction <= 1):
        raise UserError(f"data.labeled_fraction={fraction!r} must be a share of the training rows, in [0, 1]")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"data.labeled_seed={seed!r} must be an integer")
    if per_labeled is not None and (isinstance(per_labeled, bool) or not isinstance(per_labeled, (int, float))
                                    or not per_labeled >= 0):
        raise UserError(f"data.unlabeled_per_labeled={per_labeled!r} must be 0 or more unlabeled batches per "
                        "labeled batch (unset: every unlabeled input once per epoch)")
    if examples is not None or fraction is not None:
        return
    share = "data.labeled_examples or data.labeled_fraction"
    if seed != 0:
        raise UserError(f"data.labeled_seed={seed} changes nothing without {share} (every training row keeps its "
                        "reference)")
    if not unlabeled_rest:
        raise UserError(f"data.unlabeled_rest=false changes nothing without {share} (no training row loses its "
                        "reference)")
    if per_labeled is not None and unlabeled_file is None:
        raise UserError(f"data.unlabeled_per_labeled={per_labeled} changes nothing: there are no inputs without "
                        f"references to mix in (give data.unlabeled_file, {share})")


def labeled_count(rows: int, examples: int | None, fraction: float | None) -> int:
    """How many of `rows` training rows keep their references."""
    if examples is not None:
        if examples > rows:
            raise UserError(f"data.labeled_examples={examples}: the training split has only {rows} rows")
        return examples
    if fraction is not None:
        return int(fraction * rows + 0.5)  # halves round up
    return rows


def choose_labeled(rows: int, count: int, seed: int) -> list[int]:
    """The training rows (sorted) that keep their references: the first `count` of a seeded permutation."""
    order = np.random.default_rng(seed).permutation(rows)
    return sorted(int(row) for row in order[:count])


@dataclass(frozen=True)
class LabeledSplit:
    """Which training rows keep their references, and which train as unlabeled inputs."""

    rows: int
    """Training rows (after data.max_train_samples)."""
    labeled: tuple[int, ...]
    """Rows that keep their references, sorted."""
    seed: int
    unlabeled_rest: bool
    """The other rows train as unlabeled inputs (else they are left out)."""
    unlabeled_file: str | None = None
    file_rows: int = 0
    """Inputs of data.unlabeled_file."""

    @classmethod
    def choose(cls, rows: int, examples: int | None, fraction: float | None, seed: int, unlabeled_rest: bool,
               unlabeled_file: str | None = None, file_rows: int = 0) -> LabeledSplit:
        count = labeled_count(rows, examples, fraction)
        return cls(rows, tuple(choose_labeled(rows, count, seed) if count < rows else range(rows)), seed,
                   unlabeled_rest, unlabeled_file, file_rows)

    @property
    def rest(self) -> list[int]:
        """Training rows without their references, in stored order: the unlabeled ones if `unlabeled_rest`."""
        kept = set(self.labeled)
        return [row for row in range(self.rows) if row not in kept]

    @property
    def unlabeled_rows(self) -> int:
        return (len(self.rest) if self.unlabeled_rest else 0) + self.file_rows

    def summary(self) -> dict[str, Any]:
        """The counts, for the run summary and W&B."""
        return {"labeled_rows": len(self.labeled), "unlabeled_rows": self.unlabeled_rows,
                "training_rows": self.rows, "labeled_seed": self.seed, "unlabeled_rest": self.unlabeled_rest,
                "unlabeled_file": self.unlabeled_file, "unlabeled_file_rows": self.file_rows}

    def record(self) -> dict[str, Any]:
        """The summary and the rows themselves, as `labeled_split.json` keeps them."""
        return {**self.summary(), "labeled": list(self.labeled),
                "unlabeled_from_training": self.rest if self.unlabeled_rest else [],
                "left_out": [] if self.unlabeled_rest else self.rest}


_CHECKED: dict[tuple, int] = {}  # files already read whole, by path, column, size and time: one read per process


def check_unlabeled_file(path: str, column: str) -> tuple[Path, int]:
    """The file of `--data.unlabeled_file` and its number of rows; a missing or empty file, or one whose rows
    lack the task's source column (or hold no text in it), is one `UserError` naming the flag, the file and the
    column. Run before training (the fit's and the sweep's checks) and again when the DataModule reads the
    file: a file unchanged since it was checked is not read twice."""
    file = Path(str(path)).expanduser()
    wanted = f"one JSON object per line with the task's source column {column!r}"
    if not file.is_file():
        what = "not a file" if file.exists() else "no such file"
        raise UserError(f"--data.unlabeled_file={path}: {what} (it takes {wanted})")
    stat = file.stat()
    key = (str(file.resolve()), column, stat.st_size, stat.st_mtime_ns)
    if key not in _CHECKED:
        try:
            _CHECKED[key] = check_jsonl(file, (column,), required_text=(column,), empty=f"empty; it takes {wanted}")
        except UserError as error:  # check_jsonl's line starts with the file (and the line number)
            raise UserError(f"--data.unlabeled_file={error}") from None
    return file, _CHECKED[key]
