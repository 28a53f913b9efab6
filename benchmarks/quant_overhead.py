"""Cost of quantize-on-forward: one training step (forward + backward + AdamW) of a 6+6-layer BART with fake
quantization against the same model in full precision, on the same batch, in one run.

    .venv/bin/python benchmarks/quant_overhead.py --preset small --settings 2-2-8 8-8-8

Every variant starts from the same weights. Variants are timed in interleaved rounds so that a slow patch of
the machine hits all of them alike; the median and the fastest step are reported, with their ratios to FP32.
Target: at most +25% over FP32.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import AutoModelForSeq2SeqLM

from dq_lightning.models.presets import build_config
from dq_lightning.quant import QuantConfig, prepare


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", help="a 6+6-layer dq_lightning preset (default small)")
    parser.add_argument("--settings", nargs="+", default=["2-2-8", "8-8-8"], metavar="W-E-A",
                        help="quantized variants to time against FP32 (default 2-2-8 8-8-8)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--source-length", type=int, default=128)
    parser.add_argument("--target-length", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=None, help="default: the preset's (50265)")
    parser.add_argument("--attn", default="eager", choices=("eager", "sdpa"),
                        help="attention implementation (default eager, what distillation trains with)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                        help="wall time, or this process's CPU time: with --threads 1, CPU time is what the step "
                             "costs even while other processes compete for the cores (default wall)")
    return parser.parse_args(argv)


def make_batch(args: argparse.Namespace, vocab: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(3, vocab, (args.batch_size, args.source_length), generator=generator),
            "labels": torch.randint(3, vocab, (args.batch_size, args.target_length), generator=generator)}


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               clock=time.perf_counter) -> float:
    start = clock()
    optimizer.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    optimizer.step()
    return clock() - start


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = build_config(args.preset, vocab_size=args.vocab_size)
    torch.manual_seed(0)
    base = AutoModelForSeq2SeqLM.from_config(config, attn_implementation=args.attn).train()
    batch = make_batch(args, config.vocab_size)

    variants: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]] = {}
    for name in ["fp32", *args.settings]:
        model = copy.deepcopy(base)
        if name != "fp32":
            prepare(model, QuantConfig.from_notation(name))
        variants[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    del base

    for model, optimizer in variants.values():
        for _ in range(args.warmup):
            train_step(model, optimizer, batch)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (model, optimizer) in variants.items():
            times[name] += [train_step(model, optimizer, batch, clock) for _ in range(args.steps)]

    params = sum(p.numel() for p in variants["fp32"][0].parameters())
    print(f"preset {args.preset} ({config.encoder_layers}+{config.decoder_layers} layers, d_model {config.d_model}, "
          f"{params / 1e6:.1f}M parameters), batch {args.batch_size} x {args.source_length} -> "
          f"{args.target_length}, {args.attn} attention, {torch.get_num_threads()} threads, "
          f"{args.rounds * args.steps} timed steps each, {args.clock} clock")
    # The minimum is the least disturbed by other processes; on a busy machine trust it over the median.
    base_median, base_min = statistics.median(times["fp32"]), min(times["fp32"])
    for name, samples in times.items():
        median, fastest = statistics.median(samples), min(samples)
        print(f"{name:>8}: median {median * 1000:8.1f} ms/step, min {fastest * 1000:8.1f}   "
              f"ratio {median / base_median:.3f} (median), {fastest / base_min:.3f} (min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
