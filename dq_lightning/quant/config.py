"""What to quantize and how: `QuantConfig` and the paper's W-E-A notation.

DQ-BART names a setting by three bit widths, weights-embeddings-activations: "8-8-8", "2-8-8", "2-2-8".
Here each of the three is independent and may be 2, 3, 4 or 8 bits, or 32 for full precision.

The field defaults are what the official code (amazon-science/dq-bart, `quant/utils_quant.py` and
`quant/modeling_bart_quant.py`) does; the recipes that set other values are `dq_lightning.distill.recipe`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, get_args

from dq_lightning.errors import UserError

SUPPORTED_BITS = (2, 3, 4, 8, 32)
FULL_PRECISION = 32
# The choices as types, so that the command line's --help lists them; the tuples are for checks and messages.
WeightMethod = Literal["auto", "minmax", "ternary", "lsq"]
ActMethod = Literal["minmax", "asym_minmax", "lsq"]
Granularity = Literal["row", "tensor"]
AttentionQuant = Literal["off", "dq-bart", "asym_probs"]
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


def _check_bits(name: str, value: int) -> None:
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
    """Bits of every Linear weight in the attention (self and cross) and feed-forward blocks: 2, 3, 4, 8, or
    32 for full precision."""

    e_bits: int = 8
    """Bits of the token embedding matrix (tied to the LM head in BART). 2, 3, 4, 8, or 32. The official code
    quantizes the embedding at the weight width; here it has its own, so "2-8-8" is expressible."""

    a_bits: int = 8
    """Bits of the activations entering every quantized Linear and, with `attention_quant`, of the attention
    operands. 2, 3, 4, 8, or 32."""

    weight_method: WeightMethod = "auto"
    """Weight quantizer: "minmax" (symmetric uniform), "ternary" (TWN, 2 bits only), "lsq" (learned step
    size) or "auto": ternary at 2 bits and minmax otherwise, as in DQ-BART."""

    embedding_method: WeightMethod = "auto"
    """Quantizer of the token embedding, with the same choices as `weight_method`."""

    act_method: ActMethod = "minmax"
    """Activation quantizer: "minmax" (symmetric, the official choice), "asym_minmax" (min-max with a
    zero point, for inputs that are mostly one-signed) or "lsq" (learned step size)."""

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
    probabilities asymmetric (grid from 0) before dropout; "off": not quantized (fastest: SDPA can run).
    Quantized attention runs an eager attention function."""

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
        if not isinstance(self.quantize_lm_head, bool):
            raise UserError(f"quantize_lm_head={self.quantize_lm_head!r} must be true or false")
        for method_field, bits_field in (("weight_method", "w_bits"), ("embedding_method", "e_bits")):
            bits = getattr(self, bits_field)
            if getattr(self, method_field) == "ternary" and bits not in (2, FULL_PRECISION):
                raise UserError(f"{method_field}='ternary' needs {bits_field}=2 (ternary values take 2 bits); "
                                f"got {bits_field}={bits}")
        if self.act_method == "lsq" and self.act_granularity != "tensor":
            raise UserError("act_method='lsq' learns one step per activation tensor; it needs "
                            "act_granularity='tensor'")

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
    if method == "auto":
        return "ternary" if bits == 2 else "minmax"
    return method
