"""`python -m dq_lightning report`: several sweeps' fronts on one chart (two recipes' sweeps, say).

    python -m dq_lightning report --sweep runs/a/xsum/sweep --label dq-bart \\
        --sweep runs/b/xsum/sweep --label dq_lightning --out runs/compare/recipes

Each `--sweep` is a sweep directory (its `results.csv`, as the sweep or `make report` wrote it) or a results
file itself (`results.<test file>.csv`: compare sweeps on one test set). The sweeps' rows become one table
with a `sweep` column, and every sweep's series gets its own front (`dq_lightning.sweep.front`). Written to
`--out`: `results.csv`, `tradeoff.png`, `report.md`, and a W&B summary run with the interactive chart.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

from dq_lightning.data.tasks import TASKS
from dq_lightning.errors import UserError, command_line
from dq_lightning.files import write_text_atomic
from dq_lightning.sweep.front import front_markdown, plot_points, score_of
from dq_lightning.sweep.plot import plot_tradeoff

METRICS = tuple(dict.fromkeys(task.metric for task in TASKS.values()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dq_lightning report",
                                     description="Several sweeps' trade-off fronts on one chart.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--sweep", action="append", required=True, metavar="PATH",
                        help="a sweep directory (with results.csv) or a results CSV; once per sweep")
    parser.add_argument("--label", action="append", metavar="NAME",
                        help="the name of each --sweep in the chart, in the same order (default: its path)")
    parser.add_argument("--out", default="runs/compare", metavar="DIR",
                        help="where results.csv, tradeoff.png and report.md go (default: runs/compare)")
    parser.add_argument("--metric", choices=METRICS, help="the metric compared (default: the one the results hold)")
    parser.add_argument("--title", help="the chart's title (default: the labels)")
    return parser


def results_file(path: str) -> Path:
    given = Path(path)
    if given.is_dir():
        found = given / "results.csv"
        if not found.is_file():
            raise UserError(f"--sweep {path}: no results.csv in this directory; write it with `make report "
                            f"TASK=<task>` (or `python -m dq_lightning sweep ... --report-only`)")
        return found
    if not given.is_file():
        raise UserError(f"--sweep {path}: no such sweep directory or results file")
    return given


def read_results(path: str) -> tuple[list[str], list[dict]]:
    """A results CSV's columns and rows (every value a string, empty where the run has none)."""
    file = results_file(path)
    try:
        with open(file, newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            columns = list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"--sweep {path}: cannot read {file} ({error})") from None
    if "compression" not in columns:
        raise UserError(f"--sweep {path}: {file} has no compression column; is it a sweep's results.csv?")
    return columns, rows


def metric_of(path: str, columns: list[str], asked: str | None) -> str:
    held = [m for m in METRICS if f"test/{m}" in columns or f"val/{m}" in columns]
    if asked:
        if asked not in held:
            raise UserError(f"--metric {asked}: --sweep {path} has no test/{asked} or val/{asked} column")
        return asked
    if not held:
        raise UserError(f"--sweep {path}: no finished run with a score (no test/ or val/ column of "
                        f"{', '.join(METRICS)})")
    if len(held) > 1:
        raise UserError(f"--sweep {path}: holds scores of {' and '.join(held)}; name one with --metric")
    return held[0]


def labels_of(sweeps: list[str], labels: list[str] | None) -> list[str]:
    if labels is None:
        labels = list(sweeps)
    elif len(labels) != len(sweeps):
        raise UserError(f"--label given {len(labels)} times for {len(sweeps)} --sweep; give one per --sweep "
                        f"(same order) or none")
    for label in labels:
        if not label.strip():
            raise UserError("--label: a label is empty")
        if labels.count(label) > 1:
            raise UserError(f"--label {label}: names two sweeps; every sweep needs a label of its own")
    return labels


def combine(sweeps: list[str], labels: list[str], metric: str | None) -> tuple[list[str], list[dict], str]:
    """Every sweep's rows with its label in a `sweep` column; the columns in order, and the metric."""
    columns, rows, chosen = ["sweep"], [], metric
    for path, label in zip(sweeps, labels):
        own_columns, own_rows = read_results(path)
        found = metric_of(path, own_columns, metric)
        if chosen not in (None, found):
            raise UserError(f"--sweep {path} scores {found}, an earlier --sweep {chosen}; compare sweeps of "
                            f"one metric, or name it with --metric")
        chosen = found
        usable = [row for row in own_rows if row.get("compression") and score_of(row, found) is not None]
        if not any(row.get("mode") != "teacher" for row in usable):
            raise UserError(f"--sweep {path}: no finished run with a compression and a {found} score in "
                            f"{results_file(path)}")
        columns += [column for column in own_columns if column not in columns]
        rows += [{**row, "sweep": label} for row in own_rows]
    return columns, rows, chosen


def write_rows(columns: list[str], rows: list[dict], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


@command_line
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    labels = labels_of(args.sweep, args.label)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {args.out}: exists and is not a directory")
    for path in args.sweep:
        if out.resolve() == results_file(path).parent.resolve():
            raise UserError(f"--out {args.out}: is where --sweep {path} keeps its results.csv, which this would "
                            f"overwrite; choose another --out")
    columns, rows, metric = combine(args.sweep, labels, args.metric)
    title = args.title or f"{' vs '.join(labels)}: compression vs {metric}"
    out.mkdir(parents=True, exist_ok=True)
    write_rows(columns, rows, out / "results.csv")
    plot_tradeoff(rows, metric, out / "tradeoff.png", title)
    sources = "\n".join(f"- {label}: {results_file(path)}" for path, label in zip(args.sweep, labels))
    text = f"Sweeps compared:\n\n{sources}\n\n{front_markdown(plot_points(rows, metric), metric)}"
    write_text_atomic(out / "report.md", text + "\n")
    print(text)
    print(f"\nresults: {out / 'results.csv'}\nplot:    {out / 'tradeoff.png'}\nreport:  {out / 'report.md'}")
    _log_wandb(columns, rows, metric, out, title)
    return 0


def _log_wandb(columns: list[str], rows: list[dict], metric: str, out: Path, title: str) -> None:
    from dq_lightning.loggers import resolve_wandb_mode
    from dq_lightning.sweep.report import log_wandb_summary

    mode = resolve_wandb_mode("auto")
    if mode == "disabled":
        return
    try:
        log_wandb_summary(rows, metric, out / "tradeoff.png", f"compare-{out.name}", out, mode, title, columns)
    except Exception as error:  # noqa: BLE001 - the files above are the result; W&B is a copy of them
        print(f"warning: W&B summary run not written ({type(error).__name__}: {error})", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
