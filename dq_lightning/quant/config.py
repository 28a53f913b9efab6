"""What to quantize and how: `QuantConfig` and the paper's W-E-A notation.

DQ-BART names a setting by three bit widths, weights-embeddings-activations: "8-8-8", "2-8-8", "2-2-8".
Here each of the three is independent and may be 2, 3, 4 or 8 bits, or 32 for full precision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from dq_lightning.errors import UserError

SUPPORTED_BITS = (2, 3, 4, 8, 32)
FULL_PRECISION = 32
WEIGHT_METHODS = ("auto", "minmax", "ternary", "lsq")
ACT_METHODS = ("minmax", "asym_minmax", "lsq")
GRANULARITIES = ("row", "tensor")


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
    """How the student is quantized. The defaults are DQ-BART's recipe at 8-8-8.

    Weights, the token embedding and activations each have their own width, so the paper's settings are
    `QuantConfig(w_bits=2, e_bits=2, a_bits=8)` or `QuantConfig.from_notation("2-2-8")`.

    Always full precision: positional embeddings, LayerNorm parameters and biases. Together they are 1.2% of
    bart-base's parameters; the paper keeps them in FP32 and so does this library (no switch is offered,
    because quantizing a LayerNorm gain or a bias saves almost nothing and costs accuracy).
    """

    w_bits: int = 8
    """Bits of every Linear weight in the attention (self and cross) and feed-forward blocks: 2, 3, 4, 8, or
    32 for full precision."""

    e_bits: int = 8
    """Bits of the token embedding matrix, which BART ties to the output projection (LM head): the LM head
    uses the same E-bit matrix. 2, 3, 4, 8, or 32."""

    a_bits: int = 8
    """Bits of the activations entering every quantized Linear (and, with `quantize_attention_inputs`, the
    attention query, key, value and probabilities). 2, 3, 4, 8, or 32."""

    weight_method: str = "auto"
    """Weight quantizer: "minmax" (symmetric uniform), "ternary" (TWN, 2 bits only), "lsq" (learned step
    size) or "auto": ternary at 2 bits and minmax otherwise, as in DQ-BART."""

    embedding_method: str = "auto"
    """Quantizer of the token embedding, with the same choices as `weight_method`."""

    act_method: str = "minmax"
    """Activation quantizer: "minmax" (symmetric, the reference's choice), "asym_minmax" (min-max with a
    zero point, for inputs that are mostly one-signed) or "lsq" (learned step size)."""

    weight_granularity: str = "row"
    """"row": one scale per output row of a weight and per token of the embedding; "tensor": one scale per
    matrix. Per-row is the paper's default and much more accurate at 2 bits."""

    act_granularity: str = "tensor"
    """"tensor": one dynamic scale per activation tensor (the reference's choice); "row": one per token."""

    weight_clip: float | None = None
    """Weights (and the embedding) are clipped to [-weight_clip, weight_clip] before quantization, and get no
    gradient outside. None, the default, uses each group's own min-max range: BART's weights are small
    (std 0.02 at initialisation), far inside the reference's fixed 2.5, so that clip does not bind and would
    only cost a comparison and a saved tensor per weight. LSQ learns its range and ignores this."""

    act_clip: float | None = 2.5
    """Activations are clipped to [-act_clip, act_clip] before quantization, and get no gradient outside.
    The default is the reference's 2.5, and clipping matters here unlike for weights: with one dynamic scale
    per tensor, a few outlier features (common in pre-trained transformers) would otherwise coarsen the grid
    for the whole batch; the clip bounds the step at 2.5 / 127 at 8 bits. None uses the tensor's own range.
    LSQ learns its range and ignores this."""

    quantize_attention_inputs: bool = False
    """Also quantize the attention query, key, value and softmax probabilities at `a_bits`, as the reference
    code does. Switches the model to an eager attention function (slower than SDPA)."""

    def __post_init__(self) -> None:
        for name in ("w_bits", "e_bits", "a_bits"):
            _check_bits(name, getattr(self, name))
        _check_choice("weight_method", self.weight_method, WEIGHT_METHODS)
        _check_choice("embedding_method", self.embedding_method, WEIGHT_METHODS)
        _check_choice("act_method", self.act_method, ACT_METHODS)
        _check_choice("weight_granularity", self.weight_granularity, GRANULARITIES)
        _check_choice("act_granularity", self.act_granularity, GRANULARITIES)
        _check_clip("weight_clip", self.weight_clip)
        _check_clip("act_clip", self.act_clip)
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
        """A config from the paper's "W-E-A" string, e.g. `QuantConfig.from_notation("2-2-8")`."""
        w_bits, e_bits, a_bits = parse_wea(notation)
        return cls(w_bits=w_bits, e_bits=e_bits, a_bits=a_bits, **settings)

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
