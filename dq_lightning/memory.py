"""Memory of one training process of a paper config: `python -m dq_lightning memory`.

    python -m dq_lightning memory                                  # bart-base and bart-large, A100 40 / 80 GB
    python -m dq_lightning memory --preset bart-large --batch-size 4 8 --devices 4

Per process (one GPU), in bytes, for the worst batch: every sequence of the per-device batch at the full
source and target lengths (1024 and 128 tokens in the paper configs; batches are padded to their longest):

- weights: the float32 teacher (a DQ student's teacher is frozen, float32 under either precision: recipe
  dq-bart's `objective.teacher_precision=fp32`), the float32 student (mixed precision keeps float32 weights);
- gradients (float32) and AdamW's two moments (float32) of every trainable parameter; under DDP with more
  than one process its gradient buckets, a second float32 copy of the gradients (torch's default,
  `gradient_as_bucket_view=False`);
- a DQ student's fake-quantized weights: one copy of every quantized Linear weight is saved for the backward
  pass (float32, plus the bfloat16 copy autocast makes under bf16-mixed);
- activations saved for the backward pass (the formulas below), and the gradient of the logits while the
  backward pass starts;
- runtime: on a GPU 1 GiB for the CUDA context, cuBLAS workspaces and NCCL buffers, then 10% of the whole for
  the caching allocator's fragmentation; on CPU what the interpreter holds after importing torch, Lightning and
  transformers (measured by the caller).

Activations, in elements, with b the per-device batch, s and t the source and target lengths, h d_model,
f the FFN width, a the attention heads, V the vocabulary, Le and Ld the trained model's encoder and decoder
layers, and d = 1 if the model has dropout (bart-base and bart-large: 0.1; their attention and activation
dropout are 0, and so assumed here), else 0. DQ student (recipe dq-bart, eager attention because the losses
read attention maps, quantized activations; the teacher's hidden states and attention maps that the losses
compare are included, one per student layer):

    Le * b * (s * ((17 + 2d) h + 3f) + 3 a s^2)
  + Ld * b * (t * ((24 + 3d) h + 3f) + 6 s h + 3 a t s + 3 a t^2)
  + b * ((5 + d) s h + (4 + d) t h + 2 t V)                    (embeddings, last states, both models' logits)

Teacher fine-tuning (sdpa attention, no maps kept):

    Le * b * s * ((8 + 2d) h + 2f) + Ld * b * (t * ((12 + 3d) h + 2f) + 2 s h) + b * ((2 + d) (s + t) h + t V)

The coefficients are counts of the tensors autograd saves (`saved_tensor_bytes`: each storage once, through
`torch.autograd.graph.saved_tensors_hooks`) in a real training forward of this project's modules
(`DQStudentModule._step` with recipe dq-bart at 2-2-8; a Hugging Face BART under label-smoothed cross-entropy),
read off at several depths (6-6, 6-3, 3-3 of bart-base; 4-4, 4-2, 4-1, 2-2, 1-1 of a micro model) with and
without dropout; `tests/test_memory.py` recounts them at other shapes. Left out: per-token scalars (layer-norm
statistics, about 0.5% at d_model 32, less at 768).
Each element is 4 bytes in float32 (`32-true`); under `bf16-mixed` 2 bytes, but 4 for attention probabilities
(autocast computes softmax in float32; the teacher's maps are float32). The bfloat16 figures are not measured
here (no GPU, no bfloat16 CPU); the float32 ones, an upper bound for them, are checked on CPU by
`benchmarks/rehearsal.py` against each process's peak resident set. A 32-32-32 student saves fewer tensors
(no quantized copies): its estimate is an upper bound.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch

from dq_lightning.errors import command_line
from dq_lightning.models.presets import build_config
from dq_lightning.quant.config import FULL_PRECISION, parse_depth, parse_wea

GIB = 2**30
MIB = 2**20
GPU_RUNTIME_BYTES = 1 * GIB  # CUDA context, cuBLAS workspaces, NCCL buffers
GPU_FRAGMENTATION = 0.10  # the caching allocator's reserved-but-unused share
CARDS_GB = (40, 80)  # A100 40 GB and 80 GB: 40e9 and 80e9 bytes, of which CUDA reports ~39.4 and ~79.2 GiB usable


@dataclass
class Estimate:
    """Bytes per process, by part."""

    parts: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # parameter counts behind the parts

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def total_mib(self) -> float:
        return self.total / MIB

    def as_dict(self) -> dict:
        return {"parts_mib": {k: v / MIB for k, v in self.parts.items()}, "counts": dict(self.counts),
                "total_mib": self.total_mib}


def _with_depth(config, depth: str | None):
    config = config.__class__.from_dict(config.to_dict())
    if depth:
        config.encoder_layers, config.decoder_layers = parse_depth(depth)
    return config


def parameter_counts(config, depth: str | None = None) -> dict[str, int]:
    """Parameters of the model `config` describes at `depth` (tied embedding once) and of its Linear weights,
    counted on the meta device (no memory)."""
    from transformers import AutoModelForSeq2SeqLM

    with torch.device("meta"):
        model = AutoModelForSeq2SeqLM.from_config(_with_depth(config, depth))
    parameters = {id(p): p.numel() for p in model.parameters()}
    lm_head = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules()
                 if isinstance(m, torch.nn.Linear) and m is not lm_head)
    return {"parameters": sum(parameters.values()), "linear_weights": linear}


def _activation_bytes(precision: str) -> tuple[int, int]:
    """(bytes of an activation, bytes of an attention probability) under `precision`."""
    if precision in ("32-true", "32", "fp32"):
        return 4, 4
    if precision in ("bf16-mixed", "16-mixed"):
        return 2, 4
    raise ValueError(f"precision {precision!r}: the estimate knows 32-true, bf16-mixed and 16-mixed")


def _runtime(device: str, runtime_bytes: int | None) -> int:
    if runtime_bytes is not None:
        return runtime_bytes
    return GPU_RUNTIME_BYTES if device == "cuda" else 0


def _training_state(estimate: Estimate, trainable: int, devices: int) -> None:
    estimate.parts["gradients"] = 4 * trainable
    estimate.parts["adamw_moments"] = 8 * trainable
    if devices > 1:
        estimate.parts["ddp_buckets"] = 4 * trainable


def _finish(estimate: Estimate, device: str, runtime_bytes: int | None) -> Estimate:
    estimate.parts["runtime"] = _runtime(device, runtime_bytes)
    if device == "cuda":
        estimate.parts["fragmentation"] = int(GPU_FRAGMENTATION * estimate.total)
    return estimate


def estimate_dq(config, depth: str | None, bits: str, batch_size: int, source_length: int, target_length: int,
                precision: str = "bf16-mixed", devices: int = 1, device: str = "cuda",
                runtime_bytes: int | None = None) -> Estimate:
    """One process of a DQ student's fit: teacher `config` (its depth), student at `depth` and `bits`."""
    student = _with_depth(config, depth)
    b, s, t = batch_size, source_length, target_length
    h, f, a, vocab = student.d_model, student.encoder_ffn_dim, student.encoder_attention_heads, student.vocab_size
    le, ld = student.encoder_layers, student.decoder_layers
    element, probability = _activation_bytes(precision)
    teacher_counts, student_counts = parameter_counts(config), parameter_counts(config, depth)
    estimate = Estimate(counts={"teacher_parameters": teacher_counts["parameters"],
                                "student_parameters": student_counts["parameters"],
                                "student_linear_weights": student_counts["linear_weights"]})
    estimate.parts["teacher_weights"] = 4 * teacher_counts["parameters"]
    estimate.parts["student_weights"] = 4 * student_counts["parameters"]
    _training_state(estimate, student_counts["parameters"], devices)
    if parse_wea(bits)[0] < FULL_PRECISION:
        # autocast's bfloat16 copy of each quantized weight is saved beside the float32 one
        estimate.parts["quantized_weights"] = (4 + (element if element < 4 else 0)) * student_counts["linear_weights"]
    d = int(student.dropout > 0)  # a dropout mask is saved per dropout
    maps = le * 3 * a * s * s + ld * (3 * a * t * s + 3 * a * t * t)
    rest = (le * s * ((17 + 2 * d) * h + 3 * f) + ld * (t * ((24 + 3 * d) * h + 3 * f) + 6 * s * h)
            + (5 + d) * s * h + (4 + d) * t * h + 2 * t * vocab)
    estimate.parts["activations"] = b * (element * rest + probability * maps)
    estimate.parts["logits_gradient"] = 4 * b * t * vocab
    return _finish(estimate, device, runtime_bytes)


