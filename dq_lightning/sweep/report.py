"""Sweep results: `results.csv`, the compression vs quality trade-off plot, a markdown table, a W&B summary.

Everything is rebuilt from the run directories (`<sweep_dir>/<run_id>/{status,fit_metrics,test_metrics}.json`),
so `make report` after a partial or resumed sweep shows exactly what has finished.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import numpy as np

from dq_lightning.errors import UserError
from dq_lightning.files import write_text_atomic
from dq_lightning.quant.config import parse_wea
from dq_lightning.sweep.comparisons import point_key
from dq_lightning.sweep.robustness import COLUMN_PREFIX as ROBUST_PREFIX, columns as robustness_columns
from dq_lightning.sweep.spec import SweepPoint

FIXED_COLUMNS = ["run_id", "status", "source", "mode", "bits", "w_bits", "e_bits", "a_bits", "encoder_layers",
                 "decoder_layers", "width", "seed", "size_mb", "compression", "size_mb_strict", "compression_strict"]
TAIL_COLUMNS = ["wall_time_s", "threads", "error"]


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


BIT_FIELDS = ("w_bits", "e_bits", "a_bits")


def _widths(bits: str | None) -> tuple[int | None, ...]:
    try:
        return parse_wea(bits)
    except UserError:
        return (None,) * 3


def _split(value: str | None, parts: int) -> list[int | None]:
    try:
        numbers = [int(p) for p in str(value).split("-")]
        return numbers if len(numbers) == parts else [None] * parts
    except ValueError:
        return [None] * parts


def run_row(run_dir: Path, point: SweepPoint | None = None, test_dir: Path | None = None) -> dict[str, Any]:
    """A run's line of results.csv; its test metrics from `test_dir` (a re-test on another test set) if given."""
    status = read_json(run_dir / "status.json")
    fit = read_json(run_dir / "fit_metrics.json")
    test = read_json((test_dir or run_dir) / "test_metrics.json").get("metrics", {})
    summary = fit.get("summary", {})
    params = point.params if point else {}
    mode = summary.get("mode") or params.get("model.mode", "")
    bits = summary.get("bits") or params.get("model.bits", "")
    depth = (f"{summary['encoder_layers']}-{summary['decoder_layers']}" if "encoder_layers" in summary
             else params.get("model.depth"))
    # A finished run records its widths; a pending one has only the grid's W-E-A string.
    w, e, a = (summary.get(key) for key in BIT_FIELDS) if BIT_FIELDS[0] in summary else _widths(bits)
    encoder_layers, decoder_layers = _split(depth, 2)
    row: dict[str, Any] = {"run_id": run_dir.name, "status": status.get("status", "pending"), "mode": mode,
                           "bits": bits, "w_bits": w, "e_bits": e, "a_bits": a,
                           "encoder_layers": encoder_layers, "decoder_layers": decoder_layers,
                           "width": summary.get("width") or params.get("model.width") or "full",
                           "seed": params.get("seed_everything"), "params": params,
                           # trained point by point, or extracted from a supernet (`sweep --from-supernet`)
                           "source": summary.get("source", "trained"), "supernet_run": summary.get("supernet_run")}
    val = fit.get("metrics", {})
    for key in ("size_mb", "compression", "size_mb_strict", "compression_strict"):
        row[key] = test.get(f"test/{key}", val.get(f"val/{key}"))
    row.update({k: v for k, v in val.items() if k.startswith("val/")})
    row.update(test)
    row.update(robustness_columns(run_dir))
    row["wall_time_s"] = status.get("wall_time_s")
    row["threads"] = fit.get("threads")
    row["error"] = status.get("error", "")
    return row


def teacher_row(teacher_dir: Path, test_dir: Path | None = None) -> dict[str, Any] | None:
    """The teacher as a reference point (compression 1), from its own test/fit metrics files."""
    test = read_json((test_dir or teacher_dir) / "test_metrics.json").get("metrics", {})
    fit = read_json(teacher_dir / "fit_metrics.json")
    if not test and not fit:
        return None
    row = {"run_id": "teacher", "status": "finished", "mode": "teacher", "width": "full", "bits": "32-32-32",
           "w_bits": 32, "e_bits": 32, "a_bits": 32, "compression": 1.0, "compression_strict": 1.0,
           "wall_time_s": fit.get("wall_time_s"), "threads": fit.get("threads"), "error": ""}
    row.update({k: v for k, v in fit.get("metrics", {}).items() if k.startswith("val/")})
    row.update(test)
    row.update(robustness_columns(teacher_dir))
    return row


def columns_of(rows: list[dict]) -> list[str]:
    metric_keys = sorted({k for row in rows for k in row if k.startswith(("val/", "test/", ROBUST_PREFIX))})
    return FIXED_COLUMNS + metric_keys + TAIL_COLUMNS


