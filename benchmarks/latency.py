"""Real compression, measured: file sizes and CPU generation latency of the FP32 teacher, the exported student
dequantized to FP32, and the exported student on the int8 path, on the same inputs, in one run.

    .venv/bin/python benchmarks/latency.py --preset small            # 6+6 teacher, 6-3 student at 8-8-8
    .venv/bin/python benchmarks/latency.py --teacher runs/xsum/teacher-tiny/hf \
        --ckpt runs/xsum/dq-tiny/checkpoints/last.ckpt

Without `--teacher/--ckpt`, a 6+6 teacher is built from a preset (random weights, the real 50,265-token BART
vocabulary) and saved, and the 6-3 student at `--bits` (default 8-8-8) is derived from it with
`DQStudentModule` (prepared, not trained: timing does not depend on the weights' values), written as a
checkpoint and exported with `export_student`. Students at `--size-settings` are exported too, for the file-size
table only.

Sizes: the export's `packed.safetensors` against `model_size(..., convention="strict")` (what a packed file
must hold), and the file-size ratio to the teacher's `model.safetensors` next to the accounted ratios (paper
and strict).

Latency: `generate` on the first `--examples` XSum test documents (truncated to `--source-length` tokens),
at batch 1 and batch 8, greedy and `--beams` beams, with the output length fixed to `--new-tokens` (no
end-of-sequence token; `--fix-length min-new-tokens` uses `min_new_tokens = max_new_tokens` instead) so that
every model does the same number of decoding steps. Per-example latency is the wall time of all batches
divided by the number of examples; the three models are timed in interleaved rounds (a slow patch of a
shared machine hits all of them alike) and the median over `--repeats` rounds is reported, with the process
CPU time beside it. `--threads` defaults to 1: on a shared, busy CPU, two threads
wait for each other at every small operation and the timings become noise.

Peak memory: each model is loaded in a fresh subprocess that runs one batch-8 beam search; its peak resident
set (VmHWM of /proc/self/status; `ru_maxrss` would not do, Linux carries it over from the parent process) is
reported, and the same minus the peak of that process after its imports and before loading the model
(Python, torch and transformers alone); also the growth of the resident set (VmRSS) from before loading to
after the run, once garbage is collected and glibc has returned freed pages (`malloc_trim`): what the loaded
model occupies (measured after the run because the teacher's weights are memory-mapped and become resident
only when touched).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DQ_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))
MODELS = ("teacher", "student-fp32", "student-int8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", help="6+6-layer preset of the teacher (default small)")
    parser.add_argument("--teacher", metavar="DIR", help="an existing FP32 teacher directory (with --ckpt)")
    parser.add_argument("--ckpt", metavar="FILE", help="an existing DQ student checkpoint of that teacher")
    parser.add_argument("--bits", default="8-8-8", help="W-E-A of the timed student (default 8-8-8)")
    parser.add_argument("--depth", default="6-3", help="encoder-decoder layers of the student (default 6-3)")
    parser.add_argument("--width", help="a thinner student (model.width: heads=,ffn=,d_model= or a ratio), its units "
                        "chosen at random: timing depends on the shapes, not on which units are kept")
    parser.add_argument("--size-settings", nargs="*", default=["8-8-8", "4-4-8", "2-8-8", "2-2-8"],
                        metavar="W-E-A", help="students exported for the size table (default 8-8-8 4-4-8 2-8-8 "
                        "2-2-8)")
    parser.add_argument("--tokenizer", default=str(SHARED_DATA / "bart_tokenizer"),
                        help="tokenizer of a built teacher (default: ../shared/data/bart_tokenizer)")
    parser.add_argument("--data", default=str(SHARED_DATA / "xsum" / "test.jsonl"),
                        help="JSONL whose `document` column is the input (default XSum test)")
    parser.add_argument("--examples", type=int, default=8, help="inputs timed (default 8)")
    parser.add_argument("--source-length", type=int, default=512, help="input tokens kept (default 512)")
    parser.add_argument("--new-tokens", type=int, default=32, help="generated tokens, fixed (default 32)")
    parser.add_argument("--beams", type=int, default=4, help="beam width of the beam-search runs (default 4)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see above)")
    parser.add_argument("--attn", default="sdpa", choices=("eager", "sdpa"),
                        help="attention implementation of all three models (default sdpa)")
    parser.add_argument("--fix-length", default="no-eos", choices=("no-eos", "min-new-tokens"),
                        help="how the output length is fixed: no end-of-sequence token (default), or "
                        "min_new_tokens = max_new_tokens")
    parser.add_argument("--work", metavar="DIR", help="where teacher, checkpoints and exports go (default: a "
                        "temporary directory)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--components", action="store_true", help="also: each model's generation time by component "
                        "(encoder, decoder self- and cross-attention, FFN, LM head, the rest), as shares of its thread "
                        "CPU time, and one Linear's int8 / FP32 speed-up at the encoder's and the decoder's shapes "
                        "(shares and ratios stay valid on a busy machine)")
    parser.add_argument("--out", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--probe", nargs=2, metavar=("KIND", "DIR"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# -- inputs and models ------------------------------------------------------------------------------------
def read_documents(path: str, count: int) -> list[str]:
    texts = []
    with open(path) as handle:
        for line in handle:
            texts.append(" ".join(json.loads(line)["document"].split()))
            if len(texts) == count:
                break
    return texts


def load_model(kind: str, directory: str, attn: str):
    if kind == "teacher":
        from dq_lightning.models.loading import load_pretrained

        return load_pretrained(directory, flag="--teacher", attn_implementation=attn).eval()
    from dq_lightning.export import load_packed

    return load_packed(directory, int8=kind == "student-int8", attn_implementation=attn)


def generation_kwargs(args: argparse.Namespace, beams: int) -> dict:
    """Exactly `--new-tokens` decoding steps for every model. Without an end-of-sequence token nothing stops
    early; `min_new_tokens` would fix the length too, but its logits processor runs an `isin` over the whole
    vocabulary at every step (transformers overhead, the same for every model, that dilutes the ratios)."""
    fixed = (dict(min_new_tokens=args.new_tokens) if args.fix_length == "min-new-tokens"
             else dict(eos_token_id=None, forced_eos_token_id=None))
    return dict(num_beams=beams, max_new_tokens=args.new_tokens, do_sample=False, no_repeat_ngram_size=0,
                length_penalty=1.0, early_stopping=False, **fixed)


def run_batches(model, batches, kwargs) -> list:
    import torch

    outputs = []
    with torch.inference_mode():
        for batch in batches:
            outputs.append(model.generate(**batch, **kwargs))
    return outputs


def make_batches(tokenizer, texts: list[str], batch_size: int, source_length: int) -> list[dict]:
    return [dict(tokenizer(texts[i:i + batch_size], truncation=True, max_length=source_length, padding=True,
                           return_tensors="pt")) for i in range(0, len(texts), batch_size)]


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise), so that the
    resident set after loading is the model, not the loader's temporaries."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_now_mib() -> float:
    """Current resident set (VmRSS); NaN where /proc does not report it."""
    from dq_lightning.process_memory import proc_status_mib

    value = proc_status_mib("VmRSS")
    return float("nan") if value is None else value


def rss_peak_mib() -> float:
    """Peak resident set of this process: VmHWM. Not `ru_maxrss`: Linux carries that over from the parent
    across fork and exec, so a probe started by a large benchmark process would report the parent's peak."""
    from dq_lightning.process_memory import proc_status_mib

    value = proc_status_mib("VmHWM")
    if value is not None:
        return value
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux; elsewhere an upper bound


