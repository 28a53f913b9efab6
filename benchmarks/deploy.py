"""Deployment runtimes side by side: the FP32 PyTorch teacher, the FP32 (dequantized) student, this project's int8
path, ONNX Runtime and CTranslate2 (teacher and students in each), on the same inputs, in one run.

    .venv/bin/python benchmarks/deploy.py --preset bart-base                  # 6-6 teacher, 6-3 students 8-8-8, 2-2-8
    .venv/bin/python benchmarks/deploy.py --teacher runs/xsum/teacher-tiny/hf \\
        --ckpt runs/xsum/sweep/8-8-8_6-3/checkpoints/best.ckpt runs/xsum/sweep/2-2-8_6-3/checkpoints/best.ckpt

Without `--teacher/--ckpt` the teacher is built from `--preset` (random weights, the real 50,265-token BART
vocabulary) and each student at `--bits` and `--depth` is derived from it untrained (`benchmarks/latency.py`:
timing depends on the shapes, not on the values). With them, the trained students are exported from their
checkpoints, and besides timing each runtime decodes the first `--quality-examples` test documents with the
task's decoding settings (`--quality-beams 1`: greedy): test ROUGE-L per runtime, the share of outputs
token-identical to the PyTorch FP32 path of the same model (for a student: the fake-quantized student, token for
token, tests/test_export.py) and the share of token positions on which they agree.

Per model and runtime: per-example latency (wall and process CPU time, median of `--repeats` interleaved rounds)
at batch 1 greedy and at batch 8 with `--beams` beams, every output fixed to `--new-tokens` tokens (no
end-of-sequence token); throughput (examples per second at batch 8); peak resident memory of a fresh process
that loads the model and runs one batch-8 beam search (VmHWM, and above that process's peak after its imports);
and the size on disk of the runtime's weight files. Runtimes: `torch` (FP32; a student's dequantized codes with
its activation quantizers), `int8` (this project's int8 path, students only), `onnx` (ONNX Runtime; the trained
quantizers reproduced), `ctranslate2` (int8 compute for students, float32 for the teacher, whose int8 run,
CTranslate2's own weight rounding, is `ctranslate2-int8`; a student's `ctranslate2-float32` runs its int8 codes
dequantized with no activation rounding, which separates CTranslate2's weights from its activation handling).
`--threads` (default 2) for every runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import latency  # noqa: E402 - the teacher, untrained students, inputs and memory probes of benchmarks/latency.py

RUNTIMES = ("torch", "int8", "onnx", "ctranslate2", "ctranslate2-int8", "ctranslate2-float32")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bart-base", help="6+6-layer preset of a built teacher (default bart-base)")
    parser.add_argument("--teacher", metavar="DIR", help="a trained FP32 teacher directory (with --ckpt)")
    parser.add_argument("--ckpt", nargs="+", metavar="FILE", help="trained DQ student checkpoints of that teacher")
    parser.add_argument("--bits", nargs="+", default=["8-8-8", "2-2-8"], help="W-E-A of the built students")
    parser.add_argument("--depth", default="6-3", help="encoder-decoder layers of the built students (default 6-3)")
    parser.add_argument("--tokenizer", default=str(latency.SHARED_DATA / "bart_tokenizer"))
    parser.add_argument("--data", default=str(latency.SHARED_DATA / "xsum" / "test.jsonl"),
                        help="JSONL test file: `document` is timed; the task's columns are scored (default XSum)")
    parser.add_argument("--examples", type=int, default=8, help="inputs timed (default 8)")
    parser.add_argument("--source-length", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quality-examples", type=int, default=100, help="with --ckpt: test documents decoded "
                        "with the task's settings per runtime (0: none)")
    parser.add_argument("--quality-beams", type=int, metavar="N", help="with --ckpt: decode the quality documents "
                        "with N beams (1: greedy) instead of the task's beam count; its other settings stay")
    parser.add_argument("--float64-reference", action="store_true", help="with --ckpt: also decode the quality "
                        "documents with the torch runtime's model in float64 (row torch-float64): the agreement a mere "
                        "change of float precision leaves")
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    parser.add_argument("--work", metavar="DIR", help="teacher, checkpoints and exports (default: a temporary "
                        "directory)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--out", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--probe", nargs=3, metavar=("RUNTIME", "DIR", "TOKENIZER"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# -- models --------------------------------------------------------------------------------------------------------
def prepare_models(args: argparse.Namespace, work: Path) -> tuple[Path, dict[str, dict]]:
    """The teacher directory and {model name: {"packed": dir, "onnx": dir, "ctranslate2": dir, ...}}."""
    from dq_lightning.export import export_student
    from dq_lightning.export.deploy import export_runtime

    if bool(args.teacher) != bool(args.ckpt):
        raise SystemExit("error: --teacher and --ckpt go together")
    teacher = Path(args.teacher) if args.teacher else latency.build_teacher(args, work)
    students = {}
    if args.ckpt:
        for index, checkpoint in enumerate(args.ckpt):
            out = work / f"student-{index}" / "packed"
            manifest = export_student(checkpoint, out, teacher=str(teacher))
            students[f"student {manifest['notation']} #{index}"] = out
    else:
        for bits in args.bits:
            out = work / f"student-{bits}-{args.depth}" / "packed"
            if not (out / "dq_export.json").exists():
                export_student(latency.student_checkpoint(teacher, bits, args.depth, work), out)
            students[f"student {bits} {args.depth}"] = out
    models = {"teacher": {"torch": teacher}}
    models.update({name: {"torch": packed, "int8": packed} for name, packed in students.items()})
    for name, places in models.items():
        for fmt in ("onnx", "ctranslate2"):
            if fmt in args.runtimes or (fmt == "ctranslate2" and "ctranslate2-int8" in args.runtimes):
                out = work / f"{name.replace(' ', '_').replace('#', '')}-{fmt}"  # never beside a given model
                if not (out / "dq_deploy.json").exists():
                    export_runtime(fmt, out, model_dir=str(places["torch"]))
                places[fmt] = out
        if "ctranslate2" in places:  # the teacher's own int8 rounding; a student's codes without activation rounding
            places["ctranslate2-int8" if name == "teacher" else "ctranslate2-float32"] = places["ctranslate2"]
    for places in models.values():
        for runtime in [r for r in places if r not in args.runtimes]:
            del places[runtime]
    return teacher, models


def load(runtime: str, directory: Path, threads: int):
    """A model with `generate(**batch, **settings)` for `runtime`."""
    from dq_lightning.export.predict import load_model

    kind = runtime.split("-")[0]
    compute = runtime.split("-")[1] if "-" in runtime else None
    model, _, _ = load_model(str(directory), False, "sdpa", runtime=kind, threads=threads, compute_type=compute)
    return model


def size_on_disk(runtime: str, directory: Path) -> int:
    """Bytes of the runtime's weight and graph files (no tokenizer or configs)."""
    names = {"torch": ["model.safetensors", "packed.safetensors"], "int8": ["packed.safetensors"],
             "onnx": ["weights.bin", "encoder.onnx", "cross.onnx", "decoder.onnx"],
             "ctranslate2": ["ctranslate2/model.bin"]}[runtime.split("-")[0]]
    return sum((directory / name).stat().st_size for name in names if (directory / name).is_file())