def estimate_teacher(config, batch_size: int, source_length: int, target_length: int,
                     precision: str = "bf16-mixed", devices: int = 1, device: str = "cuda",
                     runtime_bytes: int | None = None) -> Estimate:
    """One process of a teacher's fine-tuning (sdpa attention, label-smoothed cross-entropy)."""
    b, s, t = batch_size, source_length, target_length
    h, f, vocab = config.d_model, config.encoder_ffn_dim, config.vocab_size
    le, ld = config.encoder_layers, config.decoder_layers
    element, _ = _activation_bytes(precision)
    counts = parameter_counts(config)
    estimate = Estimate(counts={"teacher_parameters": counts["parameters"]})
    estimate.parts["teacher_weights"] = 4 * counts["parameters"]
    _training_state(estimate, counts["parameters"], devices)
    d = int(config.dropout > 0)  # a dropout mask is saved per dropout
    rest = (le * s * ((8 + 2 * d) * h + 2 * f) + ld * (t * ((12 + 3 * d) * h + 2 * f) + 2 * s * h)
            + (2 + d) * (s + t) * h + t * vocab)
    estimate.parts["activations"] = element * b * rest
    estimate.parts["logits_gradient"] = 4 * b * t * vocab
    return _finish(estimate, device, runtime_bytes)


