"""Model size and compression ratio of a quantized, layer-reduced student: `model_size` and
`python -m dq_lightning size`.

Sizes come from tensor shapes alone: a config is built on the meta device (no memory, no weights), and a
student with fewer layers keeps the first N of each stack (all layers of a stack have the same shapes).
Activations are not stored, so `a_bits` appears in the W-E-A name but never in a size.

Two conventions:

`paper` reproduces DQ-BART's numbers (16.5x for bart-base at 2-2-8 with 6 encoder / 3 decoder layers,
27.7x with 1 / 1). Every parameter of a quantized module is counted at that module's width: Linear weights
*and their biases* at W bits, the token embedding at E bits, counted once although BART ties it to the LM
head; positional embeddings and LayerNorms at 32 bits; no scales, no buffers. The teacher is every
parameter at 32 bits, the tied embedding once. For bart-base (139,420,416 parameters = 531.85 MiB):

    6-3:  (70,778,880 weights + 71,424 biases) x 2 + 38,603,520 embedding x 2
          + (1,575,936 positions + 35,328 LayerNorm) x 32 = 270,468,096 bits = 32.24 MiB -> 16.495x
    1-1:  (16,515,072 + 16,896) x 2 + 38,603,520 x 2 + (1,575,936 + 10,752) x 32
          = 161,040,576 bits = 19.20 MiB -> 27.703x

Counting the biases at 32 bits instead gives 16.37x and 27.62x; the positions at E bits, 19.8x; the LM head
a second time in the teacher, 20.9x. Units cancel in the ratio.

`strict` is what a packed file really holds: codes at their width (a ternary value takes 2 bits, a binary one
1), one FP32 scale per row (or per tensor) of every quantized matrix, learned activation steps (LSQ, elastic), biases, LayerNorms and
positions at 32 bits, and the `final_logits_bias` buffer, in both the student and the teacher.

Sizes are reported in MiB (2^20 bytes).
"""

from __future__ import annotations

import argparse
import copy
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dq_lightning.errors import UserError, command_line
from dq_lightning.quant.api import is_converted, quant_config_of, token_embedding_weight
from dq_lightning.quant.config import ELASTIC_MAX_BITS, FULL_PRECISION, QuantConfig, parse_wea
from dq_lightning.quant.quantizers import FakeQuantizer

CONVENTIONS = ("paper", "strict")
MIB = 2**20
SCALE_BITS = 32  # scales and learned steps are stored as FP32


@dataclass(frozen=True)
class TensorGroup:
    """Tensors stored alike: `params` values at `bits` each, plus `overhead_bits` (scales)."""

    name: str
    params: int
    bits: int
    overhead_bits: int = 0

    @property
    def size_bits(self) -> int:
        return self.params * self.bits + self.overhead_bits

    @property
    def size_mb(self) -> float:
        return self.size_bits / 8 / MIB


@dataclass(frozen=True)
class SizeReport:
    """Size of a student and of its FP32 teacher under one convention."""

    model: str
    notation: str
    encoder_layers: int
    decoder_layers: int
    teacher_encoder_layers: int
    teacher_decoder_layers: int
    convention: str
    groups: tuple[TensorGroup, ...]
    teacher_params: int
    teacher_bits: int

    @property
    def size_bits(self) -> int:
        return sum(g.size_bits for g in self.groups)

    @property
    def size_mb(self) -> float:
        return self.size_bits / 8 / MIB

    @property
    def teacher_mb(self) -> float:
        return self.teacher_bits / 8 / MIB

    @property
    def compression(self) -> float:
        """How many times smaller than the FP32 full-depth teacher."""
        return self.teacher_bits / self.size_bits

    @property
    def params(self) -> int:
        return sum(g.params for g in self.groups)


# -- counting tensors -----------------------------------------------------------------------------------------
@dataclass
class _Counts:
    params: int = 0
    rows: int = 0
    tensors: int = 0

    def add(self, tensor: torch.Tensor) -> None:
        self.params += tensor.numel()
        self.rows += tensor.shape[0] if tensor.dim() > 1 else 1
        self.tensors += 1


_LAYER = re.compile(r"(?:^|\.)(encoder|decoder)\.layers\.(\d+)\.")


