"""Quantized building blocks of a BART/mBART student.

Training time (after `prepare`): `QuantLinear` and `QuantEmbedding` are `nn.Linear` / `nn.Embedding`
subclasses that keep the original full-precision `nn.Parameter` objects, the latent weights the optimizer
updates, and fake-quantize them (and the Linear's input) on every forward.

Deployment (after `convert`): `ConvertedLinear` and `ConvertedEmbedding` hold int8 codes and scales in a
`PackedWeight` and dequantize on the fly; activations are still quantized dynamically.

Attention inputs: `AttentionInputQuantizer` is attached to each attention module and applied by
`quantized_eager_attention`, registered with transformers as the attention implementation
`ATTENTION_IMPLEMENTATION`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dq_lightning.quant.config import QuantConfig
from dq_lightning.quant.quantizers import (FakeQuantizer, activation_quantizer_for, make_activation_quantizer,
                                          weight_quantizer_for)

ATTENTION_IMPLEMENTATION = "dq_quant_eager"
ATTENTION_QUANTIZER_ATTR = "attention_input_quantizer"


class QuantLinear(nn.Linear):
    """`nn.Linear` whose input and weight are fake-quantized on every forward.

    `weight` and `bias` are the original module's parameters (same objects), so optimizers and state_dict
    keys are unaffected. `quant_enabled = False` makes it a plain Linear (warm-up).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 weight_quantizer: FakeQuantizer | None = None, input_quantizer: FakeQuantizer | None = None,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        self.quant_enabled = True
        self._evaluation_weight: tuple[tuple, Tensor] | None = None

    @classmethod
    def from_float(cls, linear: nn.Linear, config: QuantConfig,
                   weight_quantizer: FakeQuantizer | None | str = "auto", unsigned_input: bool = False) -> QuantLinear:
        """Wrap `linear`, reusing its parameters. `weight_quantizer="auto"` builds one at `config.w_bits`;
        pass a quantizer (or None) to override, as `prepare` does for the tied LM head. `unsigned_input`: the
        input takes the unsigned variant of the activation quantizer (fc2 with `config.unsigned_ffn_attn`)."""
        if weight_quantizer == "auto":
            weight_quantizer = weight_quantizer_for(config, linear.weight)
        # Built on the meta device so that no throwaway weight is allocated before the real one is put in.
        module = cls(linear.in_features, linear.out_features, bias=False, device="meta",
                     weight_quantizer=place_like(weight_quantizer, linear.weight),
                     input_quantizer=place_like(activation_quantizer_for(config, unsigned_input), linear.weight))
        module.weight, module.bias = linear.weight, linear.bias
        module.train(linear.training)
        return module

    def to_float(self) -> nn.Linear:
        """A plain `nn.Linear` with the same (latent, full-precision) parameters."""
        linear = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear.train(self.training)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if self.quant_enabled:
            if self.input_quantizer is not None:
                x = self.input_quantizer(x)
            if self.weight_quantizer is not None:
                weight = self._fake_quantized_weight()
        return F.linear(x, weight, self.bias)

    def _fake_quantized_weight(self) -> Tensor:
        """The fake-quantized weight. Without autograd (validation, test, generation) it is kept until the
        weight or the quantizer's own tensors change (their in-place version counters tell), so beam search
        quantizes each weight once rather than at every decoding step; the same values, one weight-sized copy
        held while evaluating. Training recomputes it at every forward, as the method requires, and frees the
        copy."""
        quantizer = self.weight_quantizer
        if torch.is_grad_enabled() or quantizer.observe:
            self._evaluation_weight = None
            return quantizer(self.weight)
        key = (id(quantizer), *((t.data_ptr(), t._version, t.dtype, t.device, t.shape)
                                for t in (self.weight, *quantizer.parameters(), *quantizer.buffers())))
        if self._evaluation_weight is None or self._evaluation_weight[0] != key:
            self._evaluation_weight = (key, quantizer(self.weight))
        return self._evaluation_weight[1]


