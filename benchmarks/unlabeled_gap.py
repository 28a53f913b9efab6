"""Does distilling on inputs without references close the gap that fewer references open? (#39)

    .venv/bin/python benchmarks/unlabeled_gap.py --sweep runs/unlabeled/xsum/sweep [--metric rougeL]

Reads the runs of `sweeps/<task>-labeled-tiny.yaml` and `sweeps/<task>-unlabeled-tiny.yaml` trained into one
sweep directory (the same `--runs`), each tested (`test_predictions.jsonl`):

- (a) every training reference                          `--all`        (default 2-2-8_6-3_800_False)
- (b) a few references only                             `--few`        (default 2-2-8_6-3_200_False)
- (c) the few, plus the other training inputs unlabeled `--mixed`      (default 2-2-8_6-3_200_full)
- (d) as (c), the student reading a restricted view     `--view`       (default 2-2-8_6-3_200_word_dropout)
- (e) no reference at all, every input unlabeled        `--unlabeled`  (default 2-2-8_6-3_0_full)
- (f) as (e), the student reading a restricted view     `--unlabeled-view` (default 2-2-8_6-3_0_word_dropout)

and prints, as markdown, each run's test metric with its 95% bootstrap interval and its label and probability
loyalty, the paired differences (c)-(b), (d)-(c), (a)-(c), (d)-(b), (e)-(b) and (f)-(b) over the same test
examples (interval, two-sided p), and the share of the gap (a)-(b) that (c) and (d) recover (the issue's goal:
at least half), in the metric and in label loyalty (with (e) and (f)). A run that is missing or not tested yet is
named and left out. Nothing is trained here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dq_lightning.errors import UserError  # noqa: E402
from dq_lightning.evaluation.bootstrap import interval, paired_difference  # noqa: E402
from dq_lightning.evaluation.per_example import FILE_NAME, read_predictions  # noqa: E402
from dq_lightning.files import read_json  # noqa: E402

ROLES = {"all": ("a", "every reference", "2-2-8_6-3_800_False"),
         "few": ("b", "few references", "2-2-8_6-3_200_False"),
         "mixed": ("c", "few + unlabeled", "2-2-8_6-3_200_full"),
         "view": ("d", "few + unlabeled, restricted view", "2-2-8_6-3_200_word_dropout"),
         "unlabeled": ("e", "unlabeled only", "2-2-8_6-3_0_full"),
         "unlabeled_view": ("f", "unlabeled only, restricted view", "2-2-8_6-3_0_word_dropout")}
PAIRS = (("mixed", "few"), ("view", "mixed"), ("all", "mixed"), ("view", "few"), ("unlabeled", "few"),
         ("unlabeled_view", "few"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", required=True, help="the sweep directory holding the runs")
    parser.add_argument("--metric", default="rougeL", help="rougeL (default), rouge1, ... or bleu")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--bootstrap-seed", type=int, default=0)
    for role, (_, what, default) in ROLES.items():
        parser.add_argument(f"--{role.replace('_', '-')}", dest=role, default=default,
                            help=f"run id of the {what} run (default {default})")
    return parser


def load(sweep: Path, run_id: str, metric: str) -> tuple[list[dict] | None, dict]:
    run = sweep / run_id
    if not (run / FILE_NAME).is_file():
        return None, {}
    return read_predictions(run / FILE_NAME, metric), read_json(run / "test_metrics.json").get("metrics", {})


def report(args: argparse.Namespace) -> str:
    sweep = Path(args.sweep)
    if not sweep.is_dir():
        raise UserError(f"--sweep {sweep}: no such directory")
    runs = {role: load(sweep, getattr(args, role), args.metric) for role in ROLES}
    lines = [f"sweep {sweep}, {args.bootstrap} bootstrap resamples (seed {args.bootstrap_seed})", "",
             f"| run | | test {args.metric} [95%] | label loyalty | prob. loyalty |", "|---|---|---|---|---|"]
    for role, (letter, what, _) in ROLES.items():
        rows, metrics = runs[role]
        if rows is None:
            lines.append(f"| ({letter}) {what} | {getattr(args, role)} | not tested | | |")
            continue
        span = interval(rows, args.metric, args.bootstrap, args.bootstrap_seed)
        loyalty = [f"{metrics[key]:.3f}" if key in metrics else "" for key in ("test/label_loyalty",
                                                                                "test/prob_loyalty")]
        lines.append(f"| ({letter}) {what} | {getattr(args, role)} | {span.point:.2f} [{span.low:.2f}, "
                     f"{span.high:.2f}] | {loyalty[0]} | {loyalty[1]} |")
    lines += ["", f"| paired difference | test {args.metric} [95%] | p |", "|---|---|---|"]
    differences = {}
    for first, second in PAIRS:
        if runs[first][0] is None or runs[second][0] is None:
            continue
        difference = paired_difference(runs[first][0], runs[second][0], args.metric, args.bootstrap,
                                       args.bootstrap_seed)
        differences[first, second] = difference.point
        lines.append(f"| ({ROLES[first][0]}) - ({ROLES[second][0]}) | {difference.point:+.2f} "
                     f"[{difference.low:+.2f}, {difference.high:+.2f}] | {difference.p_value:.3f} |")
    if runs["all"][0] is not None and runs["few"][0] is not None:
        gap = paired_difference(runs["all"][0], runs["few"][0], args.metric, args.bootstrap, args.bootstrap_seed)
        lines += ["", f"gap (a) - (b): {gap.point:+.2f} [{gap.low:+.2f}, {gap.high:+.2f}]"]
        for role in ("mixed", "view"):
            if (role, "few") not in differences:
                continue
            if gap.point > 0:
                lines.append(f"({ROLES[role][0]}) recovers {differences[role, 'few'] / gap.point:.0%} of it "
                             "(the goal: at least half)")
            else:
                lines.append(f"({ROLES[role][0]}): no gap to recover, (a) does not score above (b)")
    lines += loyalty_gap(runs)
    return "\n".join(lines)


def loyalty_gap(runs: dict) -> list[str]:
    """The same shares in teacher-forced label loyalty, which separates the runs where a small test set's ROUGE
    does not: corpus-level values (no per-example loyalty is written), so no interval."""
    loyalty = {role: metrics.get("test/label_loyalty") for role, (_, metrics) in runs.items()}
    if loyalty["all"] is None or loyalty["few"] is None:
        return []
    gap = loyalty["all"] - loyalty["few"]
    lines = ["", f"label loyalty gap (a) - (b): {gap:+.3f} (corpus-level, no interval)"]
    for role in ("mixed", "view", "unlabeled", "unlabeled_view"):
        if loyalty[role] is None:
            continue
        gain = loyalty[role] - loyalty["few"]
        share = f", {gain / gap:.0%} of the gap" if gap > 0 else ""
        lines.append(f"({ROLES[role][0]}) - (b): {gain:+.3f}{share}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(report(args))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
