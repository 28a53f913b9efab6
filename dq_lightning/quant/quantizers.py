"""Fake quantizers: modules that round a tensor onto a low-bit grid on the forward pass and let the gradient
through on the backward pass (the straight-through estimator, STE).

Every quantizer splits its work in three so that training and deployment compute the same numbers:

- `qparams(x)`: the grid, a tuple whose first element is the scale (per row or per tensor);
- `codes(x, qparams)`: the integer code of each value (held in a float tensor);
- `dequantize(codes, qparams)`: back to real values.

`forward(x)` returns `dequantize(codes(x))` with an STE gradient (computed in place on the fresh codes tensor:
the same arithmetic, fewer allocations), and `convert` stores `codes` as int8 and calls `dequantize`, so a
converted model reproduces the fake-quantized forward bit for bit.

Elementwise work uses floating-point arithmetic and in-place operations rather than boolean masks: these run
on every weight and activation at every step, and on CPU a bool mask followed by `where` is several times
slower than `sign`/`clamp`, while each fresh large tensor costs page faults.

A "row" is the last dimension: one output row of a Linear weight, one token of the embedding matrix, one
token's features for an activation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dq_lightning.quant.config import ELASTIC_MAX_BITS, FULL_PRECISION, QuantConfig

# A group whose values are all zero would otherwise get a zero scale and divide by it.
_MIN_RANGE = 1e-8


class _StraightThrough(torch.autograd.Function):
    """Forward: `quantize(x)`. Backward: the gradient passes to `x` unchanged where |x| < clip and is zero
    where |x| >= clip (as in the reference); with no clip it is the identity everywhere.

    Rounding has zero derivative almost everywhere, so it is treated as the identity (the STE of BinaryConnect,
    TernaryBERT and DQ-BART). Clipping is not: a value beyond the clip does not move the output, so it gets no
    gradient, which stops the latent value from drifting further out. The grid itself (scale, threshold) is
    computed from the data without a gradient, as in the reference.
    """

    @staticmethod
    def forward(ctx, x: Tensor, quantize: Callable[[Tensor], Tensor], clip: float | None) -> Tensor:
        ctx.clip = clip
        if clip is not None:
            # The mask is computed in backward, so forward passes without gradient (eval) do not pay for it.
            ctx.save_for_backward(x)
        return quantize(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.clip is None:
            return grad, None, None
        (x,) = ctx.saved_tensors
        # hardtanh's backward is exactly this mask, as one fused kernel: grad where -clip < x < clip, else 0.
        return torch.ops.aten.hardtanh_backward(grad, x, -ctx.clip, ctx.clip), None, None


def _greater(a: Tensor, b: Tensor) -> Tensor:
    """1.0 where a > b, else 0.0, written over `a`."""
    return a.sub_(b).sign_().clamp_(min=0)


class _LearnedStepSize(torch.autograd.Function):
    """LSQ (Esser et al., 2020): forward `round(clamp(x / s, qmin, qmax)) * s`.

    Backward: d/dx is 1 where qmin <= x/s <= qmax and 0 outside (the STE); d/ds is `round(x/s) - x/s` inside
    and `qmin` or `qmax` outside, summed over the values sharing the step and multiplied by `grad_scale`
    (1 / sqrt(N * qmax), N values per step) so that the step learns at the pace of the weights.
    """

    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, qmin: int, qmax: int, grad_scale: float) -> Tensor:
        v = x / step
        ctx.save_for_backward(v)
        ctx.qmin, ctx.qmax, ctx.grad_scale, ctx.step_shape = qmin, qmax, grad_scale, step.shape
        return _lsq_codes(v, qmin, qmax).mul_(step)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (v,) = ctx.saved_tensors
        inside = (v >= ctx.qmin) & (v <= ctx.qmax)
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_step = None
        if ctx.needs_input_grad[1]:
            d_step = torch.where(inside, torch.round(v) - v, v.clamp(ctx.qmin, ctx.qmax))
            grad_step = (grad * d_step).sum_to_size(ctx.step_shape) * ctx.grad_scale
        return grad_x, grad_step, None, None, None


def _lsq_codes(v: Tensor, qmin: int, qmax: int) -> Tensor:
    return torch.round(v).clamp_(qmin, qmax)


class _LearnedSign(torch.autograd.Function):
    """A 1-bit learned step (TBT's binary activations): forward `sign(x) * s`.

    Backward: d/dx is 1 where |x / s| <= 1 and 0 outside (the STE of the [-1, 1] range); d/ds is `sign(x)`,
    summed over the tensor and multiplied by `grad_scale` (1 / sqrt(N)): the derivative of the output itself,
    since the code does not move with s.
    """

    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, grad_scale: float) -> Tensor:
        ctx.save_for_backward(x, step)
        ctx.grad_scale, ctx.step_shape = grad_scale, step.shape
        return torch.sign(x).mul_(step)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, step = ctx.saved_tensors
        grad_x = grad * ((x / step).abs_() <= 1) if ctx.needs_input_grad[0] else None
        grad_step = None
        if ctx.needs_input_grad[1]:
            grad_step = (grad * torch.sign(x)).sum_to_size(ctx.step_shape) * ctx.grad_scale
        return grad_x, grad_step, None


def _group_reduce(x: Tensor, granularity: str, op: str) -> Tensor:
    """`op` ("mean", "sum") over each group: the last dim per row, everything per tensor."""
    if granularity == "row":
        return getattr(x, op)(dim=-1, keepdim=True)
    return getattr(x, op)()


def _group_extremes(x: Tensor, granularity: str) -> tuple[Tensor, Tensor]:
    """Minimum and maximum of each group (two plain reductions: faster on CPU than `aminmax` per row)."""
    if granularity == "row":
        return x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    return x.amin(), x.amax()


@dataclass(frozen=True)
class QuantizerSpec:
    """What a quantizer is, enough to build it again (`make_activation_quantizer(**asdict(spec))`); its
    learned state (LSQ steps) travels separately, in its state dict."""

    method: str
    bits: int
    granularity: str
    clip: float | None


class FakeQuantizer(nn.Module):
    """Base class. Set `observe = True` to record `last_stats` (mean scale, share of values clipped) on the
    next forward passes; the Lightning callback does so at a low rate."""

    method = ""

    def __init__(self, bits: int, granularity: str, clip: float | None):
        super().__init__()
        self.bits, self.granularity, self.clip = bits, granularity, clip
        self.observe = False
        self.last_stats: dict[str, Tensor] | None = None

    @property
    def spec(self) -> QuantizerSpec:
        return QuantizerSpec(self.method, self.bits, self.granularity, self.clip)

    # -- the grid -----------------------------------------------------------------------------------------
    def qparams(self, x: Tensor) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def codes(self, x: Tensor, qparams: tuple[Tensor, ...]) -> Tensor:
        raise NotImplementedError

    def dequantize(self, codes: Tensor, qparams: tuple[Tensor, ...]) -> Tensor:
        return codes.to(qparams[0].dtype) * qparams[0]

    def _dequantize_(self, codes: Tensor, qparams: tuple[Tensor, ...]) -> Tensor:
        """`dequantize` in place on a float codes tensor that nothing else holds."""
        return codes.mul_(qparams[0])

    def _clipped(self, x: Tensor) -> Tensor:
        return x.clamp(-self.clip, self.clip) if self.clip is not None else x

    def clipped_mask(self, x: Tensor, qparams: tuple[Tensor, ...]) -> Tensor:
        """Where `x` lies at or beyond the clip (its gradient is zero there)."""
        if self.clip is None:
            return torch.zeros_like(x, dtype=torch.bool)
        return x.abs() >= self.clip

    # -- forward -----------------------------------------------------------------------------------------
    def fake_quantize(self, x: Tensor, qparams: tuple[Tensor, ...]) -> Tensor:
        return _StraightThrough.apply(x, lambda t: self._dequantize_(self.codes(t, qparams), qparams), self.clip)

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, self.qparams(x))

    def inference(self, x: Tensor) -> Tensor:
        """`self(x)` as deployed models compute it: the same grid, codes and dequantization as the forward of
        every quantizer (min-max, asymmetric, ternary, LSQ), without the straight-through autograd function,
        which inference does not need and which costs a few microseconds per call. The one definition of a
        quantized input at inference, for converted students and loaded exports alike."""
        if torch.is_grad_enabled() and x.requires_grad:
            return self(x)
        qparams = self.qparams(x)
        return self._dequantize_(self.codes(x, qparams), qparams)

    def lookup(self, weight: Tensor, ids: Tensor, padding_idx: int | None = None) -> Tensor:
        """Fake-quantized `weight[ids]`, equal to quantizing the whole matrix and then looking up, but
        quantizing only the rows looked up (an embedding forward touches a few hundred of 50k rows)."""
        rows = F.embedding(ids, weight, padding_idx)
        return self._run(rows, self.lookup_qparams(weight, rows, ids))

    def lookup_qparams(self, weight: Tensor, rows: Tensor, ids: Tensor) -> tuple[Tensor, ...]:
        # A row's grid depends on that row alone, so per-row statistics of the looked-up rows are those
        # of the matrix; a per-tensor grid needs the whole matrix.
        return self.qparams(rows if self.granularity == "row" else weight)

    def _run(self, x: Tensor, qparams: tuple[Tensor, ...]) -> Tensor:
        if self.observe:
            self.last_stats = self.stats(x, qparams)
        return self.fake_quantize(x, qparams)

    @torch.no_grad()
    def stats(self, x: Tensor, qparams: tuple[Tensor, ...] | None = None) -> dict[str, Tensor]:
        qparams = self.qparams(x) if qparams is None else qparams
        return {"scale": qparams[0].detach().float().mean(),
                "clipped_frac": self.clipped_mask(x, qparams).float().mean()}

    def extra_repr(self) -> str:
        clip = "" if self.clip is None else f", clip={self.clip}"
        return f"bits={self.bits}, granularity={self.granularity}{clip}"


class MinMaxQuantizer(FakeQuantizer):
    """Symmetric uniform quantizer: scale = max|x| / (2^(b-1) - 1) per group, codes in
    [-(2^(b-1) - 1), 2^(b-1) - 1], so zero is exact and 2^b - 1 levels are used.

    With `clip`, values are clipped to [-clip, clip] first, so the range is min(max|x|, clip).
    """

    method = "minmax"

    def __init__(self, bits: int, granularity: str = "row", clip: float | None = None):
        super().__init__(bits, granularity, clip)
        self.qmax = 2 ** (bits - 1) - 1

    def qparams(self, x: Tensor) -> tuple[Tensor, ...]:
        with torch.no_grad():
            # No clipped copy of x: max|clip(x)| = min(max|x|, clip).
            low, high = _group_extremes(x, self.granularity)
            max_abs = torch.maximum(-low, high)
            if self.clip is not None:
                max_abs = max_abs.clamp(max=self.clip)
            return (max_abs.clamp(min=_MIN_RANGE) / self.qmax,)

    def codes(self, x: Tensor, qparams: tuple[Tensor, ...]) -> Tensor:
        # Clamping the codes clips x: beyond the clip, x / scale exceeds qmax.
        return (x / qparams[0]).round_().clamp_(-self.qmax, self.qmax)


class AsymMinMaxQuantizer(FakeQuantizer):
    """Asymmetric uniform quantizer for activations: the grid spans [min(x, 0), max(x, 0)] with 2^b levels and
    an integer zero point, so zero stays exact (padding, ReLU/GELU zeros) while a one-signed input uses
    every level."""

    method = "asym_minmax"

    def __init__(self, bits: int, granularity: str = "tensor", clip: float | None = None):
        super().__init__(bits, granularity, clip)
        self.qmax = 2**bits - 1

    def qparams(self, x: Tensor) -> tuple[Tensor, ...]:
        with torch.no_grad():
            low, high = _group_extremes(x, self.granularity)
            if self.clip is not None:
                low, high = low.clamp(min=-self.clip), high.clamp(max=self.clip)
            low, high = low.clamp(max=0), high.clamp(min=0)
            scale = (high - low).clamp(min=_MIN_RANGE) / self.qmax
            zero_point = torch.round(-low / scale).clamp_(0, self.qmax)
            return scale, zero_point

    def codes(self, x: Tensor, qparams: tuple[Tensor, ...]) -> Tensor:
        scale, zero_point = qparams
        return (self._clipped(x) / scale).round_().add_(zero_point).clamp_(0, self.qmax)

    def dequantize(self, codes: Tensor, qparams: tuple[Tensor, ...]) -> Tensor:
        scale, zero_point = qparams
        return (codes.to(scale.dtype) - zero_point) * scale

    def _dequantize_(self, codes: Tensor, qparams: tuple[Tensor, ...]) -> Tensor:
        scale, zero_point = qparams
        return codes.sub_(zero_point).mul_(scale)


class TernaryQuantizer(FakeQuantizer):
    """Ternary weight networks (TWN, Li & Liu 2016), the 2-bit weights of TernaryBERT and DQ-BART.

    Per group: delta = 0.7 * mean|w|, alpha = mean of |w| over |w| > delta; values become +alpha where
    w > delta, -alpha where w < -delta and 0 elsewhere. Codes are {-1, 0, 1} and the scale is alpha.
    """

    method = "ternary"

    def __init__(self, granularity: str = "row", clip: float | None = None):
        super().__init__(2, granularity, clip)

    def qparams(self, x: Tensor) -> tuple[Tensor, ...]:
        return self._qparams_and_kept(x)[0]

    def _qparams_and_kept(self, x: Tensor) -> tuple[tuple[Tensor, Tensor], Tensor]:
        """The grid (alpha, delta) and a fresh tensor holding 1.0 where |x| > delta and 0.0 elsewhere.

        One tensor the size of x is allocated and reused throughout: |x| - delta, then its positive part
        (whose sum gives alpha), then the kept indicator.
        """
        with torch.no_grad():
            work = x.abs()
            if self.clip is not None:
                work.clamp_(max=self.clip)
            delta = 0.7 * _group_reduce(work, self.granularity, "mean")
            excess = _group_reduce(work.sub_(delta).clamp_(min=0), self.granularity, "sum")
            kept = work.sign_()
            count = _group_reduce(kept, self.granularity, "sum")
            # mean of |x| over the kept values = delta + mean excess over delta
            alpha = (excess + delta * count) / count.clamp(min=1)
            return (alpha, delta), kept

    def codes(self, x: Tensor, qparams: tuple[Tensor, ...]) -> Tensor:
        x = self._clipped(x)
        return torch.sign(x) * (x.abs() > qparams[1])

    def forward(self, x: Tensor) -> Tensor:
        # This runs on every weight at every step: the kept mask is computed once, for the grid and the values.
        qparams, kept = self._qparams_and_kept(x)
        if self.observe:
            self.last_stats = self.stats(x, qparams)
        return _StraightThrough.apply(x, lambda t: self._ternary(t, qparams[0], kept), self.clip)

    def fake_quantize(self, x: Tensor, qparams: tuple[Tensor, ...]) -> Tensor:
        return _StraightThrough.apply(
            x, lambda t: self._ternary(t, qparams[0], _greater(t.abs(), qparams[1])), self.clip)

    @staticmethod
    def _ternary(x: Tensor, alpha: Tensor, kept: Tensor) -> Tensor:
        """+-alpha where kept, 0 elsewhere, written over `kept`. Equal to dequantize(codes) bit for bit: codes
        are exactly -1, 0 or 1, and +-1 * alpha is +-alpha."""
        return kept.mul_(alpha).copysign_(x)


class TBTTernaryQuantizer(FakeQuantizer):
    """TBT's ternary weights (Liu et al. 2023): per group, scale = 4/3 * mean|w| and codes
    round(clamp(w / scale, -1, 1)), so a value is kept (+-scale) where |w| > 2/3 mean|w|.

    Unlike TWN, the scale is a fixed multiple of the mean instead of the mean of the kept values. Its gradient is
    the straight-through identity (TBT clips nothing; with `clip`, the DQ-BART clip mask applies).
    """

    method = "tbt_ternary"

    def __init__(self, granularity: str = "row", clip: float | None = None):
        super().__init__(2, granularity, clip)

    def qparams(self, x: Tensor) -> tuple[Tensor, ...]:
        with torch.no_grad():
            mean_abs = _group_reduce(self._clipped(x).abs(), self.granularity, "mean")
            return ((4.0 / 3.0) * mean_abs).clamp_(min=_MIN_RANGE),

    def codes(self, x: Tensor, qparams: tuple[Tensor, ...]) -> Tensor:
        return (self._clipped(x) / qparams[0]).clamp_(-1, 1).round_()


class BinaryQuantizer(FakeQuantizer):
    """Binary weights (BWN, Rastegari et al. 2016; TBT's 1-bit weights): per group, scale = mean|w| and
    codes sign(w), with +1 for w = 0, since one bit holds no zero (TBT's `torch.sign` gives 0 there; a zero
    group still gives zeros, its scale being 0). Its gradient is the straight-through identity (inside the clip,
    if any)."""

    method = "binary"

    def __init__(self, granularity: str = "row", clip: float | None = None):
        super().__init__(1, granularity, clip)

    def qparams(self, x: Tensor) -> tuple[Tensor, ...]:
        with torch.no_grad():
            return _group_reduce(self._clipped(x).abs(), self.granularity, "mean"),

    def codes(self, x: Tensor, qparams: tuple[Tensor, ...]) -> Tensor:
        # sign(sign(x) + 0.5): -1 stays -1, 0 and 1 become 1; no boolean mask (see the module docstring).
        return torch.sign(x).add_(0.5).sign_()


class LSQQuantizer(FakeQuantizer):
    """Learned step size quantization (LSQ, Esser et al. 2020; used for BERT by KDLSQ-BERT).

    The step is an `nn.Parameter` (one per row or per tensor), codes are signed integers in
    [-2^(b-1), 2^(b-1) - 1]. The step is initialised to 2 * mean|x| / sqrt(qmax), from the weight when the
    quantizer is built for one, otherwise from the first tensor it sees. Its gradient is the LSQ gradient
    scaled by 1 / sqrt(N * qmax), N the number of values sharing a step (see `_LearnedStepSize`). The
    learned step sets the range, so no external clip applies.
    """

    method = "lsq"

    def __init__(self, bits: int, granularity: str = "tensor", weight: Tensor | None = None):
        super().__init__(bits, granularity, clip=None)
        self.qmin, self.qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        rows = weight.shape[0] if weight is not None and granularity == "row" else None
        self.step = nn.Parameter(torch.ones((rows, 1) if rows else ()))
        self.register_buffer("initialized", torch.tensor(False))
        # A weight has a fixed number of values per step; an activation's varies with the batch.
        self.values_per_step: int | None = None
        if weight is not None:
            self.values_per_step = weight.shape[-1] if rows else weight.numel()
            self.initialize(weight)
        elif granularity == "row":
            raise ValueError("a per-row LSQ quantizer needs the weight it quantizes, to size its steps")

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        mean_abs = _group_reduce(x.detach().abs().float(), self.granularity, "mean")
        self.step.copy_((2 * mean_abs / math.sqrt(self.qmax)).clamp(min=_MIN_RANGE).reshape(self.step.shape))
        self.initialized.fill_(True)

    def _step(self) -> Tensor:
        # An optimizer step can push a learned step through zero; keep it positive.
        return self.step.clamp(min=_MIN_RANGE)

    def qparams(self, x: Tensor) -> tuple[Tensor, ...]:
        if not self.initialized:
            self.initialize(x)
        return (self._step(),)

    def lookup_qparams(self, weight: Tensor, rows: Tensor, ids: Tensor) -> tuple[Tensor, ...]:
        (step,) = self.qparams(weight)
        return (F.embedding(ids, step),) if self.granularity == "row" else (step,)

    def codes(self, x: Tensor, qparams: tuple[Tensor, ...]) -> Tensor:
        return _lsq_codes(x / qparams[0], self.qmin, self.qmax)

    def clipped_mask(self, x: Tensor, qparams: tuple[Tensor, ...]) -> Tensor:
        v = x / qparams[0]
        return (v < self.qmin) | (v > self.qmax)

    def fake_quantize(self, x: Tensor, qparams: tuple[Tensor, ...]) -> Tensor:
        (step,) = qparams
        per_step = self.values_per_step or max(x.numel() // max(step.numel(), 1), 1)
        return _LearnedStepSize.apply(x, step, self.qmin, self.qmax, 1.0 / math.sqrt(per_step * self.qmax))


class ElasticQuantizer(LSQQuantizer):
    """TBT's elastic activation quantizer (Liu et al. 2023): a learned step per tensor, LSQ's gradients.

    Signed (method "elastic"): codes in [-1, 1] at 2 bits (three levels, zero exact), [-2^(b-1), 2^(b-1) - 1]
    at 3 and 4 bits, sign(x) at 1 bit. Unsigned ("elastic_unsigned", for one-signed inputs such as softmax
    probabilities): the tensor's minimum m is subtracted first and added back, codes in [0, 2] at 2 bits and
    [0, 2^b - 1] otherwise, so value = code * s + m (at 1 bit no shift, codes in [0, 1]).

    The step starts, on the first tensor seen, at 2 * mean|x| / sqrt(max(2^(b-1) - 1, 1)) (signed) or
    4 * mean|x| / sqrt(2^b - 1) (unsigned). Its gradient is LSQ's, scaled by 1 / sqrt(N * qmax), N the values
    of the tensor; at 1 bit, signed, it is sign(x) scaled by 1 / sqrt(N) (`_LearnedSign`). m has no gradient.
    """

    def __init__(self, bits: int, unsigned: bool = False):
        super().__init__(bits, "tensor")
        self.unsigned = unsigned
        self.method = "elastic_unsigned" if unsigned else "elastic"
        if unsigned:
            self.qmin, self.qmax = 0, 2 if bits == 2 else 2**bits - 1
        elif bits <= 2:
            self.qmin, self.qmax = -1, 1

    @property
    def _shifted(self) -> bool:
        return self.unsigned and self.bits > 1

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        mean_abs = x.detach().abs().float().mean()
        if self.unsigned:
            step = 4 * mean_abs / math.sqrt(2**self.bits - 1)
        else:
            step = 2 * mean_abs / math.sqrt(max(2 ** (self.bits - 1) - 1, 1))
        self.step.copy_(step.clamp(min=_MIN_RANGE).reshape(self.step.shape))
        self.initialized.fill_(True)

    def qparams(self, x: Tensor) -> tuple[Tensor, ...]:
        (step,) = super().qparams(x)
        if not self._shifted:
            return (step,)
        with torch.no_grad():
            return step, x.amin().to(step.dtype)

    def codes(self, x: Tensor, qparams: tuple[Tensor, ...]) -> Tensor:
        if self.bits == 1 and not self.unsigned:
            return torch.sign(x)
        return super().codes(x - qparams[1] if self._shifted else x, qparams)

    def dequantize(self, codes: Tensor, qparams: tuple[Tensor, ...]) -> Tensor:
        value = super().dequantize(codes, qparams)
        return value + qparams[1] if self._shifted else value

    def _dequantize_(self, codes: Tensor, qparams: tuple[Tensor, ...]) -> Tensor:
        value = codes.mul_(qparams[0])
        return value.add_(qparams[1]) if self._shifted else value

    def clipped_mask(self, x: Tensor, qparams: tuple[Tensor, ...]) -> Tensor:
        return super().clipped_mask(x - qparams[1] if self._shifted else x, qparams[:1])

    def fake_quantize(self, x: Tensor, qparams: tuple[Tensor, ...]) -> Tensor:
        step = qparams[0]
        grad_scale = 1.0 / math.sqrt(x.numel() * self.qmax)
        if self.bits == 1 and not self.unsigned:
            return _LearnedSign.apply(x, step, grad_scale)
        if not self._shifted:
            return _LearnedStepSize.apply(x, step, self.qmin, self.qmax, grad_scale)
        shift = qparams[1]
        return _LearnedStepSize.apply(x - shift, step, self.qmin, self.qmax, grad_scale).add_(shift)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, {'unsigned' if self.unsigned else 'signed'}, codes [{self.qmin}, {self.qmax}]"


# -- building quantizers from a config -----------------------------------------------------------------------
def make_weight_quantizer(bits: int, method: str, granularity: str = "row", clip: float | None = None,
                          weight: Tensor | None = None) -> FakeQuantizer | None:
    """A quantizer for a weight matrix, or None at full precision. `method` is already resolved (not "auto");
    LSQ needs the `weight` to size and initialise its steps."""
    if bits == FULL_PRECISION:
        return None
    if method == "ternary":
        return TernaryQuantizer(granularity, clip)
    if method == "tbt_ternary":
        return TBTTernaryQuantizer(granularity, clip)
    if method == "binary":
        return BinaryQuantizer(granularity, clip)
    if method == "minmax":
        return MinMaxQuantizer(bits, granularity, clip)
    if method == "lsq":
        if weight is None:
            raise ValueError("an LSQ weight quantizer is built from the weight it quantizes")
        return LSQQuantizer(bits, granularity, weight=weight)
    raise ValueError(f"unknown weight quantization method {method!r}")


def make_activation_quantizer(bits: int, method: str, granularity: str = "tensor",
                              clip: float | None = None) -> FakeQuantizer | None:
    """A quantizer for activations (dynamic scale per batch, or a learned step), or None at full precision.
    "elastic" and "elastic_unsigned" learn their step at `ELASTIC_MAX_BITS` or fewer and are min-max above it
    (symmetric, and asymmetric for the unsigned variant), as TBT's code is at 8 bits."""
    if bits == FULL_PRECISION:
        return None
    if method in ("elastic", "elastic_unsigned"):
        if bits <= ELASTIC_MAX_BITS:
            return ElasticQuantizer(bits, unsigned=method == "elastic_unsigned")
        method = "asym_minmax" if method == "elastic_unsigned" else "minmax"
    if method == "minmax":
        return MinMaxQuantizer(bits, granularity, clip)
    if method == "asym_minmax":
        return AsymMinMaxQuantizer(bits, granularity, clip)
    if method == "lsq":
        return LSQQuantizer(bits, "tensor")
    raise ValueError(f"unknown activation quantization method {method!r}")


def weight_quantizer_for(config: QuantConfig, weight: Tensor) -> FakeQuantizer | None:
    return make_weight_quantizer(config.w_bits, config.resolved_weight_method, config.weight_granularity,
                                 config.weight_clip, weight)


def embedding_quantizer_for(config: QuantConfig, weight: Tensor) -> FakeQuantizer | None:
    return make_weight_quantizer(config.e_bits, config.resolved_embedding_method, config.embedding_granularity,
                                 config.weight_clip, weight)


def activation_quantizer_for(config: QuantConfig, unsigned: bool = False) -> FakeQuantizer | None:
    """The activation quantizer of `config`, or its unsigned variant (for one-signed inputs: fc2's, the
    attention probabilities) when `unsigned`."""
    method = UNSIGNED_VARIANT.get(config.act_method, config.act_method) if unsigned else config.act_method
    return make_activation_quantizer(config.a_bits, method, config.act_granularity, config.act_clip)


# What an activation method becomes for one-signed inputs (QuantConfig.unsigned_ffn_attn).
UNSIGNED_VARIANT = {"minmax": "asym_minmax", "elastic": "elastic_unsigned"}
