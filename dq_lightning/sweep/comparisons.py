"""What a sweep's points say beyond their scores: intervals, seeds, and whether distillation pays off.

Every run's test wrote `test_predictions.jsonl` (`dq_lightning.evaluation.per_example`); from those files:
- each run's 95% bootstrap interval of the sweep's metric, and its paired difference to the teacher;
- the runs of one grid point over several seeds (`seed_everything` as a sweep parameter) as one point:
  mean, standard deviation and n of the metric;
- at every grid point run both as `dq` and as `quant_only`, dq minus quant_only (the seed-averaged systems,
  compared example by example) with its interval and paired p-value;
- for every other sweep parameter with several values (a recipe, a data share, a loss weight), each value minus
  the sweep file's first one at every grid point where both finished, paired the same way, with both sides'
  share of the teacher's score and their loyalty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dq_lightning.errors import UserError
from dq_lightning.evaluation.bootstrap import Difference, align, interval, paired_difference
from dq_lightning.evaluation.per_example import FILE_NAME, read_predictions
from dq_lightning.sweep.spec import SEED_PARAMETER

@dataclass(frozen=True)
class Bootstrap:
    """How the 95% intervals are drawn: resamples of the test examples and their generator's seed."""

    resamples: int = 1000
    seed: int = 0


def predictions_of(run_dir: Path, metric: str) -> list[dict[str, Any]] | None:
    """A run's per-example rows, or None when it has none (not tested yet, or tested before they existed)."""
    path = Path(run_dir) / FILE_NAME
    return read_predictions(path, metric) if path.is_file() else None


def point_key(row: dict[str, Any]) -> str:
    """What makes a grid point, apart from the mode and the seed: the other sweep parameters (and a supernet's
    point is its own, never a seed of the trained one)."""
    params = {k: v for k, v in (row.get("params") or {}).items() if k not in ("model.mode", SEED_PARAMETER)}
    if not params:
        params = {"bits": row.get("bits"), "depth": f"{row.get('encoder_layers')}-{row.get('decoder_layers')}"}
        if row.get("width") not in (None, "", "full"):  # a thinner student is another point at the same depth
            params["width"] = row["width"]
    key = " ".join(f"{k.removeprefix('model.')}={v}" for k, v in params.items())
    return key if row.get("source", "trained") == "trained" else f"{key} source={row['source']}"


def point_identity(row: dict[str, Any]) -> tuple | None:
    """The point a run is, whatever sweep made it: bits, depth and (an ETD-Impt) width; None for a point that a
    supernet cannot be (another mode, ETD-Rand units)."""
    width = row.get("width") or "full"  # DQStudentModule.width_label: full, or the widths and "impt"/"rand"
    if row.get("mode") != "dq" or width.endswith(" rand"):
        return None
    return row.get("bits"), f"{row.get('encoder_layers')}-{row.get('decoder_layers')}", width


def supernet_table(rows: list[dict[str, Any]], predictions: dict[str, list[dict]], metric: str,
                   bootstrap: Bootstrap) -> list[dict[str, Any]]:
    """At every point extracted from a supernet and also trained on its own (one seed: the first finished run):
    supernet minus trained, paired over test examples, and both loyalties."""
    trained: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        if row.get("source", "trained") == "trained" and row.get("status") == "finished" and point_identity(row):
            trained.setdefault(point_identity(row), row)
    table = []
    for row in rows:
        identity = point_identity(row)
        if not str(row.get("source", "")).startswith("supernet") or row.get("status") != "finished" \
                or identity not in trained:
            continue
        other = trained[identity]
        line: dict[str, Any] = {"point": " ".join(part for part in identity if part != "full")
                                + ("" if row["source"] == "supernet" else f" ({row['source']})"),
                                "compression": row.get("compression"), "supernet": row.get(f"test/{metric}"),
                                "trained": other.get(f"test/{metric}"), "trained_run": other["run_id"]}
        for side, source in (("supernet", row), ("trained", other)):
            for name in ("label_loyalty", "prob_loyalty"):
                line[f"{side}_{name}"] = source.get(f"test/{name}")
        mine, theirs = predictions.get(row["run_id"]), predictions.get(other["run_id"])
        if mine is not None and theirs is not None:
            try:
                difference = paired_difference(mine, theirs, metric, bootstrap.resamples, bootstrap.seed)
                line.update(delta=difference.point, low=difference.low, high=difference.high, p=difference.p_value)
            except UserError as error:
                line["note"] = str(error)
        table.append(line)
    return table