def settings(args: argparse.Namespace, beams: int) -> dict:
    return latency.generation_kwargs(argparse.Namespace(new_tokens=args.new_tokens, fix_length="no-eos"), beams)


# -- timing ----------------------------------------------------------------------------------------------------------
def time_models(args: argparse.Namespace, loaded: dict, batches: dict, count: int) -> list[dict]:
    """Median per-example wall and CPU time of every (model, runtime) at each setting, in interleaved rounds."""
    configs = [(1, 1), (8, args.beams)]
    wall = {(key, c): [] for key in loaded for c in configs}
    cpu = {(key, c): [] for key in loaded for c in configs}
    for key, model in loaded.items():  # warm-up
        latency.run_batches(model, batches[1][:1], settings(args, 1))
    for round_index in range(args.repeats):
        for config in configs:
            for key, model in loaded.items():
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                latency.run_batches(model, batches[config[0]], settings(args, config[1]))
                wall[key, config].append((time.perf_counter() - start_wall) / count)
                cpu[key, config].append((time.process_time() - start_cpu) / count)
        print(f"round {round_index + 1}/{args.repeats} done", file=sys.stderr)
    rows = []
    for config in configs:
        reference = statistics.median(wall[("teacher", "torch"), config])
        for key in loaded:
            median = statistics.median(wall[key, config])
            rows.append({"model": key[0], "runtime": key[1], "batch": config[0], "beams": config[1],
                         "ms_per_example": 1000 * median, "cpu_ms_per_example": 1000 * statistics.median(
                             cpu[key, config]), "examples_per_s": 1 / median, "speedup_vs_teacher": reference / median})
    return rows