def probe(args: argparse.Namespace) -> None:
    """Subprocess: peak RSS of loading one model and running one batch-8 beam search."""
    import torch

    import dq_lightning.export  # noqa: F401 - every kind's imports happen before the baseline
    import dq_lightning.models.loading  # noqa: F401
    from dq_lightning.models.tokenizer import load_tokenizer

    torch.set_num_threads(args.threads)
    kind, directory = args.probe
    tokenizer = load_tokenizer(directory)
    batches = make_batches(tokenizer, read_documents(args.data, 8), 8, args.source_length)
    baseline = rss_peak_mib()
    before = rss_now_mib()
    model = load_model(kind, directory, args.attn)
    run_batches(model, batches, generation_kwargs(args, args.beams))
    peak = rss_peak_mib()
    release_freed_memory()
    # After a run every weight has been touched: a memory-mapped safetensors file (the teacher) is resident.
    resident = rss_now_mib() - before
    print(json.dumps({"baseline_mib": baseline, "model_resident_mib": resident, "peak_mib": peak,
                      "model_weights_mib": weights_in_memory(model) / 2**20}))


def weights_in_memory(model) -> int:
    """Bytes of the tensors a model computes with: parameters, buffers (int8 embedding codes, scales) and the
    int8 weights of dynamic quantized Linear layers (int8 codes, per-channel scales, FP32 bias)."""
    from torch.ao.nn.quantized import dynamic as nnqd

    total, seen = 0, set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    for module in model.modules():
        if isinstance(module, nnqd.Linear):
            weight, bias = module._weight_bias()
            total += weight.numel() + 4 * weight.shape[0] + (0 if bias is None else bias.numel() * 4)
    return total