def _number(value: Any, digits: int = 2) -> str:
    """A table cell: the number to `digits` places, or empty for a missing one (None, "", NaN)."""
    return "" if value in (None, "") or (isinstance(value, float) and math.isnan(value)) else \
        f"{float(value):.{digits}f}"


def supernet_markdown(table: list[dict[str, Any]], metric: str) -> str:
    """The "supernet vs separately trained" table."""
    header = ["point", "compression", f"supernet {metric}", f"trained {metric}", "supernet - trained",
              "95% interval", "p", "label loyalty s/t", "prob. loyalty s/t"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    for line in table:
        span = f"[{line['low']:+.2f}, {line['high']:+.2f}]" if "delta" in line else line.get("note", "")
        lines.append("| " + " | ".join([
            line["point"], _number(line.get("compression"), 1), _number(line["supernet"]), _number(line["trained"]),
            f"{line['delta']:+.2f}" if "delta" in line else "", span, _number(line.get("p"), 3),
            f"{_number(line['supernet_label_loyalty'], 3)} / {_number(line['trained_label_loyalty'], 3)}",
            f"{_number(line['supernet_prob_loyalty'], 3)} / {_number(line['trained_prob_loyalty'], 3)}"]) + " |")
    return "\n".join(lines)


def add_intervals(rows: list[dict[str, Any]], run_dirs: dict[str, Path], metric: str,
                  bootstrap: Bootstrap) -> dict[str, list[dict]]:
    """Add `test/<metric>_low/_high` to every row with predictions, and `test/<metric>_vs_teacher` with its
    interval and p-value where the teacher's predictions cover the same examples. Returns the rows' predictions
    by run id."""
    predictions = {}
    for row in rows:
        found = predictions_of(run_dirs[row["run_id"]], metric) if row["run_id"] in run_dirs else None
        if found is None:
            continue
        predictions[row["run_id"]] = found
        bounds = interval(found, metric, bootstrap.resamples, bootstrap.seed)
        row[f"test/{metric}_low"], row[f"test/{metric}_high"] = bounds.low, bounds.high
    teacher = predictions.get("teacher")
    for row in rows:
        if teacher is None or row["run_id"] == "teacher" or row["run_id"] not in predictions:
            continue
        try:
            delta = paired_difference(predictions[row["run_id"]], teacher, metric, bootstrap.resamples,
                                      bootstrap.seed)
        except UserError:
            continue  # tested on other examples than the teacher: no paired difference
        row[f"test/{metric}_vs_teacher"] = delta.point
        row[f"test/{metric}_vs_teacher_low"], row[f"test/{metric}_vs_teacher_high"] = delta.low, delta.high
        row[f"test/{metric}_vs_teacher_p"] = delta.p_value
    return predictions


@dataclass
class Group:
    """The finished runs of one grid point in one mode, over seeds."""

    key: str
    mode: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    def values(self, column: str) -> list[float]:
        return [float(row[column]) for row in self.rows if row.get(column) not in (None, "")]

    def scores(self, metric: str) -> list[float]:
        return self.values(f"test/{metric}")

    def average(self, column: str) -> float | None:
        values = self.values(column)
        return float(np.mean(values)) if values else None

    def mean(self, metric: str) -> float | None:
        return self.average(f"test/{metric}")


def group_runs(rows: list[dict[str, Any]]) -> dict[tuple[str, str], Group]:
    groups: dict[tuple[str, str], Group] = {}
    for row in rows:
        if row.get("mode") == "teacher" or row.get("status") != "finished":
            continue
        key = (point_key(row), row.get("mode", ""))
        groups.setdefault(key, Group(*key)).rows.append(row)
    return groups


def seed_summary(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """One line per grid point and mode: the metric's mean, standard deviation (n - 1) and n over seeds."""
    summary = []
    # Runs that name no seed are not seeds of one point, even when nothing else tells them apart (a results
    # file without the sweep's parameters, or runs left by another sweep file in the same directory).
    seeded = [row for row in rows if row.get("seed") not in (None, "")]
    for group in group_runs(seeded).values():
        scores = group.scores(metric)
        if not scores:
            continue
        first = group.rows[0]
        summary.append({"point": group.key, "mode": group.mode, "compression": first.get("compression"),
                        "mean": float(np.mean(scores)), "sd": float(np.std(scores, ddof=1)) if len(scores) > 1
                        else 0.0, "n": len(scores)})
    return summary


def _averaged(runs: list[list[dict[str, Any]]], metric: str) -> list[dict[str, Any]]:
    """One system whose every example is the mean over seeds (BLEU: the summed n-gram counts)."""
    key = "bleu_stats" if metric == "bleu" else metric
    base = runs[0]
    aligned = [base] + [align(base, other)[1] for other in runs[1:]]
    averaged = []
    for position, row in enumerate(base):
        values = np.mean([np.asarray(run[position][key], dtype=np.float64) for run in aligned], axis=0)
        averaged.append({**row, key: values.tolist() if metric == "bleu" else float(values)})
    return averaged


def _add_paired(line: dict[str, Any], first: Group, second: Group, predictions: dict[str, list[dict]],
                metric: str, bootstrap: Bootstrap) -> dict[str, Any]:
    """`line` with the first group minus the second, their seed-averaged systems paired over test examples
    (delta, low, high, p), or a note saying why there is no paired difference."""
    sides = [[predictions.get(row["run_id"]) for row in group.rows] for group in (first, second)]
    if not all(run is not None for side in sides for run in side):
        line["note"] = "no per-example predictions (tested before they were written)"
        return line
    try:
        difference: Difference = paired_difference(_averaged(sides[0], metric), _averaged(sides[1], metric),
                                                   metric, bootstrap.resamples, bootstrap.seed)
        line.update(delta=difference.point, low=difference.low, high=difference.high, p=difference.p_value)
    except UserError as error:
        line["note"] = str(error)
    return line


def distillation_table(rows: list[dict[str, Any]], predictions: dict[str, list[dict]], metric: str,
                       bootstrap: Bootstrap) -> list[dict[str, Any]]:
    """At every grid point with finished dq and quant_only runs: dq minus quant_only, paired over examples."""
    groups = group_runs(rows)
    table = []
    for key in dict.fromkeys(key for key, _ in groups):
        dq, quant_only = groups.get((key, "dq")), groups.get((key, "quant_only"))
        if dq is None or quant_only is None:
            continue
        line: dict[str, Any] = {"point": key, "compression": dq.rows[0].get("compression"),
                                "dq": dq.mean(metric), "quant_only": quant_only.mean(metric),
                                "seeds": f"{len(dq.rows)}/{len(quant_only.rows)}"}
        table.append(_add_paired(line, dq, quant_only, predictions, metric, bootstrap))
    return table


def paired_verdict(line: dict[str, Any], first: str, second: str, alpha: float = 0.05) -> str:
    """What a line of a paired table (`first` minus `second`) shows. The percentile interval and the shifted-null
    p-value are two readings of the same resamples; on a skewed statistic (corpus BLEU) they can disagree near
    the edge, and then the table says so rather than picking the one that declares a winner."""
    excludes_zero = line["low"] > 0 or line["high"] < 0
    significant = line.get("p") is not None and line["p"] < alpha
    if excludes_zero and significant:
        return f"{first} better" if line["low"] > 0 else f"{second} better"
    if excludes_zero or significant:
        return "borderline: interval and p disagree"
    return "no difference shown"


def _verdict_and_interval(line: dict[str, Any], first: str, second: str) -> tuple[str, str]:
    """A paired line's verdict and interval cells; a line without a difference shows why in the verdict's."""
    if "delta" not in line:
        return line.get("note", ""), ""
    return paired_verdict(line, first, second), f"[{line['low']:+.2f}, {line['high']:+.2f}]"


# Parameters that are not contrasted value against value: the trade-off chart's axes, the mode (the distillation
# table's), and the seed (averaged over).
NOT_CONTRASTED = ("model.bits", "model.depth", "model.width", "model.mode", SEED_PARAMETER)


@dataclass(frozen=True)
class Contrast:
    """One value of a sweep parameter against the sweep file's first value of it, the baseline."""

    parameter: str
    baseline: Any
    value: Any


def contrasts(rows: list[dict[str, Any]]) -> list[Contrast]:
    """Every other value of every contrasted parameter that trained runs of the sweep hold more than one value
    of, against the first value (the rows come in the sweep file's grid order, so its first listed value)."""
    values: dict[str, list[Any]] = {}
    for row in rows:
        if row.get("mode") == "teacher" or row.get("source", "trained") != "trained":
            continue
        for name, value in (row.get("params") or {}).items():
            if name not in NOT_CONTRASTED and value not in values.setdefault(name, []):
                values[name].append(value)
    return [Contrast(name, seen[0], value) for name, seen in values.items() for value in seen[1:]]


def contrast_table(rows: list[dict[str, Any]], predictions: dict[str, list[dict]], metric: str,
                   bootstrap: Bootstrap, contrast: Contrast) -> list[dict[str, Any]]:
    """At every grid point (the other parameters, the mode) where both the contrast's value and its baseline
    finished: value minus baseline over the seed-averaged systems, paired over test examples, each side's share
    of the teacher's test score and its loyalty to the teacher."""
    teacher = next((row.get(f"test/{metric}") for row in rows if row.get("mode") == "teacher"), None)
    groups: dict[tuple[str, str, str], Group] = {}
    for row in rows:
        params = row.get("params") or {}
        if row.get("mode") == "teacher" or row.get("status") != "finished" \
                or row.get("source", "trained") != "trained" or contrast.parameter not in params:
            continue
        rest = {name: value for name, value in params.items() if name != contrast.parameter}
        key = point_key({**row, "params": rest})
        side = repr(params[contrast.parameter])
        groups.setdefault((key, row.get("mode", ""), side), Group(key, row.get("mode", ""))).rows.append(row)

    table = []
    for key, mode in dict.fromkeys((key, mode) for key, mode, _ in groups):
        base, other = (groups.get((key, mode, repr(side))) for side in (contrast.baseline, contrast.value))
        if base is None or other is None:
            continue
        line: dict[str, Any] = {"point": key, "mode": mode, "compression": other.rows[0].get("compression"),
                                "baseline": base.mean(metric), "value": other.mean(metric),
                                "seeds": f"{len(base.rows)}/{len(other.rows)}"}
        for side, group in (("baseline", base), ("value", other)):
            score = line[side]
            line[f"{side}_of_teacher"] = (score / float(teacher) if score is not None
                                          and teacher not in (None, "") and float(teacher) > 0 else None)
            for name in ("label_loyalty", "prob_loyalty"):
                line[f"{side}_{name}"] = group.average(f"test/{name}")
        table.append(_add_paired(line, other, base, predictions, metric, bootstrap))
    return table


def contrast_markdown(table: list[dict[str, Any]], metric: str, contrast: Contrast) -> str:
    """The table of one contrast: `value` minus `baseline` at every grid point."""
    base, value = str(contrast.baseline), str(contrast.value)
    header = ["grid point", "mode", "compression", f"{base} {metric}", f"{value} {metric}",
              "of teacher b/v", "seeds b/v", f"{value} - {base}", "95% interval", "p", "verdict",
              "label loyalty b/v", "prob. loyalty b/v"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def share(value):
        return "" if value is None else f"{100 * value:.0f}%"

    for line in table:
        verdict, span = _verdict_and_interval(line, value, base)
        lines.append("| " + " | ".join([
            line["point"], line["mode"], _number(line.get("compression"), 1), _number(line["baseline"]),
            _number(line["value"]),
            f"{share(line['baseline_of_teacher'])} / {share(line['value_of_teacher'])}", line["seeds"],
            f"{line['delta']:+.2f}" if "delta" in line else "", span, _number(line.get("p"), 3), verdict,
            f"{_number(line['baseline_label_loyalty'], 3)} / {_number(line['value_label_loyalty'], 3)}",
            f"{_number(line['baseline_prob_loyalty'], 3)} / {_number(line['value_prob_loyalty'], 3)}"]) + " |")
    return "\n".join(lines)


def distillation_markdown(table: list[dict[str, Any]], metric: str) -> str:
    """The "does distillation pay off" table."""
    header = ["grid point", "compression", f"dq {metric}", f"quant_only {metric}", "seeds dq/qo", "dq - quant_only",
              "95% interval", "p", "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    for line in table:
        verdict, span = _verdict_and_interval(line, "dq", "quant_only")
        lines.append("| " + " | ".join([line["point"], _number(line.get("compression"), 1), _number(line.get("dq")),
                                         _number(line.get("quant_only")), line["seeds"],
                                         f"{line['delta']:+.2f}" if "delta" in line else "", span,
                                         _number(line.get("p"), 3), verdict]) + " |")
    return "\n".join(lines)