def _count(model: nn.Module, encoder_layers: int, decoder_layers: int) -> tuple[dict[str, _Counts], int, int]:
    """Parameters by kind for a model keeping the first `encoder_layers`/`decoder_layers` layers; also the
    number of kept Linear modules besides the LM head and of attention modules (for per-module quantizer
    state)."""
    keep = {"encoder": encoder_layers, "decoder": decoder_layers}

    def kept(name: str) -> bool:
        match = _LAYER.search(name)
        return match is None or int(match.group(2)) < keep[match.group(1)]

    token = token_embedding_weight(model)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    counts: dict[str, _Counts] = {}
    seen: set[int] = set()
    linears = attentions = 0
    for name, module in model.named_modules():
        # A prepared model's quantizers (LSQ steps) are not weights; the strict convention counts scales.
        if not kept(name + ".") or isinstance(module, FakeQuantizer):
            continue
        if isinstance(module, nn.Linear) and module is not output:
            linears += 1
        if all(hasattr(module, p) for p in ("q_proj", "k_proj", "v_proj")):
            attentions += 1
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:  # tied: the embedding and the LM head are one tensor
                continue
            seen.add(id(param))
            kind = _kind(module, param_name, param, token, output)
            counts.setdefault(kind, _Counts()).add(param)
        for buffer_name, buffer in module.named_buffers(recurse=False):
            if buffer_name not in module._non_persistent_buffers_set and buffer.is_floating_point():
                counts.setdefault("buffers", _Counts()).add(buffer)
    return counts, linears, attentions


def _kind(module: nn.Module, param_name: str, param: torch.Tensor, token, output) -> str:
    if param is token:
        return "token embedding"
    if isinstance(module, nn.Linear):
        if module is output:
            return "lm head"
        return "linear weights" if param_name == "weight" else "linear biases"
    if isinstance(module, nn.Embedding):
        return "positional embeddings"
    if isinstance(module, nn.LayerNorm):
        return "layernorm"
    return "other"


def _stack_depths(model: nn.Module) -> tuple[int, int]:
    depth = {"encoder": 0, "decoder": 0}
    for name, _ in model.named_modules():
        match = _LAYER.search(name + ".")
        if match:
            depth[match.group(1)] = max(depth[match.group(1)], int(match.group(2)) + 1)
    return depth["encoder"], depth["decoder"]


# -- conventions --------------------------------------------------------------------------------------------
_ORDER = ("linear weights", "linear biases", "token embedding", "lm head", "positional embeddings", "layernorm",
          "other", "buffers")


def _student_groups(counts: dict[str, _Counts], quant: QuantConfig, convention: str, linears: int,
                    attentions: int) -> tuple[TensorGroup, ...]:
    w, e = quant.w_bits, quant.e_bits
    if convention == "paper":
        bits = {"linear weights": w, "linear biases": w, "token embedding": e, "lm head": e}
        return tuple(TensorGroup(kind, counts[kind].params, bits.get(kind, FULL_PRECISION))
                     for kind in _ORDER if kind in counts and kind != "buffers")
    quantized = {"linear weights": w, "token embedding": e, "lm head": e}
    groups = []
    for kind in _ORDER:
        if kind not in counts:
            continue
        c = counts[kind]
        bits = quantized.get(kind, FULL_PRECISION)
        scales = 0
        if bits < FULL_PRECISION:
            granularity = quant.weight_granularity if kind == "linear weights" else quant.embedding_granularity
            scales = c.rows if granularity == "row" else c.tensors
        groups.append(TensorGroup(kind, c.params, bits, scales * SCALE_BITS))
    steps = _learned_steps(quant, linears, attentions)
    if steps:
        groups.append(TensorGroup("activation steps", steps, SCALE_BITS))
    return tuple(groups)


def _learned_steps(quant: QuantConfig, linears: int, attentions: int) -> int:
    """Learned activation steps a student stores: one per quantized Linear input (the LM head's input only when
    the head is quantized) and one per attention operand (query, key, value, probabilities) where those follow
    the activation quantizer ("asym_probs", "tbt"; "dq-bart" ones are always min-max)."""
    learned = quant.act_method == "lsq" or (quant.act_method == "elastic" and quant.a_bits <= ELASTIC_MAX_BITS)
    if quant.a_bits >= FULL_PRECISION or not learned:
        return 0
    inputs = linears + (1 if quant.quantize_lm_head else 0)
    operands = 4 * attentions if quant.quantizes_attention and quant.attention_quant in ("asym_probs", "tbt") else 0
    return inputs + operands


def _teacher_bits(counts: dict[str, _Counts], convention: str) -> tuple[int, int]:
    params = sum(c.params for kind, c in counts.items() if kind != "buffers")
    stored = params + (counts["buffers"].params if convention == "strict" and "buffers" in counts else 0)
    return params, stored * FULL_PRECISION


