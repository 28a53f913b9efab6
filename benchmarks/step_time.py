"""Training-step time of DQ students against teacher fine-tuning, in one run on the same batch.

(a) teacher fine-tuning: forward + backward + AdamW step of the 6+6-layer teacher;
(b) DQ student 6-6 at 2-2-8: frozen teacher forward (hidden states and attention maps) + fake-quantized
    student forward/backward + all distillation losses + AdamW step;
(c) DQ student 6-3 at 2-2-8, the same.
Target (issue 4): (b) at most 1.8x (a).

    python benchmarks/step_time.py                       # `small` preset (d_model 256), batch 8 x 256 -> 64 tokens
    python benchmarks/step_time.py --preset bart-base --batch-size 4

Weights are random (from a preset; nothing is downloaded): step time does not depend on their values.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch

from dq_lightning.modules.student import DQStudentModule
from dq_lightning.models.presets import build_config
from dq_lightning.quant import prepare
from dq_lightning.modules.seq2seq import label_smoothed_loss
from transformers import AutoModelForSeq2SeqLM


def make_batch(vocab: int, batch_size: int, source: int, target: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab, (batch_size, source), generator=generator)
    labels = torch.randint(5, vocab, (batch_size, target), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[: batch_size // 2, source * 3 // 4:] = 0  # some padding, as real batches have
    input_ids[attention_mask == 0] = 1
    labels[: batch_size // 2, target * 3 // 4:] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def time_steps(step, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return times


def teacher_step_fn(model, batch, lr=1e-4):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=decoder_input_ids).logits
        label_smoothed_loss(logits, batch["labels"], 0.1).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


def student_step_fn(teacher_dir: str, depth: str, bits: str, batch, lr=1e-4):
    module = DQStudentModule(teacher=teacher_dir, bits=bits, depth=depth)
    prepare(module.model, module.quant_config)
    module.model.train()
    optimizer = torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad], lr=lr)

    def step():
        optimizer.zero_grad(set_to_none=True)
        module._step(batch, "train").backward()
        torch.nn.utils.clip_grad_norm_(module.model.parameters(), 1.0)
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--source-length", type=int, default=256)
    parser.add_argument("--target-length", type=int, default=64)
    parser.add_argument("--bits", default="2-2-8")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)

    config = build_config(args.preset, vocab_size=args.vocab_size, dropout=0.1)
    teacher = AutoModelForSeq2SeqLM.from_config(config, attn_implementation="eager")
    batch = make_batch(args.vocab_size, args.batch_size, args.source_length, args.target_length)
    results = {}
    with tempfile.TemporaryDirectory() as teacher_dir:
        teacher.save_pretrained(teacher_dir)
        teacher.train()
        results["(a) teacher fine-tuning"] = time_steps(teacher_step_fn(teacher, batch), args.warmup, args.repeats)
        for depth in ("6-6", "6-3"):
            name = f"({'b' if depth == '6-6' else 'c'}) DQ {args.bits} {depth}"
            results[name] = time_steps(student_step_fn(teacher_dir, depth, args.bits, batch),
                                       args.warmup, args.repeats)

    baseline = statistics.median(results["(a) teacher fine-tuning"])
    print(f"preset {args.preset}, batch {args.batch_size} x {args.source_length} -> {args.target_length} tokens, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} steps after {args.warmup} warm-up")
    print(f"{'step':<28}{'ms/step':>10}{'vs (a)':>9}")
    for name, times in results.items():
        median = statistics.median(times)
        print(f"{name:<28}{median * 1000:>10.1f}{median / baseline:>8.2f}x")
    ratio = statistics.median(results[f"(b) DQ {args.bits} 6-6"]) / baseline
    print(f"target (b) <= 1.8x (a): {'met' if ratio <= 1.8 else 'NOT met'} ({ratio:.2f}x)")


if __name__ == "__main__":
    main()
