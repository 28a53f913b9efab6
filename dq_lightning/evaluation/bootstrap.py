"""Bootstrap intervals over test examples: how far a score, or a difference of two systems, could move
on another sample of the same size.

Examples are resampled with replacement `resamples` times from a seeded generator; a run's interval is the
percentile interval of its corpus score over the resamples. Two systems scored on the same examples are
compared *paired* (Koehn, 2004): each resample takes the same examples for both, so the interval of the
difference leaves out what the examples share (some documents are hard for every model). The p-value is
the two-sided test of "no difference" by shifting the resampled differences to mean zero: the share of
resamples whose difference from the observed one is at least as large as the observed difference itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dq_lightning.errors import UserError
from dq_lightning.evaluation.per_example import corpus_bleu

MIN_RESAMPLES = 100


@dataclass(frozen=True)
class Interval:
    point: float
    low: float
    high: float


@dataclass(frozen=True)
class Difference(Interval):
    p_value: float


def check_resamples(resamples: int, flag: str = "--bootstrap") -> int:
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < MIN_RESAMPLES:
        raise UserError(f"{flag}={resamples}: give at least {MIN_RESAMPLES} bootstrap resamples "
                        "(fewer make the 95% interval's ends noise)")
    return resamples


def example_values(rows: list[dict[str, Any]], metric: str) -> np.ndarray:
    """Per-example values whose resampled statistic is the corpus score: scores (n,) or BLEU counts (n, 10)."""
    key = "bleu_stats" if metric == "bleu" else metric
    return np.asarray([row[key] for row in rows], dtype=np.float64)


def statistic(values: np.ndarray, indices: np.ndarray, metric: str) -> np.ndarray:
    """The corpus score of every resample (`indices` is resamples x examples)."""
    if metric == "bleu":
        return corpus_bleu(values[indices].sum(axis=1))
    return values[indices].mean(axis=1)


def resample_indices(examples: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, examples, size=(check_resamples(resamples), examples))


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    low, high = np.percentile(samples, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(low), float(high)


def interval(rows: list[dict[str, Any]], metric: str, resamples: int = 1000, seed: int = 0,
             level: float = 0.95) -> Interval:
    values = example_values(rows, metric)
    point = float(statistic(values, np.arange(len(values))[None, :], metric)[0])
    samples = statistic(values, resample_indices(len(values), resamples, seed), metric)
    return Interval(point, *_percentiles(samples, level))


def align(rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """The two runs' rows for the same test examples, in one order; `UserError` when the runs were tested on
    different examples (different indices, or another reference at the same index)."""
    by_index = {row["index"]: row for row in rows_b}
    if set(by_index) != {row["index"] for row in rows_a}:
        raise UserError(f"the two runs were tested on different examples ({len(rows_a)} vs {len(rows_b)} rows, "
                        "not the same indices)")
    paired_b = [by_index[row["index"]] for row in rows_a]
    for a, b in zip(rows_a, paired_b):
        if a["reference"] != b["reference"]:
            raise UserError(f"the two runs were tested on different references at test row {a['index']}")
    return rows_a, paired_b


def paired_difference(rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]], metric: str,
                      resamples: int = 1000, seed: int = 0, level: float = 0.95) -> Difference:
    """Score of A minus score of B on the same examples, its interval and two-sided p-value."""
    rows_a, rows_b = align(rows_a, rows_b)
    values_a, values_b = example_values(rows_a, metric), example_values(rows_b, metric)
    everything = np.arange(len(values_a))[None, :]
    observed = float(statistic(values_a, everything, metric)[0] - statistic(values_b, everything, metric)[0])
    indices = resample_indices(len(values_a), resamples, seed)
    differences = statistic(values_a, indices, metric) - statistic(values_b, indices, metric)
    # Identical systems differ by exactly 0 on every resample: p = 1, not the 0/0 of a shifted test.
    extreme = np.abs(differences - observed) >= abs(observed) - 1e-12
    p_value = float((1 + extreme.sum()) / (1 + len(differences)))
    return Difference(observed, *_percentiles(differences, level), p_value=min(1.0, p_value))