# -- public API --------------------------------------------------------------------------------------------
def model_size(source, quant: QuantConfig | str | None = None, *, encoder_layers: int | None = None,
               decoder_layers: int | None = None, convention: str = "paper", teacher=None,
               name: str | None = None) -> SizeReport:
    """Size of `source` quantized as `quant` and cut to `encoder_layers`/`decoder_layers` layers, against the
    FP32 teacher.

    Args:
        source: a transformers config (shapes only) or model (prepared or not).
        quant: a `QuantConfig` or a W-E-A string like "2-2-8"; None takes the config a prepared model was
            prepared with, else full precision.
        encoder_layers, decoder_layers: student depth; None keeps the source's own.
        convention: "paper" (DQ-BART's accounting) or "strict" (what a packed file holds); see the module
            docstring.
        teacher: config or model of the FP32 teacher; None means `source` at its own full depth. Pass the
            teacher when `source` is an already layer-reduced student.
        name: how the model is named in the report.
    """
    if convention not in CONVENTIONS:
        raise UserError(f"convention={convention!r} is not supported; choose from {', '.join(CONVENTIONS)}")
    if quant is None:
        quant = quant_config_of(source) if isinstance(source, nn.Module) else None
        quant = quant or QuantConfig(w_bits=32, e_bits=32, a_bits=32)
    elif isinstance(quant, str):
        quant = QuantConfig.from_notation(quant)
    structure = _structure(source)
    full_encoder, full_decoder = _stack_depths(structure)
    encoder_layers = _depth("encoder_layers", encoder_layers, full_encoder)
    decoder_layers = _depth("decoder_layers", decoder_layers, full_decoder)
    counts, linears, attentions = _count(structure, encoder_layers, decoder_layers)
    if teacher is None:
        teacher_structure, teacher_depths = structure, (full_encoder, full_decoder)
    else:
        teacher_structure = _structure(teacher)
        teacher_depths = _stack_depths(teacher_structure)
    teacher_counts = _count(teacher_structure, *teacher_depths)[0]
    teacher_params, teacher_bits = _teacher_bits(teacher_counts, convention)
    return SizeReport(
        model=name or type(structure).__name__, notation=quant.notation,
        encoder_layers=encoder_layers, decoder_layers=decoder_layers,
        teacher_encoder_layers=teacher_depths[0], teacher_decoder_layers=teacher_depths[1],
        convention=convention, groups=_student_groups(counts, quant, convention, linears, attentions),
        teacher_params=teacher_params, teacher_bits=teacher_bits)


def _depth(flag: str, value: int | None, full: int) -> int:
    if value is None:
        return full
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= full:
        raise UserError(f"{flag}={value!r} must be between 1 and the model's {full} layers "
                        "(a student keeps a subset of the teacher's layers)")
    return value


def _structure(source) -> nn.Module:
    """A module with the source's tensor shapes: the model itself, or one built on the meta device."""
    if isinstance(source, nn.Module):
        if not is_converted(source):
            return source
        source = source.config  # converted modules hold codes, not the original layout
    if not hasattr(source, "to_dict"):
        raise TypeError(f"model_size needs a transformers config or model, got {type(source).__name__}")
    from transformers import AutoModelForSeq2SeqLM

    config = copy.deepcopy(source)
    with torch.device("meta"):
        try:
            return AutoModelForSeq2SeqLM.from_config(config)
        except ValueError as error:
            raise UserError(f"cannot build a seq2seq model from this config ({str(error).splitlines()[0]})") \
                from None