# -- preparation -----------------------------------------------------------------------------------------
def build_teacher(args: argparse.Namespace, work: Path) -> Path:
    import torch

    from dq_lightning.models.loading import load_or_build_model
    from dq_lightning.models.tokenizer import load_tokenizer

    out = work / f"teacher-{args.preset}"
    if (out / "model.safetensors").exists():
        return out
    tokenizer = load_tokenizer(args.tokenizer, flag="--tokenizer")
    torch.manual_seed(0)
    # dropout 0 unless asked: latency does not depend on it; a training rehearsal gives the preset's
    model = load_or_build_model(args.preset, tokenizer, dropout=getattr(args, "dropout", 0.0))
    model.save_pretrained(out)
    tokenizer.save_pretrained(str(out))
    return out


def student_checkpoint(teacher: Path, bits: str, depth: str, work: Path, width: str | None = None) -> Path:
    """A checkpoint laid out as Lightning writes it, of a student prepared (not trained) for `bits`."""
    import torch

    from dq_lightning.modules.student import DQStudentModule
    from dq_lightning.quant import prepare

    path = work / f"student-{bits}-{depth}{'-' + width if width else ''}.ckpt"
    module = DQStudentModule(teacher=str(teacher), bits=bits, depth=depth, width=width, shape={"width_method": "rand"})
    prepare(module.model, module.quant_config)
    state = {f"model.{key}": value for key, value in module.model.state_dict().items()}
    checkpoint = {"state_dict": state, "hyper_parameters": dict(module.hparams), "global_step": 0}
    if width:
        checkpoint["width_kept"] = module.factory.kept.to_state()  # as fit stores a thinner student's units
    torch.save(checkpoint, path)
    return path


def size_row(bits: str, manifest: dict, teacher_file: int) -> dict:
    size = manifest["size"]
    return {"bits": bits, "file_mib": size["weights_bytes"] / 2**20, "strict_mib": size["strict_bytes"] / 2**20,
            "file_vs_strict": size["weights_bytes"] / size["strict_bytes"],
            "file_ratio": teacher_file / size["weights_bytes"], "paper_ratio": size["paper_compression"],
            "strict_ratio": size["strict_compression"],
            "dir_mib": sum(f["bytes"] for f in manifest["files"].values()) / 2**20}