def probe(args: argparse.Namespace) -> None:
    """Subprocess: peak resident memory of loading one model and running one batch-8 beam search."""
    import ctranslate2  # noqa: F401 - every runtime's imports happen before the baseline
    import onnxruntime  # noqa: F401
    import torch

    import dq_lightning.export.loading  # noqa: F401
    from dq_lightning.models.tokenizer import load_tokenizer

    torch.set_num_threads(args.threads)
    runtime, directory, tokenizer = args.probe
    batches = latency.make_batches(load_tokenizer(tokenizer), latency.read_documents(args.data, 8), 8,
                                   args.source_length)
    baseline = latency.rss_peak_mib()
    model = load(runtime, Path(directory), args.threads)
    latency.run_batches(model, batches, settings(args, args.beams))
    print(json.dumps({"baseline_mib": baseline, "peak_mib": latency.rss_peak_mib()}))


def memory(args: argparse.Namespace, models: dict, teacher: Path) -> dict:
    results = {}
    for name, places in models.items():
        for runtime, directory in places.items():
            command = [sys.executable, __file__, "--probe", runtime, str(directory), str(teacher), "--threads",
                       str(args.threads), "--beams", str(args.beams), "--new-tokens", str(args.new_tokens),
                       "--source-length", str(args.source_length), "--data", args.data]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"memory probe of {name} / {runtime} failed:\n{done.stderr[-2000:]}")
            results[f"{name} / {runtime}"] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


# -- quality (trained models) ----------------------------------------------------------------------------------
def test_rows(path: str, task_name: str | None, count: int) -> tuple[list[str], list[str], bool]:
    """(sources, references, translation?) of the first `count` rows of a test file in the task's columns."""
    from dq_lightning.data.tasks import get_task

    task = get_task(task_name or "xsum")

    def field(row: dict, dotted: str):
        for part in dotted.split("."):
            row = row[part]
        return row

    sources, references = [], []
    with open(path) as handle:
        for line in handle:
            row = json.loads(line)
            sources.append(" ".join(str(field(row, task.source_column)).split()))
            references.append(str(field(row, task.target_column)))
            if len(sources) == count:
                break
    return sources, references, task.source_lang is not None


def decode(model, tokenizer, texts: list[str], task: dict, batch_size: int = 8,
           beams: int | None = None) -> list[list[int]]:
    """Generated token ids (special tokens removed) with the model's own decoding settings (the task's), with
    `beams` beams instead of the task's when given."""
    import copy

    import torch

    from dq_lightning.export.predict import encode_sources, source_length

    special = set(tokenizer.all_special_ids)
    length = source_length(model, task, None)
    generation_config = model.generation_config
    if beams is not None:
        generation_config = copy.deepcopy(generation_config)
        generation_config.num_beams = beams
    outputs = []
    for start in range(0, len(texts), batch_size):
        batch = encode_sources(tokenizer, texts[start:start + batch_size], length, task)
        with torch.inference_mode():
            generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       generation_config=generation_config)
        outputs += [[t for t in (row.tolist() if hasattr(row, "tolist") else row) if t not in special]
                    for row in generated]
    return outputs


def token_agreement(outputs: list[list[int]], references: list[list[int]]) -> float:
    """Share of token positions where two runs' outputs agree, over the longer output of each pair (a token
    one output has and the other lacks is a disagreement)."""
    equal = sum(a == b for output, reference in zip(outputs, references) for a, b in zip(output, reference))
    positions = sum(max(len(output), len(reference)) for output, reference in zip(outputs, references))
    return equal / positions if positions else 1.0


def quality(args: argparse.Namespace, models: dict, loaded: dict) -> list[dict]:
    """Per model and runtime: the metric on the test rows and the share of outputs identical to the torch
    runtime's (for a student, the fake-quantized student's)."""
    import copy

    import torch

    from dq_lightning.models.directory import hf_directory_info, hf_directory_task_info
    from dq_lightning.metrics import GenerationMetrics
    from dq_lightning.models.tokenizer import load_tokenizer

    rows = []
    for name, places in models.items():
        manifest_path = places["torch"] / "dq_export.json"
        task = json.loads(manifest_path.read_text()).get("task") or {} if manifest_path.exists() else \
            {**hf_directory_task_info(places["torch"]), "name": hf_directory_info(places["torch"]).get("task")}
        tokenizer = load_tokenizer(str(places["torch"]))
        texts, references, translation = test_rows(args.data, task.get("name"), args.quality_examples)
        reference_ids = None
        for runtime in [*places, *(["torch-float64"] if args.float64_reference else [])]:
            # The float64 row: the torch runtime's model in float64, the same arithmetic summed more exactly. How far
            # it moves from the float32 model is how far any other order of float sums can move a quantized model.
            model = (copy.deepcopy(loaded[name, "torch"]).double() if runtime == "torch-float64"
                     else loaded[name, runtime])
            ids = decode(model, tokenizer, texts, task, beams=args.quality_beams)
            reference_ids = ids if runtime == "torch" else reference_ids
            predictions = [" ".join(tokenizer.decode(row, skip_special_tokens=True).split()) for row in ids]
            metrics = GenerationMetrics(translation=translation)
            metrics.update(predictions, references, torch.tensor([len(row) for row in ids]))
            scores = metrics.compute()
            rows.append({"model": name, "runtime": runtime, "metric": "bleu" if translation else "rougeL",
                         "score": float(scores["bleu" if translation else "rougeL"]),
                         "identical_to_torch": sum(a == b for a, b in zip(ids, reference_ids)) / len(ids),
                         "token_agreement": token_agreement(ids, reference_ids)})
            print(f"quality: {name} / {runtime} done", file=sys.stderr)
    return rows