class QuantEmbedding(nn.Embedding):
    """`nn.Embedding` whose looked-up rows are fake-quantized on every forward.

    Keeps the original `weight` parameter and the `embed_scale` of BART/mBART's `*ScaledWordEmbedding`
    (sqrt(d_model) when `scale_embedding` is set), applied after quantization as the original applies it
    after lookup.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 weight_quantizer: FakeQuantizer | None = None, embed_scale: float | None = None,
                 device=None, dtype=None):
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx, device=device, dtype=dtype)
        self.weight_quantizer = weight_quantizer
        self.embed_scale = embed_scale
        self.quant_enabled = True

    @classmethod
    def from_float(cls, embedding: nn.Embedding, weight_quantizer: FakeQuantizer | None) -> QuantEmbedding:
        """Wrap a token embedding, reusing its weight. The quantizer is passed in because the token
        embedding is tied: every module that looks it up (and the LM head) shares one quantizer."""
        if embedding.max_norm is not None or embedding.sparse:
            raise ValueError("QuantEmbedding does not support max_norm or sparse embeddings")
        module = cls(embedding.num_embeddings, embedding.embedding_dim, padding_idx=embedding.padding_idx,
                     weight_quantizer=weight_quantizer, embed_scale=getattr(embedding, "embed_scale", None),
                     device="meta")
        module.weight = embedding.weight
        module.train(embedding.training)
        return module

    def forward(self, input_ids: Tensor) -> Tensor:
        if self.quant_enabled and self.weight_quantizer is not None:
            out = self.weight_quantizer.lookup(self.weight, input_ids, self.padding_idx)
        else:
            out = F.embedding(input_ids, self.weight, self.padding_idx)
        return out if self.embed_scale is None else out * self.embed_scale

    def extra_repr(self) -> str:
        scale = "" if self.embed_scale is None else f", embed_scale={self.embed_scale:g}"
        return super().extra_repr() + scale


class AttentionInputQuantizer(nn.Module):
    """Quantizers for the query, key, value and softmax probabilities of one attention module, at `a_bits`.

    `attention_quant="dq-bart"` (the official code): each operand symmetric min-max per tensor, clipped at
    `act_clip`; the query is quantized after the 1/sqrt(head_dim) scaling and the probabilities after dropout.
    `"asym_probs"`: query (before the scaling), key and value with the configured activation quantizer, and the
    probabilities before dropout with the asymmetric quantizer, whose grid starts at 0, so that no code is
    spent on negative values that probabilities never take.
    `"tbt"` (TBT's attention): where "dq-bart" quantizes, with the configured activation quantizer, the
    probabilities with its unsigned variant when `unsigned_ffn_attn` (elastic: shifted by their minimum).
    """

    def __init__(self, config: QuantConfig):
        super().__init__()
        self.mode = config.attention_quant
        if self.mode == "dq-bart":
            def operand() -> FakeQuantizer | None:
                return make_activation_quantizer(config.a_bits, "minmax", "tensor", config.act_clip)
            self.query, self.key, self.value, self.probs = operand(), operand(), operand(), operand()
        elif self.mode == "tbt":
            self.query = activation_quantizer_for(config)
            self.key = activation_quantizer_for(config)
            self.value = activation_quantizer_for(config)
            self.probs = activation_quantizer_for(config, unsigned=config.unsigned_ffn_attn)
        else:
            self.query = activation_quantizer_for(config)
            self.key = activation_quantizer_for(config)
            self.value = activation_quantizer_for(config)
            probs_method = "lsq" if config.act_method == "lsq" else "asym_minmax"
            self.probs = make_activation_quantizer(config.a_bits, probs_method, config.act_granularity, None)
        self.scale_query_first = self.mode in ("dq-bart", "tbt")
        self.probs_after_dropout = self.mode in ("dq-bart", "tbt")
        self.enabled = True


# Set on an attention module to return its softmax before dropout as the attention map (what the official
# DQ-BART code distills); transformers' eager attention returns the map after dropout.
MAPS_BEFORE_DROPOUT_ATTR = "dq_maps_before_dropout"


def quantized_eager_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                              attention_mask: Tensor | None, scaling: float | None = None,
                              dropout: float = 0.0, **kwargs) -> tuple[Tensor, Tensor]:
    """Eager scaled dot-product attention with the operands of both matmuls quantized.

    The same computation as transformers' `eager_attention_forward` for BART; the quantizers come from the
    module's `attention_input_quantizer` (see `AttentionInputQuantizer` for where each operand is quantized),
    and without one (or when disabled) nothing is quantized. The returned map is the probabilities after
    dropout, as transformers returns them, or before dropout (and before quantization) where the module has
    `MAPS_BEFORE_DROPOUT_ATTR` set.
    """
    quant: AttentionInputQuantizer | None = getattr(module, ATTENTION_QUANTIZER_ATTR, None)
    active = quant is not None and quant.enabled
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    if active and quant.scale_query_first:
        scores = torch.matmul(quant.query(query * scaling), quant.key(key).transpose(2, 3))
    elif active:
        scores = torch.matmul(quant.query(query), quant.key(key).transpose(2, 3)) * scaling
    else:
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if active:
        value = quant.value(value)
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1)
    attention_map = probs if getattr(module, MAPS_BEFORE_DROPOUT_ATTR, False) else None
    if active and not quant.probs_after_dropout:
        probs = quant.probs(probs)
    probs = F.dropout(probs, p=dropout, training=module.training)
    if active and quant.probs_after_dropout:
        probs = quant.probs(probs)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, probs if attention_map is None else attention_map


def register_quantized_attention() -> None:
    """Make `ATTENTION_IMPLEMENTATION` known to transformers (idempotent): the attention function and, for
    mask creation, the eager mask (an additive float mask, as eager attention expects)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, quantized_eager_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_IMPLEMENTATION, eager_mask)