# -- where the time goes -----------------------------------------------------------------------------------
def component_shares(model, batches, kwargs) -> dict:
    """Thread CPU time of one pass over `batches`, and the share of it spent in each part of the model (forward
    hooks; `rest` is the generate loop, embeddings and norms)."""
    spent: dict = {}
    starts: list = []
    parts = {"encoder": [model.model.encoder], "lm_head": [model.lm_head]}
    for layer in model.model.decoder.layers:
        parts.setdefault("decoder self-attention", []).append(layer.self_attn)
        parts.setdefault("decoder cross-attention", []).append(layer.encoder_attn)
        parts.setdefault("decoder FFN", []).extend([layer.fc1, layer.fc2])
    handles = []
    for name, modules in parts.items():
        for module in modules:
            handles.append(module.register_forward_pre_hook(lambda m, a: starts.append(time.thread_time())))
            handles.append(module.register_forward_hook(
                lambda m, a, o, name=name: spent.__setitem__(name, spent.get(name, 0.0) + time.thread_time()
                                                             - starts.pop())))
    start = time.thread_time()
    run_batches(model, batches, kwargs)
    total = time.thread_time() - start
    for handle in handles:
        handle.remove()
    spent["rest"] = total - sum(spent.values())
    return {"cpu_s": total, "shares": {name: value / total for name, value in spent.items()}}


