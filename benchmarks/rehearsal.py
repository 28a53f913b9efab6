"""A paper-scale rehearsal on CPU: the shipped `experiments/xsum/dq-paper.yaml` at bart-base shapes, two DDP
processes, through fit, validation with generation, checkpoint, resume and export, with each process's step time
and peak memory.

    .venv/bin/python benchmarks/rehearsal.py                    # about 10 minutes on 2 cores, 1 thread a process
    .venv/bin/python benchmarks/rehearsal.py --work runs/rehearsal --out runs/rehearsal/summary.json

The teacher is bart-base shaped with random weights (`benchmarks/latency.py build_teacher`: the `bart-base`
preset, the real 50,265-token BART tokenizer of `../shared/data/bart_tokenizer` saved beside it); the student is
the config's (2-2-8, the teacher's depth 6-6; `--bits`, `--depth` to change). Training time and memory do not
depend on the weights' values; generation does, and random weights decode to the maximum length (the worst case). Only these settings differ from the config, each for a reason:

- `trainer.accelerator=cpu`, `devices=2`, `strategy=ddp` (gloo on CPU): the rehearsal's machine.
- `trainer.precision`: `bf16-mixed` (the config's) where the CPU computes in bfloat16 (AVX512-BF16 or AMX);
  elsewhere `32-true`, because bfloat16 matmuls are emulated there (0.7 against 31 GFLOP/s in float32 on an
  AVX2 EPYC core): a step would take an hour.
- `trainer.max_steps` (`--steps`, then `--resume-steps` more after the resume), `trainer.val_check_interval`
  (one validation, at the last step of the first fit), `trainer.limit_val_batches=1` (one evaluation batch a
  process: 4 documents, beam search with the config's decoding), `num_sanity_val_steps=0`, `test_after_fit=false`
  (the test split is scored as validation is; the export below stands for the final stage).
- `data.num_workers=0`: loader processes would share the two cores the ranks use.
- `trainer.logger=false`: no W&B run.
- `data.batch_size=1` (`--batch-size`; the config's is 4) and `global_batch_size=4` (`--global-batch-size`; the
  config's is 16), so two micro-batches are still accumulated per optimizer step. Memory: on CPU activations
  are float32 (most are bfloat16 on a GPU), and at 4 x 1024 tokens one rank needs about 12 GB (see
  `python -m dq_lightning memory`), two ranks more than a 16-23 GB CI machine has. Time: a micro-batch of
  4 x 1024 tokens takes over a minute on one core, and the config's 16 sequences a step would be 8 of them.
Lengths (1024 source, 128 target tokens) and the evaluation batch (4) are the config's.

Each rank writes `usage/<fit|resume>-rank<r>.json` (`dq_lightning.callbacks.resources.ResourceUsage`): the
seconds and shape of every micro-batch, the validation, and the peak resident set (VmHWM). The export is loaded
by `python -m dq_lightning predict --model` and summarizes one document. The summary (`--out`, default
<work>/summary.json) puts the memory estimate of `dq_lightning.memory` at each process's largest batch beside
its training peak (before the validation: at 4 documents against training's 1, a validation can exceed it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from latency import SHARED_DATA, build_teacher  # noqa: E402 - after the path is set

from dq_lightning.checkpoints import read_checkpoint_file  # noqa: E402
from dq_lightning.errors import UserError  # noqa: E402
from dq_lightning.models.presets import get_preset  # noqa: E402

CONFIG = "experiments/xsum/dq-paper.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(ROOT / "runs" / "rehearsal"), metavar="DIR",
                        help="teacher, run, export and usage files (default runs/rehearsal); refused while it holds "
                        "an earlier rehearsal's run/ (its teacher and tokenized data are reused)")
    parser.add_argument("--config", default=CONFIG, help=f"the paper config (default {CONFIG})")
    parser.add_argument("--data", default=str(SHARED_DATA / "xsum"), metavar="DIR",
                        help="XSum JSONL folder (default ../shared/data/xsum)")
    parser.add_argument("--tokenizer", default=str(SHARED_DATA / "bart_tokenizer"), metavar="DIR",
                        help="the real BART tokenizer files (default ../shared/data/bart_tokenizer)")
    parser.add_argument("--preset", default="bart-base", help="the teacher's shapes (default bart-base)")
    parser.add_argument("--bits", help="W-E-A of the student (default: the config's)")
    parser.add_argument("--depth", help="encoder-decoder layers of the student (default: the config's)")
    parser.add_argument("--devices", type=int, default=2, help="DDP processes (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--batch-size", type=int, default=1, help="per-device batch (default 1; the config's 4)")
    parser.add_argument("--global-batch-size", type=int, default=4,
                        help="sequences per optimizer step (default 4; the config's 16)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps of the first fit (default 2)")
    parser.add_argument("--resume-steps", type=int, default=1, help="optimizer steps after the resume (default 1)")
    parser.add_argument("--precision", default="auto",
                        help="trainer.precision (default auto: bf16-mixed where the CPU has bfloat16 units)")
    parser.add_argument("--extra", nargs="*", default=[], metavar="FLAG",
                        help="more fit flags, e.g. --extra=--data.max_source_length=512 (say why in the report)")
    parser.add_argument("--out", metavar="FILE", help="write the summary as JSON (default <work>/summary.json)")
    return parser.parse_args(argv)


def cpu_has_bf16() -> bool:
    """bfloat16 units (AVX512-BF16 or AMX): without them torch emulates bfloat16 matmuls, ~45x slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def run(command: list[str], env: dict, log: Path) -> float:
    """Run a command to the end, its output in `log`; its wall time. A failure ends the rehearsal naming it."""
    started = time.perf_counter()
    with open(log, "w") as out:
        result = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"{tail}\nerror: {' '.join(command[2:5])} failed (exit {result.returncode}); log: {log}")
    return seconds