def write_csv_atomic(rows: list[dict], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns_of(rows), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    write_text_atomic(path, buffer.getvalue())


def score_of(row: dict, metric: str) -> float | None:
    for key in (f"test/{metric}", f"val/{metric}"):
        if row.get(key) not in (None, ""):
            return float(row[key])
    return None


def label_of(row: dict) -> str:
    if row.get("mode") == "teacher":
        return "teacher"
    # The paper's labels; the mode is the marker's colour and shape (legend), a thinner student's marker hollow.
    label = f"{row.get('bits')} {row.get('encoder_layers')}-{row.get('decoder_layers')}"
    return label if is_full_width(row) else f"{label} {row.get('width')}"


def is_full_width(row: dict) -> bool:
    return row.get("width") in (None, "", "full")


@dataclass(frozen=True)
class PlotPoint:
    """One marker: a run, or the mean of a grid point's runs over seeds; `low`-`high` is its error bar."""

    x: float
    y: float
    low: float
    high: float
    row: dict
    seeds: int = 1


def beyond_doubt_front(points: list[PlotPoint]) -> list[PlotPoint]:
    """The points no other point beats beyond their error bars: none at least as compressed has its whole bar
    above this point's bar. With no bars (low == high == y) this is the plain Pareto front."""
    def beaten(p: PlotPoint) -> bool:
        return any(q is not p and q.x >= p.x and q.low > p.high for q in points)

    return sorted((p for p in points if not beaten(p)), key=lambda p: (p.x, p.y))


def plot_points(rows: list[dict], metric: str) -> list[PlotPoint]:
    """A marker per run; the runs of one grid point and mode over several seeds become one marker at their
    mean, with a bar of one standard deviation. A single run's bar is its bootstrap interval (where it has one)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get("compression") in (None, "") or score_of(row, metric) is None:
            continue
        seeded = row.get("seed") not in (None, "")
        key = (point_key(row), row.get("mode")) if seeded else (row["run_id"],)
        groups.setdefault(key, []).append(row)
    points = []
    for members in groups.values():
        scores = [score_of(row, metric) for row in members]
        first = members[0]
        if len(members) > 1:
            mean, spread = float(np.mean(scores)), float(np.std(scores, ddof=1))
            points.append(PlotPoint(float(first["compression"]), mean, mean - spread, mean + spread, first,
                                    len(members)))
            continue
        y = scores[0]
        low, high = first.get(f"test/{metric}_low"), first.get(f"test/{metric}_high")
        has_bar = low not in (None, "") and high not in (None, "")
        points.append(PlotPoint(float(first["compression"]), y, float(low) if has_bar else y,
                                float(high) if has_bar else y, first))
    return points


def plot_tradeoff(rows: list[dict], metric: str, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = plot_points(rows, metric)
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    markers = {"dq": ("o", "tab:blue"), "quant_only": ("s", "tab:orange"), "distill_only": ("^", "tab:green"),
               "teacher": ("*", "black")}
    for mode, (marker, color) in markers.items():
        chosen = [p for p in points if p.row.get("mode") == mode]
        if not chosen:
            continue
        full = [p for p in chosen if is_full_width(p.row)]
        thinner = [p for p in chosen if not is_full_width(p.row)]
        if full:
            ax.scatter([p.x for p in full], [p.y for p in full], marker=marker, color=color,
                       s=140 if mode == "teacher" else 60, label=mode, zorder=3)
        if thinner:
            ax.scatter([p.x for p in thinner], [p.y for p in thinner], marker=marker, facecolors="none",
                       edgecolors=color, s=60, label=f"{mode}, thinner (width extracted)", zorder=3)
        bars = [p for p in chosen if p.high > p.low]
        if bars:
            ax.errorbar([p.x for p in bars], [p.y for p in bars],
                        yerr=[[p.y - p.low for p in bars], [p.high - p.y for p in bars]], fmt="none",
                        ecolor=color, alpha=0.6, capsize=3, zorder=2)
    front = beyond_doubt_front(points)
    any_bars = any(p.high > p.low for p in points)
    if len(front) > 1:
        label = ("front: points no other beats beyond the error bars" if any_bars else "Pareto front")
        ax.plot([p.x for p in front], [p.y for p in front], "--", color="tab:red", alpha=0.7, label=label, zorder=1)
    if any_bars:
        bar_kinds = ["one run: 95% bootstrap interval over test examples"]
        if any(p.seeds > 1 for p in points):
            bar_kinds.append("several seeds: mean ± 1 sd")
        ax.plot([], [], color="gray", label="bars: " + "; ".join(bar_kinds))
    ax.set_xscale("log", base=2)
    for point, offset in zip(points, _label_offsets(ax, [(p.x, p.y, p.row) for p in points])):
        text = label_of(point.row) + (f" (n={point.seeds})" if point.seeds > 1 else "")
        ax.annotate(text, (point.x, point.y), xytext=offset, textcoords="offset points", fontsize=8,
                    va="center", color=markers.get(point.row.get("mode"), ("", "black"))[1])
    ax.set_xlabel("compression ratio vs FP32 teacher (DQ-BART accounting, log scale)")
    source = "test" if any(r.get(f"test/{metric}") not in (None, "") for r in rows) else "val"
    ax.set_ylabel(f"{source} {metric}")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    # A staging name of this process's own: sweep workers finishing together each write the plot.
    descriptor, staging = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    try:
        os.fchmod(descriptor, 0o644)  # mkstemp's 0600 would hide the plot from the other users of a share
        with os.fdopen(descriptor, "wb") as out:
            fig.savefig(out, format="png")
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(staging)
        raise
    finally:
        plt.close(fig)
    return path


def _label_offsets(ax, points: list[tuple[float, float, dict]], gap: float = 9.0) -> list[tuple[float, float]]:
    """Label offsets (in points) right of each point, pushed down where labels would overlap.

    Runs of one grid point in several modes share an x position and often nearly the same score.
    """
    ax.figure.canvas.draw()  # fixes the axes limits, so the data -> pixel transform is final
    scale = 72.0 / ax.figure.dpi
    anchors = [tuple(ax.transData.transform((x, y)) * scale) for x, y, _ in points]  # in points
    order = sorted(range(len(points)), key=lambda i: -anchors[i][1])
    placed: list[tuple[float, float]] = []
    offsets: dict[int, tuple[float, float]] = {}
    for index in order:
        x, y = anchors[index][0] + 5, anchors[index][1]
        for other_x, other_y in sorted(placed, key=lambda p: -p[1]):
            if abs(other_x - x) < 70 and abs(other_y - y) < gap:
                y = other_y - gap
        placed.append((x, y))
        offsets[index] = (5.0, y - anchors[index][1])
    return [offsets[i] for i in range(len(points))]


def markdown_table(rows: list[dict], metric: str) -> str:
    keys = [f"test/{metric}", f"val/{metric}", "test/label_loyalty", "test/prob_loyalty"]
    header = ["run", "mode", "W-E-A", "enc-dec", "seed", "size MiB", "compression", keys[0], "95% interval",
              "vs teacher [95%]", *keys[1:], "wall s", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def fmt(value, digits=2):
        if value in (None, ""):
            return ""
        return f"{float(value):.{digits}f}" if isinstance(value, (int, float)) else str(value)

    def span(row, prefix, signed=False):
        point, low, high = (row.get(f"{prefix}{suffix}") for suffix in ("", "_low", "_high"))
        if low in (None, "") or high in (None, ""):
            return ""
        sign = "+" if signed else ""
        return (f"{float(point):{sign}.2f} " if signed else "") + f"[{float(low):{sign}.2f}, {float(high):{sign}.2f}]"

    for row in rows:
        cells = [row["run_id"], row.get("mode", ""), row.get("bits", ""),
                 f"{row.get('encoder_layers') or ''}-{row.get('decoder_layers') or ''}", fmt(row.get("seed"), 0),
                 fmt(row.get("size_mb"), 3), fmt(row.get("compression"), 1), fmt(row.get(keys[0])),
                 span(row, f"test/{metric}"), span(row, f"test/{metric}_vs_teacher", signed=True),
                 *[fmt(row.get(k), 3 if "loyalty" in k else 2) for k in keys[1:]],
                 fmt(row.get("wall_time_s"), 0), row.get("status", "")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def seed_markdown(summary: list[dict], metric: str) -> str:
    """Grid points run over several seeds: mean, standard deviation and n of the metric."""
    lines = [f"| grid point | mode | compression | mean {metric} | sd | n |", "|---|---|---|---|---|---|"]
    for line in summary:
        lines.append(f"| {line['point']} | {line['mode']} | {float(line['compression'] or 0):.1f} | "
                     f"{line['mean']:.2f} | {line['sd']:.2f} | {line['n']} |")
    return "\n".join(lines)


def log_wandb_summary(rows: list[dict], metric: str, png: Path, name: str, save_dir: Path,
                      mode: str) -> None:
    """A W&B run holding the results table, a custom scatter chart and the plot."""
    import wandb

    columns = columns_of(rows)
    table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
    y = f"test/{metric}" if any(row.get(f"test/{metric}") not in (None, "") for row in rows) else f"val/{metric}"
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "dq-lightning"), name=name, job_type="sweep-summary",
                     dir=str(save_dir), mode=mode, reinit="finish_previous")
    run.log({"results": table,
             "tradeoff": wandb.plot.scatter(table, "compression", y, title=f"{name}: compression vs {metric}"),
             "tradeoff_png": wandb.Image(str(png))})
    run.finish()
