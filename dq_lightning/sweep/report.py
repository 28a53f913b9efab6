"""Sweep results: `results.csv`, a markdown table, a W&B summary run (the trade-off plot: `plot.py`, its fronts:
`front.py`, its W&B chart: `wandb_chart.py`).

Everything is rebuilt from the run directories (`<sweep_dir>/<run_id>/{status,fit_metrics,test_metrics}.json`),
so `make report` after a partial or resumed sweep shows exactly what has finished.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from dq_lightning.errors import UserError
from dq_lightning.files import read_json, write_text_atomic
from dq_lightning.quant.config import parse_wea
from dq_lightning.sweep.robustness import COLUMN_PREFIX as ROBUST_PREFIX, columns as robustness_columns
from dq_lightning.sweep.spec import SweepPoint

# source: "trained" (a run of its own), "supernet" (a student extracted from an elastic supernet) or
# "supernet+finetune" (extracted, then fine-tuned a few steps).
FIXED_COLUMNS = ["run_id", "status", "mode", "recipe", "source", "bits", "w_bits", "e_bits", "a_bits",
                 "encoder_layers", "decoder_layers", "width", "seed", "size_mb", "compression", "size_mb_strict",
                 "compression_strict"]
TAIL_COLUMNS = ["wall_time_s", "threads", "error"]


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
    # A directory the sweep's grid does not name (an online agent's, another sweep file's) still says what it is.
    params = point.params if point else status.get("params") or {}
    mode = summary.get("mode") or params.get("model.mode", "")
    bits = summary.get("bits") or params.get("model.bits", "")
    depth = (f"{summary['encoder_layers']}-{summary['decoder_layers']}" if "encoder_layers" in summary
             else params.get("model.depth"))
    # A finished run records its widths; a pending one has only the grid's W-E-A string.
    w, e, a = (summary.get(key) for key in BIT_FIELDS) if BIT_FIELDS[0] in summary else _widths(bits)
    encoder_layers, decoder_layers = _split(depth, 2)
    row: dict[str, Any] = {"run_id": run_dir.name, "status": status.get("status", "pending"), "mode": mode,
                           "recipe": summary.get("recipe") or params.get("model.recipe", ""),
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


def log_wandb_summary(rows: list[dict], metric: str, png: Path, name: str, save_dir: Path, mode: str,
                      title: str | None = None, columns: list[str] | None = None) -> None:
    """A W&B run holding the results table, the trade-off chart (interactive: `wandb_chart`) and the plot."""
    import wandb

    from dq_lightning.sweep.front import plot_points
    from dq_lightning.sweep.wandb_chart import entity_of, tradeoff_chart

    columns = columns or columns_of(rows)
    table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
    source = "test" if any(row.get(f"test/{metric}") not in (None, "") for row in rows) else "val"
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "dq-lightning"), name=name, job_type="sweep-summary",
                     dir=str(save_dir), mode=mode, reinit="finish_previous")
    try:
        chart = tradeoff_chart(plot_points(rows, metric), metric, f"{source} {metric}",
                               title or f"{name}: compression vs {metric}", entity_of(run), online=mode == "online")
        run.log({"results": table, "tradeoff": chart, "tradeoff_png": wandb.Image(str(png))})
    finally:
        run.finish()