# -- main ------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.probe:
        probe(args)
        return 0
    import torch

    from dq_lightning.models.tokenizer import load_tokenizer

    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="dq_deploy_"))
    work.mkdir(parents=True, exist_ok=True)
    teacher, models = prepare_models(args, work)
    print(f"exported into {work}", file=sys.stderr)
    tokenizer = load_tokenizer(str(teacher))
    positions = json.loads((teacher / "config.json").read_text()).get("max_position_embeddings")
    args.source_length = min(args.source_length, positions or args.source_length)  # a tiny model reads fewer
    texts = latency.read_documents(args.data, args.examples)
    batches = {size: latency.make_batches(tokenizer, texts, size, args.source_length) for size in (1, 8)}
    loaded = {(name, runtime): load(runtime, directory, args.threads)
              for name, places in models.items() for runtime, directory in places.items()}
    results = {"settings": {k: v for k, v in vars(args).items() if k != "probe"}, "torch": torch.__version__,
               "versions": _versions(), "cpu_count": os.cpu_count(), "loadavg": os.getloadavg(),
               "latency": time_models(args, loaded, batches, len(texts)),
               "size_bytes": {f"{name} / {runtime}": size_on_disk(runtime, directory)
                              for name, places in models.items() for runtime, directory in places.items()}}
    if args.ckpt and args.quality_examples:
        results["quality"] = quality(args, models, loaded)
    if not args.no_memory:
        results["memory"] = memory(args, models, teacher)
    print(report(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


def _versions() -> dict:
    import importlib.metadata as metadata

    return {name: metadata.version(name) for name in ("torch", "transformers", "onnxruntime", "ctranslate2")}


def report(results: dict) -> str:
    s = results["settings"]
    lines = [f"threads={s['threads']} (cpu_count {results['cpu_count']}, load average "
             f"{', '.join(f'{x:.1f}' for x in results['loadavg'])}), {results['versions']}; {s['examples']} inputs "
             f"<= {s['source_length']} tokens, {s['new_tokens']} new tokens each, median of {s['repeats']} "
             "interleaved rounds; speed-up = FP32 PyTorch teacher / model (wall)", "",
             "  model                  runtime              b1 greedy ms  speed-up   b8x{0} ms  speed-up  ex/s (b8)  "
             "peak MiB  size MiB".format(s["beams"])]
    latency_rows = {(r["model"], r["runtime"], r["batch"]): r for r in results["latency"]}
    memory_rows = results.get("memory", {})
    for (name, runtime, batch), row in latency_rows.items():
        if batch != 1:
            continue
        beam = latency_rows[name, runtime, 8]
        peak = memory_rows.get(f"{name} / {runtime}", {}).get("peak_mib", float("nan"))
        size = results["size_bytes"][f"{name} / {runtime}"] / 2**20
        lines.append(f"  {name:<22} {runtime:<19} {row['ms_per_example']:>12.1f} {row['speedup_vs_teacher']:>8.2f}x "
                     f"{beam['ms_per_example']:>10.1f} {beam['speedup_vs_teacher']:>8.2f}x "
                     f"{beam['examples_per_s']:>9.2f} {peak:>9.0f} {size:>9.2f}")
    if "quality" in results:
        beams = results["settings"].get("quality_beams")
        decoding = "the task's decoding settings" + (f", {beams} beam(s)" if beams else "")
        lines += ["", f"Test quality with {decoding} (identical: share of outputs token-identical to the torch "
                  "runtime of the same model, i.e. the fake-quantized student; tokens: share of token positions "
                  "that agree)"]
        for row in results["quality"]:
            lines.append(f"  {row['model']:<22} {row['runtime']:<17} {row['metric']} {row['score']:6.2f}   "
                         f"identical {row['identical_to_torch']:.1%}   tokens {row['token_agreement']:.1%}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
