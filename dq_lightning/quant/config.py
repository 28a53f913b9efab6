"""What to quantize and how: `QuantConfig` and the paper's W-E-A notation.

DQ-BART names a setting by three bit widths, weights-embeddings-activations: "8-8-8", "2-8-8", "2-2-8".
Here each of the three is independent and may be 1, 2, 3, 4 or 8 bits, or 32 for full precision. One bit is a
binary weight or embedding (a sign times a scale, TBT and BWN) and, with the learned-step activation quantizer
of recipe tbt only, a binary activation.

The field defaults are what the official code (amazon-science/dq-bart, `quant/utils_quant.py` and
`quant/modeling_bart_quant.py`) does; the recipes that set other values are `dq_lightning.distill.recipe`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, get_args

from dq_lightning.errors import UserError

SUPPORTED_BITS = (1, 2, 3, 4, 8, 32)
FULL_PRECISION = 32
# The choices as types, so that the command line's --help lists them; the tuples are for checks and messages.
WeightMethod = Literal["auto", "tbt", "minmax", "ternary", "tbt_ternary", "binary", "lsq"]
ActMethod = Literal["minmax", "asym_minmax", "lsq", "elastic"]
Granularity = Literal["row", "tensor"]
AttentionQuant = Literal["off", "dq-bart", "asym_probs", "tbt"]
# Weight methods whose grid is computed from the weight's statistics at every step, by width: "auto" is
# DQ-BART's (TWN at 2 bits), "tbt" TBT's (its own ternary at 2 bits); both are binary at 1 bit.
_AUTO_METHODS = {"auto": {1: "binary", 2: "ternary"}, "tbt": {1: "binary", 2: "tbt_ternary"}}
# The only width each of these methods quantizes to (besides 32, full precision).
_FIXED_WIDTH = {"ternary": 2, "tbt_ternary": 2, "binary": 1}
# The elastic activation quantizer learns its step at this many bits or fewer and is min-max above (TBT's code
# learns it at 2 bits or fewer and uses min-max at 8, quant/utils_quant.py:360-373).
ELASTIC_MAX_BITS = 4
WEIGHT_METHODS = get_args(WeightMethod)
ACT_METHODS = get_args(ActMethod)
GRANULARITIES = get_args(Granularity)
ATTENTION_QUANT = get_args(AttentionQuant)


def parse_wea(notation: str) -> tuple[int, int, int]:
    """`"2-2-8"` -> `(2, 2, 8)`: weight, embedding and activation bits, each checked against the supported set."""
    parts = str(notation).strip().split("-")
    try:
        if len(parts) != 3:
            raise ValueError
        bits = tuple(int(p) for p in parts)
    except ValueError:
        raise UserError(f"bits {notation!r} is not a W-E-A setting like '2-2-8' "
                        "(weight-embedding-activation bit widths)") from None
    for name, value in zip(("w_bits", "e_bits", "a_bits"), bits):
        _check_bits(name, value)
    return bits  # type: ignore[return-value]


def parse_depth(depth: str) -> tuple[int, int]:
    """`"6-3"` -> (6 encoder layers, 3 decoder layers): the student's depth, named beside its bits."""
    try:
        encoder, decoder = (int(part) for part in str(depth).split("-"))
    except ValueError:
        raise UserError(f"model.depth={depth!r} is not 'encoder-decoder' layers like '6-3'") from None
    return encoder, decoder


def _check_bits(name: str, value: int) -> None:
    # One bit is accepted here; whether the chosen quantizer can take it is QuantConfig's check.
    if isinstance(value, bool) or not isinstance(value, int) or value not in SUPPORTED_BITS:
        raise UserError(f"{name}={value!r} is not supported; choose from {', '.join(map(str, SUPPORTED_BITS))}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{name}={value!r} is not supported; choose from {', '.join(choices)}")