# -- converted (deployable) modules ----------------------------------------------------------------------------
class PackedWeight(nn.Module):
    """Integer codes (int8, one per value) and their scales (per row or per tensor): value = code * scale.

    One int8 per value is what PyTorch can compute with; a file packing 2-bit codes four to a byte is what
    `dq_lightning.size` counts in its strict convention.
    """

    def __init__(self, codes: Tensor, scale: Tensor, bits: int, method: str):
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.bits, self.method = bits, method

    @classmethod
    @torch.no_grad()
    def pack(cls, quantizer: FakeQuantizer, weight: Tensor) -> PackedWeight:
        qparams = quantizer.qparams(weight.detach())
        if quantizer.method == "asym_minmax":
            raise ValueError("asymmetric quantizers have a zero point; only code * scale weights pack")
        codes = quantizer.codes(weight.detach(), qparams).to(torch.int8)
        return cls(codes, qparams[0].detach().clone(), quantizer.bits, quantizer.method)

    def dequantize(self) -> Tensor:
        return self.codes.to(self.scale.dtype) * self.scale

    def lookup(self, ids: Tensor) -> Tensor:
        codes = F.embedding(ids, self.codes).to(self.scale.dtype)
        return codes * (F.embedding(ids, self.scale) if self.scale.dim() == 2 else self.scale)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.codes.shape)}, bits={self.bits}, method={self.method}"


class ConvertedLinear(nn.Module):
    """Inference Linear: int8 codes and scales instead of a float weight; the bias stays full precision."""

    def __init__(self, packed: PackedWeight, bias: nn.Parameter | None, input_quantizer: FakeQuantizer | None):
        super().__init__()
        self.out_features, self.in_features = packed.codes.shape
        self.packed = packed
        self.bias = bias
        self.input_quantizer = input_quantizer

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer.inference(x)
        return F.linear(x, self.packed.dequantize(), self.bias)


class ConvertedEmbedding(nn.Module):
    """Inference token embedding reading int8 codes and scales; keeps `embed_scale`."""

    def __init__(self, packed: PackedWeight, padding_idx: int | None, embed_scale: float | None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = packed.codes.shape
        self.packed, self.padding_idx, self.embed_scale = packed, padding_idx, embed_scale

    def forward(self, input_ids: Tensor) -> Tensor:
        out = self.packed.lookup(input_ids)
        return out if self.embed_scale is None else out * self.embed_scale


def place_like(quantizer: FakeQuantizer | None, like: Tensor) -> FakeQuantizer | None:
    """Put a freshly built quantizer (its LSQ step, if any) on the weight's device and dtype."""
    if quantizer is None or like.device.type == "meta":
        return quantizer
    return quantizer.to(device=like.device, dtype=like.dtype)