# -- command line ------------------------------------------------------------------------------------------
def format_reports(reports: list[SizeReport]) -> str:
    """A table with one (bits, MiB) column pair per convention."""
    first = reports[0]
    header = (f"{first.model}  W-E-A {first.notation}  {first.encoder_layers} encoder / {first.decoder_layers} "
              f"decoder layers  (teacher: FP32, {first.teacher_encoder_layers} / {first.teacher_decoder_layers})")
    names = []
    for report in reports:
        names += [g.name for g in report.groups if g.name not in names]
    rows = [["tensor group", "params"] + [c for r in reports for c in (f"{r.convention} bits", "MiB")]]
    for group_name in names:
        by_report = [next((g for g in r.groups if g.name == group_name), None) for r in reports]
        params = next(g.params for g in by_report if g is not None)
        row = [group_name, f"{params:,}"]
        for g in by_report:
            row += ["-", "-"] if g is None else [str(g.bits), f"{g.params * g.bits / 8 / MIB:.3f}"]
        rows.append(row)
        if any(g is not None and g.overhead_bits for g in by_report):
            row = ["  + scales", ""]
            for g in by_report:
                row += ["-", "-"] if g is None or not g.overhead_bits else \
                    [str(SCALE_BITS), f"{g.overhead_bits / 8 / MIB:.3f}"]
            rows.append(row)
    rows.append(["total", f"{first.params:,}"] + [c for r in reports for c in ("", f"{r.size_mb:.3f}")])
    rows.append(["FP32 teacher", f"{first.teacher_params:,}"]
                + [c for r in reports for c in ("32", f"{r.teacher_mb:.3f}")])
    rows.append(["compression", ""] + [c for r in reports for c in ("", f"{r.compression:.1f}x")])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [header, ""]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))).rstrip())
    lines += ["", "paper: DQ-BART's accounting (biases at W bits, no scales); strict: what a packed file holds "
              "(FP32 scales, biases and buffers)"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dq_lightning size",
        description="Size in MiB and compression ratio against the FP32 teacher of a quantized, "
                    "layer-reduced BART/mBART, from its architecture alone (no weights are read).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-preset", metavar="NAME", help="a dq_lightning preset, e.g. bart-base")
    source.add_argument("--model", metavar="DIR", help="a local Hugging Face model directory (its config.json)")
    parser.add_argument("--bits", metavar="W-E-A", help="the paper's notation, e.g. 2-2-8 (instead of the "
                        "three flags below)")
    for flag, what in (("w", "Linear weights"), ("e", "token embedding"), ("a", "activations")):
        parser.add_argument(f"--{flag}-bits", type=int, metavar="N", help=f"bits of the {what}: 1, 2, 3, 4, 8 "
                            "or 32 (default 32)")
    parser.add_argument("--encoder-layers", type=int, metavar="N", help="student encoder layers "
                        "(default: all)")
    parser.add_argument("--decoder-layers", type=int, metavar="N", help="student decoder layers "
                        "(default: all)")
    from dq_lightning.distill.recipe import RECIPES

    parser.add_argument("--recipe", choices=RECIPES, default="dq-bart",
                        help="the recipe whose scale granularity the strict convention counts (default dq-bart: "
                             "one scale per Linear weight, one per embedding row)")
    parser.add_argument("--weight-granularity", choices=("row", "tensor"), default=None,
                        help="Linear weight scales per row or per tensor (strict convention only; default: the "
                             "recipe's)")
    parser.add_argument("--convention", choices=(*CONVENTIONS, "both"), default="both",
                        help="which accounting to print (default both)")
    return parser


def _bits_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[int, int, int]:
    flags = (args.w_bits, args.e_bits, args.a_bits)
    if args.bits is not None:
        if any(f is not None for f in flags):
            parser.error("argument --bits: not allowed with --w-bits/--e-bits/--a-bits")
        try:
            return parse_wea(args.bits)
        except UserError as error:
            parser.error(f"argument --bits: {error}")
    return tuple(FULL_PRECISION if f is None else f for f in flags)  # type: ignore[return-value]


def _config_from_args(args: argparse.Namespace):
    if args.model_preset is not None:
        from dq_lightning.models.presets import build_config

        return build_config(args.model_preset), args.model_preset
    path = Path(args.model).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"--model {args.model}: no config.json there (not a Hugging Face model directory)")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True), path.name
    except (OSError, ValueError) as error:
        raise UserError(f"--model {args.model}: cannot read config.json ({str(error).splitlines()[0]})") from None


@command_line
def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    w_bits, e_bits, a_bits = _bits_from_args(args, parser)
    from dq_lightning.distill.recipe import recipe_quant_config  # the recipe table sits above this module

    try:
        granularity = {} if args.weight_granularity is None else {"weight_granularity": args.weight_granularity}
        quant = recipe_quant_config(args.recipe, (w_bits, e_bits, a_bits), **granularity)
        config, name = _config_from_args(args)
        conventions = CONVENTIONS if args.convention == "both" else (args.convention,)
        reports = [model_size(config, quant, encoder_layers=args.encoder_layers, decoder_layers=args.decoder_layers,
                              convention=c, name=name) for c in conventions]
    except UserError as error:  # the library names its fields; this tool's user typed flags
        message = str(error)
        for field, flag in (("w_bits", "--w-bits"), ("e_bits", "--e-bits"), ("a_bits", "--a-bits"),
                            ("encoder_layers", "--encoder-layers"), ("decoder_layers", "--decoder-layers")):
            message = message.replace(f"{field}=", f"{flag} ")
        raise UserError(message) from None
    print(format_reports(reports))
    return 0