def _check_clip(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise UserError(f"{name}={value!r} must be a positive number, or None for no clipping")


@dataclass(frozen=True)
class QuantConfig:
    """How the student is quantized. The field defaults are the official DQ-BART recipe at 8-8-8.

    Weights, the token embedding and activations each have their own width, so the paper's settings are
    `QuantConfig(w_bits=2, e_bits=2, a_bits=8)` or `QuantConfig.from_notation("2-2-8")`; another recipe's are
    `dq_lightning.distill.recipe.recipe_quant_config("dq_lightning", "2-2-8")`.

    Always full precision: positional embeddings, LayerNorm parameters and biases. Together they are 1.2% of
    bart-base's parameters; the paper keeps them in FP32 and so does this library (no switch is offered,
    because quantizing a LayerNorm gain or a bias saves almost nothing and costs accuracy).
    """

    w_bits: int = 8
    """Bits of every Linear weight in the attention (self and cross) and feed-forward blocks: 1 (binary), 2, 3,
    4, 8, or 32 for full precision."""

    e_bits: int = 8
    """Bits of the token embedding matrix (tied to the LM head in BART). 1, 2, 3, 4, 8, or 32. The official code
    quantizes the embedding at the weight width; here it has its own, so "2-8-8" is expressible."""

    a_bits: int = 8
    """Bits of the activations entering every quantized Linear and, with `attention_quant`, of the attention
    operands. 2, 3, 4, 8, or 32; 1 with `act_method="elastic"` only."""

    weight_method: WeightMethod = "auto"
    """Weight quantizer: "minmax" (symmetric uniform), "ternary" (TWN, 2 bits only), "tbt_ternary" (TBT's:
    scale 4/3 of the group's mean |w|, codes round(clamp(w / scale, -1, 1)); 2 bits only), "binary" (sign times
    the group's mean |w|; 1 bit only), "lsq" (learned step size), "auto" (binary at 1 bit, ternary at 2,
    minmax otherwise, as in DQ-BART) or "tbt" (binary at 1 bit, tbt_ternary at 2, minmax otherwise)."""

    embedding_method: WeightMethod = "auto"
    """Quantizer of the token embedding, with the same choices as `weight_method`."""

    act_method: ActMethod = "minmax"
    """Activation quantizer: "minmax" (symmetric, the official choice), "asym_minmax" (min-max with a
    zero point, for inputs that are mostly one-signed), "lsq" (learned step size) or "elastic" (TBT's learned
    step size at 4 bits or fewer: codes in [-1, 1] at 2 bits, [-2^(b-1), 2^(b-1) - 1] at 3-4, the sign at 1;
    its unsigned variant, see `unsigned_ffn_attn`, is shifted by the tensor's minimum; min-max at 8 bits)."""

    weight_granularity: Granularity = "tensor"
    """Linear weights: "tensor", one scale per matrix (official: `layerwise=True`), or "row", one scale per
    output row (recipe dq_lightning; much finer at 2 bits)."""

    embedding_granularity: Granularity = "row"
    """Token embedding (and a quantized LM head): "row", one scale per token (official), or "tensor"."""

    act_granularity: Granularity = "tensor"
    """"tensor": one dynamic scale per activation tensor (official); "row": one per token."""

    weight_clip: float | None = 2.5
    """Linear weights and the embedding are clipped to [-weight_clip, weight_clip] before quantization and get
    no gradient outside. Official: 2.5. None (recipe dq_lightning) uses each group's own min-max range: BART's
    weights are small (std 0.02 at initialisation), far inside 2.5, so the clip rarely binds. LSQ learns its
    range and ignores this."""

    act_clip: float | None = 2.5
    """Activations are clipped to [-act_clip, act_clip] before quantization, and get no gradient outside.
    Official: 2.5. With one dynamic scale per tensor, a few outlier features would otherwise coarsen the grid
    for the whole batch; the clip bounds the step at 2.5 / 127 at 8 bits. None uses the tensor's own range.
    LSQ learns its range and ignores this."""

    unsigned_ffn_attn: bool = False
    """The input of every feed-forward block's second Linear (fc2, after the GELU) and, with `attention_quant`
    "tbt", the attention probabilities take the unsigned variant of the activation quantizer: min-max's is
    asymmetric (asym_minmax), elastic's is shifted by the tensor's minimum with codes in [0, 2] at 2 bits and
    [0, 2^b - 1] otherwise (TBT: `sym_quant_ffn_attn` false). False: the same signed quantizer as every input."""

    quantize_lm_head: bool = False
    """Quantize the LM head: its weight is the tied token embedding at `e_bits` (one latent matrix through one
    grid) and its input is quantized at `a_bits` (recipe dq_lightning). False (official) trains with a plain
    full-precision head on the latent tied weight. The official size accounting still counts the head at
    E bits, so `export` always writes the E-bit tied matrix: a False student is deployed with a head it was
    not trained with (the manifest says so)."""

    attention_quant: AttentionQuant = "dq-bart"
    """Attention operands at `a_bits`: "dq-bart" (official): the query after the 1/sqrt(head_dim) scaling,
    key, value, and the probabilities after dropout, each symmetric per tensor with `act_clip`;
    "asym_probs": query (before the scaling), key and value with the activation quantizer, the
    probabilities asymmetric (grid from 0) before dropout; "tbt": where "dq-bart" quantizes (query after the
    scaling, probabilities after dropout) but with the activation quantizer, the probabilities with its
    unsigned variant when `unsigned_ffn_attn`; "off": not quantized (fastest: SDPA can run). Quantized
    attention runs an eager attention function."""

    def __post_init__(self) -> None:
        for name in ("w_bits", "e_bits", "a_bits"):
            _check_bits(name, getattr(self, name))
        _check_choice("weight_method", self.weight_method, WEIGHT_METHODS)
        _check_choice("embedding_method", self.embedding_method, WEIGHT_METHODS)
        _check_choice("act_method", self.act_method, ACT_METHODS)
        _check_choice("weight_granularity", self.weight_granularity, GRANULARITIES)
        _check_choice("embedding_granularity", self.embedding_granularity, GRANULARITIES)
        _check_choice("act_granularity", self.act_granularity, GRANULARITIES)
        _check_choice("attention_quant", self.attention_quant, ATTENTION_QUANT)
        _check_clip("weight_clip", self.weight_clip)
        _check_clip("act_clip", self.act_clip)
        for name in ("quantize_lm_head", "unsigned_ffn_attn"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name}={getattr(self, name)!r} must be true or false")
        for method_field, bits_field in (("weight_method", "w_bits"), ("embedding_method", "e_bits")):
            _check_weight_width(method_field, getattr(self, method_field), bits_field, getattr(self, bits_field))
        if self.a_bits == 1 and self.act_method != "elastic":
            raise UserError(f"a_bits=1 needs act_method='elastic' (a learned step times the sign, as recipe tbt sets); "
                            f"act_method={self.act_method!r} has no 1-bit grid")
        if self.act_method in ("lsq", "elastic") and self.act_granularity != "tensor":
            raise UserError(f"act_method={self.act_method!r} learns one step per activation tensor; it needs "
                            "act_granularity='tensor'")
        if self.unsigned_ffn_attn and self.act_method == "lsq":
            raise UserError("unsigned_ffn_attn=true needs act_method minmax, asym_minmax or elastic (lsq has no "
                            "unsigned variant)")

    @classmethod
    def from_notation(cls, notation: str, **settings) -> QuantConfig:
        """A config from the paper's "W-E-A" string, e.g. `QuantConfig.from_notation("2-2-8")`, with the
        official defaults; `settings` override single fields."""
        w_bits, e_bits, a_bits = parse_wea(notation)
        return cls(w_bits=w_bits, e_bits=e_bits, a_bits=a_bits, **settings)

    @classmethod
    def dq_bart(cls, w_bits: int = 8, e_bits: int = 8, a_bits: int = 8, **settings) -> QuantConfig:
        """The official DQ-BART quantizers (the field defaults): per-tensor Linear weights and per-row embedding,
        both clipped at 2.5; TWN at 2 bits; symmetric per-tensor activations clipped at 2.5; q (after the
        scaling), k, v and the probabilities (after dropout) quantized; a full-precision LM head."""
        return cls(w_bits=w_bits, e_bits=e_bits, a_bits=a_bits, **settings)

    @property
    def quantizes_attention(self) -> bool:
        return self.attention_quant != "off" and self.a_bits < FULL_PRECISION

    @property
    def learns_steps(self) -> bool:
        """Whether a quantizer of this config has learned step sizes (parameters besides the weights)."""
        return "lsq" in (self.resolved_weight_method, self.resolved_embedding_method) or (
            self.a_bits < FULL_PRECISION and (self.act_method == "lsq" or (
                self.act_method == "elastic" and self.a_bits <= ELASTIC_MAX_BITS)))

    @property
    def notation(self) -> str:
        """The paper's W-E-A name of this setting, e.g. "2-2-8"."""
        return f"{self.w_bits}-{self.e_bits}-{self.a_bits}"

    @property
    def resolved_weight_method(self) -> str:
        return _resolve(self.weight_method, self.w_bits)

    @property
    def resolved_embedding_method(self) -> str:
        return _resolve(self.embedding_method, self.e_bits)

    def to_dict(self) -> dict:
        return asdict(self)


def _resolve(method: str, bits: int) -> str:
    if method in _AUTO_METHODS:
        return _AUTO_METHODS[method].get(bits, "minmax")
    return method


def _check_weight_width(method_field: str, method: str, bits_field: str, bits: int) -> None:
    """A method that quantizes to one width only gets that width; one bit is a sign, which only binary has."""
    if bits == FULL_PRECISION:
        return
    fixed = _FIXED_WIDTH.get(method)
    if fixed is not None and bits != fixed:
        what = "ternary values take 2 bits" if fixed == 2 else "a binary value takes 1 bit"
        raise UserError(f"{method_field}={method!r} needs {bits_field}={fixed} ({what}); got {bits_field}={bits}")
    if bits == 1 and _resolve(method, bits) != "binary":
        raise UserError(f"{bits_field}=1 needs {method_field} binary, auto or tbt (a 1-bit weight is a sign times "
                        f"a scale); {method_field}={method!r} has no 1-bit grid")