def saved_tensor_bytes(forward, exclude=()) -> dict[str, int]:
    """Bytes of the tensors autograd saves for the backward pass while `forward()` runs, each storage once,
    leaving out the storages of the tensors in `exclude` (parameters): what the activation formulas count.
    Split into `weight_copies` (the shape of a tensor in `exclude`: fake-quantized weights) and `activations`."""
    excluded = {tensor.untyped_storage().data_ptr() for tensor in exclude}
    shapes = {tuple(tensor.shape) for tensor in exclude}
    seen: dict[int, tuple[int, tuple]] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            seen.setdefault(storage.data_ptr(), (storage.nbytes(), tuple(tensor.shape)))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    counted = {"weight_copies": 0, "activations": 0}
    for nbytes, shape in seen.values():
        counted["weight_copies" if shape in shapes else "activations"] += nbytes
    return counted


# -- the table of the paper configs --------------------------------------------------------------------------
# The paper configs' settings (experiments/<task>/teacher-paper.yaml, dq-paper.yaml): lengths 1024 / 128, 4 per
# device on 4 GPUs (8 per device on 1-2 GPUs keeps 16 a step with less accumulation), bf16-mixed, DQ at 2-2-8.
# Depths: the teacher's, and half its decoder (sweeps/<task>.yaml's 6-6 and 6-3 for bart-base).
PAPER_DEPTHS = {"bart-base": ["6-6", "6-3"], "bart-large": ["12-12", "12-6"], "mbart-large-cc25": ["12-12", "12-6"]}


def paper_rows(presets: list[str], batch_sizes: list[int], source_length: int, target_length: int, devices: int,
               bits: str) -> list[dict]:
    rows = []
    for preset in presets:
        config = build_config(preset)
        for batch in batch_sizes:
            common = dict(batch_size=batch, source_length=source_length, target_length=target_length, devices=devices)
            teacher = {p: estimate_teacher(config, precision=p, **common) for p in ("bf16-mixed", "32-true")}
            rows.append({"preset": preset, "config": "teacher-paper", "depth": f"{config.encoder_layers}-"
                         f"{config.decoder_layers}", "batch": batch, "bf16": teacher["bf16-mixed"],
                         "fp32": teacher["32-true"]})
            for depth in PAPER_DEPTHS.get(preset, [f"{config.encoder_layers}-{config.decoder_layers}"]):
                dq = {p: estimate_dq(config, depth, bits, precision=p, **common) for p in ("bf16-mixed", "32-true")}
                rows.append({"preset": preset, "config": f"dq-paper {bits}", "depth": depth, "batch": batch,
                             "bf16": dq["bf16-mixed"], "fp32": dq["32-true"]})
    return rows


def fits(estimate: Estimate, card_gb: int) -> bool:
    # An A100's usable memory: its nominal GB less what CUDA keeps (~0.6 GiB): 39.4 / 79.2 GiB.
    return estimate.total <= card_gb * 1e9 - 0.6 * GIB


def table(rows: list[dict]) -> str:
    header = (f"{'model':<11}{'config':<16}{'depth':>6}{'batch':>6}{'bf16-mixed GiB':>15}{'of which act.':>14}"
              f"{'32-true GiB':>12}" + "".join(f"{f'{card} GB':>8}" for card in CARDS_GB))
    lines = [header]
    for row in rows:
        verdict = []
        for card in CARDS_GB:
            verdict.append("yes" if fits(row["fp32"], card) else "bf16" if fits(row["bf16"], card) else "no")
        lines.append(f"{row['preset']:<11}{row['config']:<16}{row['depth']:>6}{row['batch']:>6}"
                     f"{row['bf16'].total / GIB:>15.1f}{row['bf16'].parts['activations'] / GIB:>14.1f}"
                     f"{row['fp32'].total / GIB:>12.1f}" + "".join(f"{v:>8}" for v in verdict))
    lines += ["", "per process (one GPU), worst batch (every sequence at full length); a card column says yes if even "
              "the float32 upper bound fits, bf16 if only the bf16-mixed estimate does, no if neither"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dq_lightning memory",
                                     description="Estimated memory per GPU of the paper configs' fits (teacher "
                                                 "fine-tuning and DQ student), from the models' shapes.")
    parser.add_argument("--preset", nargs="+", default=["bart-base", "bart-large"], metavar="NAME",
                        help="model presets (default bart-base bart-large)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[4, 8], metavar="N",
                        help="per-device batches (default 4 8: the configs' 4 on 4 GPUs, 8 on 1-2)")
    parser.add_argument("--source-length", type=int, default=1024, metavar="N", help="default 1024")
    parser.add_argument("--target-length", type=int, default=128, metavar="N", help="default 128")
    parser.add_argument("--devices", type=int, default=4, metavar="N",
                        help="DDP processes (default 4; above 1 adds DDP's gradient buckets)")
    parser.add_argument("--bits", default="2-2-8", metavar="W-E-A", help="the DQ students' bits (default 2-2-8)")
    return parser


@command_line
def main(argv: list[str]) -> int:
    from dq_lightning.models.presets import get_preset

    args = build_parser().parse_args(argv)
    for preset in args.preset:
        get_preset(preset)  # an unknown name: one error line naming the choices
    parse_wea(args.bits)
    print(table(paper_rows(args.preset, args.batch_size, args.source_length, args.target_length, args.devices,
                           args.bits)))
    return 0
