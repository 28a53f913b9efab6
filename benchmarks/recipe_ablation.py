"""Which of the dq-bart recipe's choices matter: a one-at-a-time ablation against the run-to-run spread.

    .venv/bin/python benchmarks/recipe_ablation.py --data-dir ../shared/data/xsum [--bits 2-2-8 --depth 6-3]

Trains the `recipe: dq-bart` student of `experiments/xsum/dq-tiny.yaml` (needs `runs/xsum/teacher-tiny/hf`,
`make teacher TASK=xsum`) once per seed in `--seeds` (the spread), then once per recipe choice with that one
choice switched to the `dq_lightning` recipe's value (seed of the first run). Each run is its own process in
`--runs/<name>`; a run whose `test_metrics.json` exists is not trained again. Prints a markdown table of test
ROUGE-L, label and probability loyalty, and each ablation's difference to the mean of the seed runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dq_lightning.distill.layer_map import layer_map  # noqa: E402
from dq_lightning.distill.recipe import TABLE  # noqa: E402

METRICS = ("test/rougeL", "test/label_loyalty", "test/prob_loyalty")


def choices(depth: str, attention_dropout: float) -> dict[str, str]:
    """{flag: the dq_lightning value}, for every setting where the two recipes differ."""
    flags = {}
    for group, settings in TABLE["dq_lightning"].items():
        for name, value in settings.items():
            if TABLE["dq-bart"][group][name] == value:
                continue
            flags[f"{group}.{name}"] = str(value).lower() if isinstance(value, bool) else str(value)
    encoder, decoder = (int(n) for n in depth.split("-"))
    if all(layer_map(6, n, "dq-bart") == layer_map(6, n, "max_spacing") for n in (encoder, decoder)):
        flags.pop("shape.layer_map")  # the two maps agree at this depth: nothing to ablate
    if attention_dropout == 0:
        flags.pop("objective.attention_maps")  # before and after a dropout of 0 are the same map
    return flags


def run(name: str, flags: list[str], args) -> dict[str, float]:
    out = Path(args.runs) / name
    result = out / "test_metrics.json"
    if not result.exists():
        command = [sys.executable, "-m", "dq_lightning", "fit", "--config", "experiments/xsum/dq-tiny.yaml",
                   f"--data.data_dir={args.data_dir}", f"--model.bits={args.bits}", f"--model.depth={args.depth}",
                   "--model.recipe=dq-bart", f"--trainer.default_root_dir={out}", *flags]
        print("$", " ".join(command), flush=True)
        out.mkdir(parents=True, exist_ok=True)
        # One thread per run: the intra-op thread count changes float reductions, so runs compared with one
        # another must share it, whatever --jobs is.
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with (out / "run.log").open("w") as log:
            code = subprocess.call(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        if code != 0 or not result.exists():
            raise SystemExit(f"error: run {name} failed (exit {code}); see {out / 'run.log'}")
    metrics = json.loads(result.read_text())
    metrics = metrics.get("metrics", metrics)
    return {key: float(metrics[key]) for key in METRICS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="the xsum {train,validation,test}.jsonl folder")
    parser.add_argument("--bits", default="2-2-8")
    parser.add_argument("--depth", default="6-3")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of the spread runs")
    parser.add_argument("--runs", default="runs/recipe_ablation")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once, one thread each")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    teacher = json.loads((ROOT / "runs/xsum/teacher-tiny/hf/config.json").read_text())
    ablations = choices(args.depth, teacher.get("attention_dropout", 0.0))

    jobs = {f"dq-bart_seed{seed}": [f"--seed_everything={seed}"] for seed in seeds}
    jobs.update({f"{flag}={value}": [f"--model.{flag}={value}", f"--seed_everything={seeds[0]}"]
                 for flag, value in ablations.items()})
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {name: pool.submit(run, name, flags, args) for name, flags in jobs.items()}
        results = {name: future.result() for name, future in futures.items()}

    base = {seed: results[f"dq-bart_seed{seed}"] for seed in seeds}
    mean = {key: statistics.mean(r[key] for r in base.values()) for key in METRICS}
    spread = {key: max(r[key] for r in base.values()) - min(r[key] for r in base.values()) for key in METRICS}
    rows = [(f"dq-bart, seed {seed}", result) for seed, result in base.items()]
    rows += [(f"dq-bart but {flag}={value}", results[f"{flag}={value}"]) for flag, value in ablations.items()]

    stdev = {key: statistics.stdev(r[key] for r in base.values()) if len(seeds) > 1 else 0.0 for key in METRICS}
    print(f"\n{args.bits} {args.depth}; seed runs (n={len(seeds)}) mean / sd / max - min: "
          + ", ".join(f"{k} {mean[k]:.3f} / {stdev[k]:.3f} / {spread[k]:.3f}" for k in METRICS))
    print("| run | " + " | ".join(METRICS) + " | " + " | ".join(f"d {k.split('/')[1]}" for k in METRICS) + " |")
    print("|---" * (1 + 2 * len(METRICS)) + "|")
    for label, result in rows:
        cells = [f"{result[k]:.3f}" for k in METRICS] + [f"{result[k] - mean[k]:+.3f}" for k in METRICS]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