def usage(work: Path, name: str, devices: int) -> list[dict]:
    paths = [work / "usage" / f"{name}-rank{rank}.json" for rank in range(devices)]
    missing = [str(path) for path in paths if not path.exists()]
    if missing:
        raise SystemExit(f"error: no usage file from every rank: {', '.join(missing)}")
    return [json.loads(path.read_text()) for path in paths]


def rehearse(args: argparse.Namespace) -> dict:
    work = Path(args.work).resolve()
    if (work / "run").exists():
        # Its checkpoints are over a gigabyte; the teacher and tokenized data in it are reused by a new --work.
        raise UserError(f"--work {work}: holds an earlier rehearsal ({work / 'run'}); remove that folder or give "
                        "another --work")
    (work / "usage").mkdir(parents=True, exist_ok=True)
    precision = args.precision if args.precision != "auto" else ("bf16-mixed" if cpu_has_bf16() else "32-true")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    torch.set_num_threads(args.threads)
    timings = {}

    started = time.perf_counter()
    # The preset's dropout (bart-base's 0.1): the student copies the teacher's config, and dropout masks are memory.
    teacher = build_teacher(argparse.Namespace(preset=args.preset, tokenizer=args.tokenizer,
                                               dropout=get_preset(args.preset).dropout), work)
    timings["teacher_build"] = time.perf_counter() - started

    run_dir = work / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    common = [sys.executable, "-m", "dq_lightning", "fit", "--config", args.config,
              f"--model.teacher={teacher}", f"--data.data_dir={args.data}", f"--data.cache_dir={work / 'cache'}",
              f"--trainer.default_root_dir={run_dir}", "--trainer.accelerator=cpu",
              f"--trainer.devices={args.devices}", "--trainer.strategy=ddp", f"--trainer.precision={precision}",
              "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0", "--test_after_fit=false",
              "--data.num_workers=0", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
              "--trainer.callbacks+=dq_lightning.callbacks.resources.ResourceUsage",
              f"--trainer.callbacks.dirpath={work / 'usage'}", f"--data.batch_size={args.batch_size}",
              f"--global_batch_size={args.global_batch_size}"]
    common += [f"--model.bits={args.bits}"] * bool(args.bits) + [f"--model.depth={args.depth}"] * bool(args.depth)
    common += args.extra
    # val_check_interval counts micro-batches: one validation, after the last micro-batch of the first fit.
    accumulate = args.global_batch_size // (args.devices * args.batch_size)  # GlobalBatchSize checks it divides
    every = args.steps * accumulate
    timings["fit"] = run([*common, "--trainer.callbacks.name=fit", f"--trainer.max_steps={args.steps}",
                          f"--trainer.val_check_interval={every}"], env, work / "fit.log")
    fit_step = read_checkpoint_file(last)["global_step"]
    total = args.steps + args.resume_steps
    # The resumed fit validates again only if it reaches the next multiple of `every` micro-batches.
    timings["resume"] = run([*common, "--trainer.callbacks.name=resume", f"--trainer.max_steps={total}",
                             f"--trainer.val_check_interval={every}", f"--ckpt_path={last}"], env,
                            work / "resume.log")
    resumed_step = read_checkpoint_file(last)["global_step"]

    export = work / "export"
    timings["export"] = run([sys.executable, "-m", "dq_lightning", "export", "--ckpt", str(last), "--out",
                             str(export)], env, work / "export.log")
    document = json.loads(Path(args.data, "test.jsonl").read_text().splitlines()[0])["document"]
    (work / "input.txt").write_text(" ".join(document.split()) + "\n")
    started = time.perf_counter()
    predicted = subprocess.run([sys.executable, "-m", "dq_lightning", "predict", "--model", str(export), "--input",
                                str(work / "input.txt"), "--no-progress", "--threads", str(args.threads)],
                               cwd=ROOT, env=env, capture_output=True, text=True)
    timings["predict"] = time.perf_counter() - started
    if predicted.returncode != 0:
        raise SystemExit(f"{predicted.stderr[-3000:]}\nerror: predict --model {export} failed")

    fit, resume = usage(work, "fit", args.devices), usage(work, "resume", args.devices)
    metrics = json.loads((run_dir / "fit_metrics.json").read_text()) if (run_dir / "fit_metrics.json").exists() else {}
    summary = {"config": args.config, "preset": args.preset, "precision": precision, "devices": args.devices,
               "threads": args.threads, "accumulate_grad_batches": accumulate, "timings_s": timings,
               "wall_s": sum(timings.values()), "fit_checkpoint_step": fit_step, "resumed_checkpoint_step": resumed_step,
               "fit_metrics": metrics, "export": str(export), "prediction": predicted.stdout.strip(),
               "processes": {"fit": fit, "resume": resume}, "teacher": str(teacher), "env": env}
    return summary