def linear_speedups(hidden: int, ffn: int, vocab: int, tokens: int) -> list[dict]:
    """One Linear's FP32 / int8 (the int8 path's module, from int8 codes) CPU-time ratio at the encoder's shapes
    (`tokens` rows) and a decoding step's (1 row)."""
    import torch

    from dq_lightning.export.runtime import int8_linear

    rows = []
    for count, inputs, outputs in [(tokens, hidden, hidden), (tokens, hidden, ffn), (tokens, ffn, hidden),
                                   (1, hidden, hidden), (1, hidden, ffn), (1, hidden, vocab)]:
        linear = torch.nn.Linear(inputs, outputs)
        codes = torch.randint(-127, 128, (outputs, inputs), dtype=torch.int8)
        quantized = int8_linear(codes, torch.rand(outputs, 1) * 1e-3, linear.bias)
        x = torch.randn(1, count, inputs)
        times = []
        for module in (linear, quantized):
            with torch.inference_mode():
                module(x)
                repeats = max(3, int(2e8 // (count * inputs * outputs)))
                start = time.thread_time()
                for _ in range(repeats):
                    module(x)
                times.append((time.thread_time() - start) / repeats)
        rows.append({"shape": f"{count} x {inputs} -> {outputs}", "int8_speedup": times[0] / times[1]})
    return rows


# -- main ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.probe:
        probe(args)
        return 0
    import torch

    from dq_lightning.export import export_student
    from dq_lightning.models.tokenizer import load_tokenizer

    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="dq_latency_"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if bool(args.teacher) != bool(args.ckpt):
        raise SystemExit("error: --teacher and --ckpt go together")
    teacher = Path(args.teacher) if args.teacher else build_teacher(args, work)
    teacher_file = (teacher / "model.safetensors").stat().st_size

    sizes = []
    # The timed student: the checkpoint's export in a directory of its own (the size-table students below,
    # built untrained from the teacher, must not land on it), or the preset student at --bits.
    shape = f"{args.depth}{'-' + args.width if args.width else ''}"
    timed_export = work / ("packed-ckpt" if args.ckpt else f"packed-{args.bits}-{shape}")
    if args.ckpt:
        manifest = export_student(args.ckpt, timed_export, teacher=str(teacher))
        sizes.append(size_row(manifest["notation"], manifest, teacher_file))
        args.bits = manifest["notation"]  # what the latency table is labelled with
    for bits in dict.fromkeys([args.bits] * (not args.ckpt) + list(args.size_settings)):
        out = timed_export if bits == args.bits and not args.ckpt else work / f"packed-{bits}-{shape}"
        manifest = export_student(student_checkpoint(teacher, bits, args.depth, work, args.width), out)
        sizes.append(size_row(bits, manifest, teacher_file))
    print(f"[{time.time() - started:.0f}s] exported; teacher {teacher.name}: {teacher_file / 2**20:.2f} MiB",
          file=sys.stderr)

    directories = {"teacher": str(teacher), "student-fp32": str(timed_export), "student-int8": str(timed_export)}
    models = {kind: load_model(kind, directory, args.attn) for kind, directory in directories.items()}
    tokenizer = load_tokenizer(str(teacher))
    texts = read_documents(args.data, args.examples)
    configs = [(batch, beams) for batch in args.batch_sizes for beams in (1, args.beams)]
    batches = {batch: make_batches(tokenizer, texts, batch, args.source_length) for batch in args.batch_sizes}
    for kind, model in models.items():  # warm-up: first-call allocations, kernel selection
        run_batches(model, batches[args.batch_sizes[0]][:1], generation_kwargs(args, 1))

    wall: dict = {(kind, c): [] for kind in MODELS for c in configs}
    cpu: dict = {(kind, c): [] for kind in MODELS for c in configs}
    outputs: dict = {}
    for round_index in range(args.repeats):
        for config in configs:
            batch, beams = config
            for kind in MODELS:
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                generated = run_batches(models[kind], batches[batch], generation_kwargs(args, beams))
                wall[kind, config].append((time.perf_counter() - start_wall) / len(texts))
                cpu[kind, config].append((time.process_time() - start_cpu) / len(texts))
                outputs[kind, config] = generated
        print(f"[{time.time() - started:.0f}s] round {round_index + 1}/{args.repeats} done", file=sys.stderr)

    lengths = {tuple(t.shape[-1] for t in outputs[kind, c]) for kind in MODELS for c in configs
               if c[0] == args.batch_sizes[0]}
    latency = []
    for config in configs:
        teacher_time = statistics.median(wall["teacher", config])
        for kind in MODELS:
            median = statistics.median(wall[kind, config])
            latency.append({"model": kind, "batch": config[0], "beams": config[1], "ms_per_example": 1000 * median,
                            "cpu_ms_per_example": 1000 * statistics.median(cpu[kind, config]),
                            "spread": (max(wall[kind, config]) - min(wall[kind, config])) / median,
                            "speedup_vs_teacher": teacher_time / median})

    def agreement(a: str, b: str, config) -> float:
        pairs = [(x, y) for bx, by in zip(outputs[a, config], outputs[b, config]) for x, y in zip(bx, by)]
        return sum(torch.equal(x, y) for x, y in pairs) / len(pairs)

    greedy = (args.batch_sizes[0], 1)
    results = {
        "settings": {k: v for k, v in vars(args).items() if k != "probe"}, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "loadavg": os.getloadavg(),
        "teacher_file_mib": teacher_file / 2**20, "sizes": sizes, "latency": latency,
        "int8_identical_generations": agreement("student-int8", "student-fp32", greedy),
        "output_lengths": sorted(lengths),
    }
    if args.components:
        greedy_batches = batches[args.batch_sizes[0]]
        results["components"] = {kind: component_shares(models[kind], greedy_batches, generation_kwargs(args, 1))
                                 for kind in MODELS}
        config = models["teacher"].config
        longest = max(batch["input_ids"].shape[1] for batch in greedy_batches)
        results["linear_int8_speedup"] = linear_speedups(config.d_model, config.encoder_ffn_dim, config.vocab_size,
                                                         longest)
    if not args.no_memory:
        memory = {}
        for kind, directory in directories.items():
            command = [sys.executable, __file__, "--probe", kind, directory, "--threads", str(args.threads),
                       "--fix-length", args.fix_length,
                       "--attn", args.attn, "--beams", str(args.beams), "--new-tokens", str(args.new_tokens),
                       "--source-length", str(args.source_length), "--data", args.data]
            done = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_ROOT)
            if done.returncode != 0:
                raise SystemExit(f"memory probe of {kind} failed:\n{done.stderr[-2000:]}")
            memory[kind] = json.loads(done.stdout.strip().splitlines()[-1])
        results["memory"] = memory
    print(report(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


def report(results: dict) -> str:
    s = results["settings"]
    lines = [f"threads={results['threads']} (cpu_count {results['cpu_count']}, load average "
             f"{', '.join(f'{x:.1f}' for x in results['loadavg'])}), torch {results['torch']}, attention {s['attn']}, "
             f"{s['examples']} XSum inputs <= {s['source_length']} tokens, {s['new_tokens']} new tokens each, "
             f"median of {s['repeats']} interleaved rounds", "",
             f"File sizes (teacher model.safetensors {results['teacher_file_mib']:.2f} MiB; "
             f"student depth {s['depth']}{', width ' + s['width'] if s.get('width') else ''})",
             "  W-E-A  packed.safetensors  strict accounting  file/strict  file ratio  accounted ratio (paper / "
             "strict)  whole dir"]
    for row in results["sizes"]:
        lines.append(f"  {row['bits']:<6} {row['file_mib']:>14.3f} MiB {row['strict_mib']:>13.3f} MiB "
                     f"{row['file_vs_strict']:>10.3f} {row['file_ratio']:>10.2f}x {row['paper_ratio']:>13.2f}x / "
                     f"{row['strict_ratio']:.2f}x {row['dir_mib']:>9.3f} MiB")
    shape = f"{s['depth']}{' width ' + s['width'] if s.get('width') else ''}"
    lines += ["", f"Latency per example (student {s['bits']} {shape}; spread = (max - min) / median of the wall "
              "times; speed-up = teacher / model, from wall and from CPU time)",
              "  batch beams  model          wall ms   cpu ms  spread  speed-up wall   cpu"]
    cpu_teacher = {(r["batch"], r["beams"]): r["cpu_ms_per_example"] for r in results["latency"]
                   if r["model"] == "teacher"}
    for row in results["latency"]:
        cpu_speedup = cpu_teacher[row["batch"], row["beams"]] / row["cpu_ms_per_example"]
        lines.append(f"  {row['batch']:>5} {row['beams']:>5}  {row['model']:<13} {row['ms_per_example']:>8.1f} "
                     f"{row['cpu_ms_per_example']:>8.1f} {row['spread']:>6.0%} {row['speedup_vs_teacher']:>13.2f}x "
                     f"{cpu_speedup:>5.2f}x")
    lines.append(f"\nint8 vs FP32-dequantized student: {results['int8_identical_generations']:.0%} identical greedy "
                 f"generations at batch {s['batch_sizes'][0]}; output lengths {results['output_lengths']}")
    if "memory" in results:
        lines += ["", "Memory (fresh process per model: load + one batch-8 beam search): peak RSS (VmHWM), peak minus "
                  "the process's peak after imports, resident growth kept by the model (VmRSS after the run, "
                  "after gc + malloc_trim), weights held (parameters, buffers, int8 Linear weights)"]
        for kind, row in results["memory"].items():
            lines.append(f"  {kind:<13} peak {row['peak_mib']:>7.1f} MiB   above imports "
                         f"{row['peak_mib'] - row['baseline_mib']:>6.1f} MiB   "
                         f"resident {row['model_resident_mib']:>6.1f} "
                         f"MiB   weights {row['model_weights_mib']:>6.1f} MiB")
    if "components" in results:
        lines += ["", f"Where the time goes (batch {s['batch_sizes'][0]}, greedy; shares of each model's thread CPU "
                  "time, and its CPU time relative to the teacher's)"]
        teacher_cpu = results["components"]["teacher"]["cpu_s"]
        for kind, row in results["components"].items():
            shares = ", ".join(f"{name} {share:.0%}" for name, share in row["shares"].items())
            lines.append(f"  {kind:<13} {row['cpu_s'] / teacher_cpu:>5.2f}x: {shares}")
        lines += ["", "One Linear, int8 path / FP32 speed-up (thread CPU time):"]
        lines += [f"  {row['shape']:<22} {row['int8_speedup']:.2f}x" for row in results["linear_int8_speedup"]]
    return "\n".join(lines)


def rerender(path: str) -> str:
    """The report of a results JSON written with --out."""
    return report(json.loads(Path(path).read_text()))


if __name__ == "__main__":
    sys.exit(main())
