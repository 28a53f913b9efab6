"""Per-example test results: what each test example was, what the model wrote, and its own score.

A test writes them to `test_predictions.jsonl` beside `test_metrics.json`, one JSON object per example:
`index` (row of the test split), `id` (the split's id column, where it has one), `source` (what the model
read, cut to `SOURCE_CHARS`), `reference`, `prediction`, and either ROUGE-1/2/L/Lsum (percent) or, for
translation, sentence BLEU (percent, smoothed, for reading) plus `bleu_stats`, the example's n-gram match
counts. Corpus scores are rebuilt from these rows exactly: ROUGE as torchmetrics reports it is the mean of
the per-example F-measures, and corpus BLEU comes from the summed n-gram counts (a mean of sentence BLEUs
is a different number). That is what lets `dq_lightning.evaluation.bootstrap` resample examples.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dq_lightning.data.jsonl import read_records
from dq_lightning.errors import UserError
from dq_lightning.files import write_text_atomic
from dq_lightning.metrics import ROUGE_KEYS, OfflineROUGEScore

FILE_NAME = "test_predictions.jsonl"
SOURCE_CHARS = 500
BLEU_ORDER = 4
REQUIRED = ("index", "reference", "prediction")


def bleu_stats(prediction: str, reference: str, metric=None) -> list[float]:
    """[matches_1..4, totals_1..4, prediction length, reference length] of one pair, counted by torchmetrics'
    SacreBLEU (13a tokenizer), so that their sums give its corpus BLEU."""
    from torchmetrics.text import SacreBLEUScore

    metric = metric or SacreBLEUScore(tokenize="13a")
    metric.reset()
    metric.update([prediction], [[reference]])
    return [*metric.numerator.tolist(), *metric.denominator.tolist(), float(metric.preds_len),
            float(metric.target_len)]


def corpus_bleu(stats: np.ndarray) -> np.ndarray:
    """BLEU (percent) of summed `bleu_stats`: one row (shape (10,)) or a batch of them (shape (..., 10)).

    The formula of torchmetrics' unsmoothed corpus BLEU: brevity penalty times the geometric mean of the four
    n-gram precisions, 0 when any order has no match.
    """
    stats = np.asarray(stats, dtype=np.float64)
    matches, totals = stats[..., :BLEU_ORDER], stats[..., BLEU_ORDER:2 * BLEU_ORDER]
    prediction_length, reference_length = stats[..., 2 * BLEU_ORDER], stats[..., 2 * BLEU_ORDER + 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        log_precision = np.log(matches / totals).mean(axis=-1)
        brevity = np.where(prediction_length > reference_length, 0.0,
                           1.0 - reference_length / prediction_length)
        score = np.exp(log_precision + brevity) * 100
    return np.where((matches == 0).any(axis=-1) | (prediction_length == 0), 0.0, score)


def sentence_bleu(stats: list[float]) -> float:
    """A readable per-example BLEU (percent): add-one smoothing of the orders above 1, as torchmetrics'
    `smooth=True`; unsmoothed, most single sentences score 0."""
    smoothed = list(stats)
    for order in range(1, BLEU_ORDER):
        smoothed[order] += 1
        smoothed[BLEU_ORDER + order] += 1
    return float(corpus_bleu(np.array(smoothed)))


def score_rows(rows: list[dict[str, Any]], translation: bool) -> list[dict[str, Any]]:
    """Add each row's own score (ROUGE-1/2/L/Lsum, or sentence BLEU and its n-gram counts)."""
    if translation:
        from torchmetrics.text import SacreBLEUScore

        metric = SacreBLEUScore(tokenize="13a")
        for row in rows:
            row["bleu_stats"] = bleu_stats(row["prediction"], row["reference"], metric)
            row["bleu"] = sentence_bleu(row["bleu_stats"])
        return rows
    metric = OfflineROUGEScore(use_stemmer=True, rouge_keys=ROUGE_KEYS)
    for row in rows:
        metric.reset()
        scores = metric([row["prediction"]], [row["reference"]])
        for key in ROUGE_KEYS:
            row[key] = float(scores[f"{key}_fmeasure"]) * 100
    return rows


def corpus_score(rows: list[dict[str, Any]], metric: str) -> float:
    """The split's score rebuilt from its rows (equal to what the test logged)."""
    if metric == "bleu":
        return float(corpus_bleu(np.sum([row["bleu_stats"] for row in rows], axis=0)))
    return float(np.mean([row[metric] for row in rows]))


def gather_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's rows, once each, in test-split order. A distributed sampler pads the last batches with
    repeated examples so that every rank gets as many; the repeats are dropped here."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        every_rank: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(every_rank, rows)
        rows = [row for rank_rows in every_rank for row in rank_rows]
    unique = {row["index"]: row for row in rows}
    return [unique[index] for index in sorted(unique)]


def write_predictions(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write the rows as JSON Lines, atomically (a reader sees the old file or the new one)."""
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return Path(path)


def read_predictions(path: Path, metric: str) -> list[dict[str, Any]]:
    """Rows of a predictions file that all carry `metric`; `UserError` naming file and line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such predictions file (a test writes it)")
    needed = (*REQUIRED, "bleu_stats" if metric == "bleu" else metric)
    rows = []
    for line_number, row in read_records(path):
        missing = [key for key in needed if key not in row]
        if missing:
            raise UserError(f"{path}:{line_number}: missing {', '.join(missing)}")
        value = row[needed[-1]]
        valid = (isinstance(value, list) and len(value) == 2 * BLEU_ORDER + 2) if metric == "bleu" else (
            isinstance(value, (int, float)) and math.isfinite(value))
        if not valid:
            raise UserError(f"{path}:{line_number}: {needed[-1]} is not a valid score ({value!r})")
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no predictions in it")
    return rows