# What a rank's interpreter holds before any model: the same imports, nothing built.
BASELINE_PROBE = ("import lightning.pytorch, transformers, datasets, torchmetrics, dq_lightning.cli\n"
                  "from dq_lightning.process_memory import proc_status_mib\n"
                  "print(proc_status_mib('VmHWM'))")


def baseline_mib(env: dict) -> float:
    result = subprocess.run([sys.executable, "-c", BASELINE_PROBE], cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{result.stderr[-2000:]}\nerror: the import-baseline probe failed")
    return float(result.stdout.split()[-1])


def estimate_for(summary: dict, args: argparse.Namespace, env: dict) -> dict:
    """`dq_lightning.memory`'s estimate beside each rank's measured peak: at the rank's largest batch (batches
    are padded to their longest sequence), on CPU (no CUDA context; the runtime part is the import baseline)."""
    from transformers import AutoConfig

    from dq_lightning.memory import estimate_dq

    config = AutoConfig.from_pretrained(summary["teacher"])
    depth = args.depth or f"{config.encoder_layers}-{config.decoder_layers}"
    runtime = baseline_mib(env)
    out = {"import_baseline_mib": runtime, "ranks": []}
    for stage, records in summary["processes"].items():
        for record in records:
            shapes = [batch["shape"] for batch in record["batches"] if "shape" in batch]
            b, s, t = (max(shape[i] for shape in shapes) for i in range(3))
            # Training's peak: before the first validation (at the evaluation batch, 4 here against 1 in
            # training, a validation can exceed it on CPU), or the whole fit's when it did not validate.
            validations = record["validations"]
            peak = validations[0]["peak_rss_before_mib"] if validations else record["peak_rss_mib"]
            estimate = estimate_dq(config, depth=depth, bits=args.bits or "2-2-8", batch_size=b, source_length=s,
                                   target_length=t, precision=summary["precision"], devices=summary["devices"],
                                   device="cpu", runtime_bytes=int(runtime * 2**20))
            out["ranks"].append({"stage": stage, "rank": record["rank"], "largest_batch": [b, s, t],
                                 **estimate.as_dict(), "training_peak_rss_mib": peak,
                                 "ratio": estimate.total_mib / peak})
    return out


def report(summary: dict) -> str:
    lines = [f"rehearsal: {summary['config']} at {summary['preset']} shapes, {summary['devices']} DDP processes "
             f"on CPU, {summary['threads']} thread(s) each, precision {summary['precision']}, accumulating "
             f"{summary['accumulate_grad_batches']} micro-batches a step",
             "  wall time: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in summary["timings_s"].items())
             + f"; total {summary['wall_s']:.0f} s",
             f"  checkpoint after the fit: step {summary['fit_checkpoint_step']}; after the resume: step "
             f"{summary['resumed_checkpoint_step']}",
             "  validation: " + ", ".join(f"{k} {v:.4f}" for k, v in summary["fit_metrics"].get("metrics", {}).items()
                                         if k.startswith("val/rouge")),
             f"  export {summary['export']} summarizes: {summary['prediction'][:100]!r}"]
    estimates = {(e["stage"], e["rank"]): e for e in summary.get("estimate", {}).get("ranks", [])}
    lines.append(f"{'stage':<8}{'rank':>5}{'steps':>9}{'s/micro-batch':>15}{'validation s':>14}{'largest batch':>15}"
                 f"{'peak RSS MiB':>14}{'training peak':>15}{'estimate':>10}{'ratio':>7}")
    for stage, records in summary["processes"].items():
        for record in records:
            seconds = [batch["seconds"] for batch in record["batches"]]
            validation = sum(v["seconds"] for v in record["validations"])
            estimate = estimates.get((stage, record["rank"]))
            shape = "x".join(map(str, estimate["largest_batch"])) if estimate else "-"
            lines.append(f"{stage:<8}{record['rank']:>5}{record['start_step']:>5}->{record['end_step']:<3}"
                         f"{sum(seconds) / max(len(seconds), 1):>15.1f}{validation:>14.1f}{shape:>15}"
                         f"{record['peak_rss_mib']:>14.0f}"
                         + (f"{estimate['training_peak_rss_mib']:>15.0f}{estimate['total_mib']:>10.0f}"
                            f"{estimate['ratio']:>7.2f}" if estimate else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = rehearse(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out or Path(args.work) / "summary.json")
    summary["estimate"] = estimate_for(summary, args, summary.pop("env"))
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(report(summary))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
