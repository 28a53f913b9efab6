"""`prepare` a BART/mBART student for quantization-aware training, `convert` it for deployment.

What `prepare` swaps, in place:

- every `nn.Linear` of the encoder and decoder (self-attention, cross-attention, feed-forward) becomes a
  `QuantLinear` at `w_bits`, with its input quantized at `a_bits` (the input of `fc2`, after the GELU, with
  the activation quantizer's unsigned variant when `unsigned_ffn_attn`);
- the token embedding becomes a `QuantEmbedding` at `e_bits`, wherever it is looked up (`model.shared`,
  `encoder.embed_tokens`, `decoder.embed_tokens`: three modules, one weight);
- the LM head, which BART ties to the token embedding, depends on `quantize_lm_head`:
  - False (the official recipe): left a plain Linear on the latent full-precision tied weight, its input not
    quantized. The deployed model cannot keep a full-precision copy of the matrix it counts at E bits, so
    `convert` (and hence export) computes the head from the E-bit token embedding codes, and
    `use_deployed_head` lets a latent student evaluate that way too;
  - True: quantized with the embedding's own quantizer, so the logits come from exactly the E-bit matrix
    the tokens are looked up in (one latent matrix through one grid), its input at `a_bits` like every
    other Linear's. An untied head gets `e_bits` with a quantizer of its own.
- with `attention_quant`, each attention module gets an `AttentionInputQuantizer` and the model switches to
  the quantized eager attention function.

Left alone: positional embeddings (`BartLearnedPositionalEmbedding` subclasses `nn.Embedding` but is not
the token embedding), LayerNorms, biases and the `final_logits_bias` buffer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn

from dq_lightning.errors import UserError
from dq_lightning.quant.config import QuantConfig
from dq_lightning.quant.modules import (ATTENTION_IMPLEMENTATION, ATTENTION_QUANTIZER_ATTR,
                                        MAPS_BEFORE_DROPOUT_ATTR, AttentionInputQuantizer, ConvertedEmbedding,
                                        ConvertedLinear, PackedWeight, QuantEmbedding, QuantLinear, place_like,
                                        register_quantized_attention)
from dq_lightning.quant.quantizers import FakeQuantizer, embedding_quantizer_for

QUANT_CONFIG_ATTR = "dq_quant_config"
# The feed-forward block's second Linear in BART/mBART layers: its input follows the GELU, mostly one-signed.
FFN_OUTPUT = "fc2"
CONVERTED_ATTR = "dq_quant_converted"


def quant_config_of(model: nn.Module) -> QuantConfig | None:
    """The `QuantConfig` a model was prepared with, or None."""
    return getattr(model, QUANT_CONFIG_ATTR, None)


def is_prepared(model: nn.Module) -> bool:
    return quant_config_of(model) is not None


def is_converted(model: nn.Module) -> bool:
    return bool(getattr(model, CONVERTED_ATTR, False))


def prepare(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Swap quantized modules into `model` in place (see the module docstring) and return it.

    Idempotent: a model already prepared with the same config is returned as is (e.g. on resume); one
    prepared with another config is an error. Parameters are reused, so an optimizer built before or after
    this call updates the same latent weights; LSQ adds step parameters, so with LSQ build the optimizer
    after `prepare`.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"prepare needs a QuantConfig, got {type(config).__name__}")
    existing = quant_config_of(model)
    if existing is not None:
        if existing != config:
            raise UserError(f"the model is already prepared for {existing.notation} ({existing}); "
                            f"cannot prepare it again for {config.notation}")
        return model
    if is_converted(model):
        raise UserError("the model is already converted to integer codes; prepare a full-precision model")

    token = token_embedding_weight(model)
    output = _output_embeddings(model)
    token_quantizer = place_like(embedding_quantizer_for(config, token), token) if token is not None else None
    replacements: dict[int, nn.Module | None] = {}

    def quantized(name: str, child: nn.Module) -> nn.Module | None:
        if id(child) not in replacements:
            replacements[id(child)] = _quantized(child, config, token, token_quantizer, output,
                                                 unsigned_input=config.unsigned_ffn_attn and name == FFN_OUTPUT)
        return replacements[id(child)]

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = quantized(name, child)
            if new is not None:
                setattr(parent, name, new)
    if not any(replacements.values()):
        raise UserError(f"{type(model).__name__} has no quantizable layer (no nn.Linear and no token "
                        "embedding); prepare expects a BART/mBART model")
    if config.quantizes_attention:
        _quantize_attention_inputs(model, config)
    setattr(model, QUANT_CONFIG_ATTR, config)
    return model


def _quantized(child: nn.Module, config: QuantConfig, token: torch.Tensor | None,
               token_quantizer: FakeQuantizer | None, output: nn.Module | None,
               unsigned_input: bool = False) -> nn.Module | None:
    if isinstance(child, (QuantLinear, QuantEmbedding)):
        return None
    tied = token is not None and getattr(child, "weight", None) is token
    if isinstance(child, nn.Embedding):
        return QuantEmbedding.from_float(child, token_quantizer) if tied else None
    if isinstance(child, nn.Linear):
        if (tied or child is output) and not config.quantize_lm_head:
            return None
        if tied:
            return QuantLinear.from_float(child, config, weight_quantizer=token_quantizer)
        if child is output:
            quantizer = place_like(embedding_quantizer_for(config, child.weight), child.weight)
            return QuantLinear.from_float(child, config, weight_quantizer=quantizer)
        return QuantLinear.from_float(child, config, unsigned_input=unsigned_input)
    return None


def token_embedding_weight(model: nn.Module) -> torch.Tensor | None:
    """The weight of the model's token embedding (tied to the LM head in BART), or None."""
    embedding = _token_embedding(model)
    return embedding.weight if isinstance(embedding, nn.Embedding) else None


def _token_embedding(model: nn.Module) -> nn.Module | None:
    try:
        return model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    try:
        return model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def _attention_modules(model: nn.Module, setting: str) -> list[nn.Module]:
    attention = [m for m in model.modules() if all(hasattr(m, p) for p in ("q_proj", "k_proj", "v_proj"))]
    if not attention or not hasattr(model, "set_attn_implementation"):
        raise UserError(f"{setting} needs a transformers BART/mBART model with q_proj/k_proj/v_proj attention "
                        "modules")
    return attention


def _use_dq_attention(model: nn.Module) -> None:
    register_quantized_attention()
    if model.config._attn_implementation != ATTENTION_IMPLEMENTATION:
        model.set_attn_implementation(ATTENTION_IMPLEMENTATION)


def _quantize_attention_inputs(model: nn.Module, config: QuantConfig) -> None:
    for module in _attention_modules(model, f"attention_quant={config.attention_quant!r}"):
        quantizer = AttentionInputQuantizer(config).to(module.q_proj.weight.device)
        setattr(module, ATTENTION_QUANTIZER_ATTR, quantizer)
    _use_dq_attention(model)


def return_maps_before_dropout(model: nn.Module) -> None:
    """Make every attention module of `model` return its softmax before dropout (and before any quantization)
    as its attention map, the map the official DQ-BART code distills. Switches to the eager attention function
    of this library (quantizing nothing unless the model is prepared with `attention_quant`)."""
    for module in _attention_modules(model, "attention maps before dropout"):
        setattr(module, MAPS_BEFORE_DROPOUT_ATTR, True)
    _use_dq_attention(model)


def use_deployed_head(model: nn.Module, deployed: bool = True) -> None:
    """For a prepared model whose tied LM head trains in full precision (`quantize_lm_head=False`): compute the
    logits from the E-bit token embedding (`deployed=True`, what `convert` and export ship and what the size
    accounting counts) or from the latent full-precision weight (`False`, what it trained with). The head's
    input stays unquantized either way. A model with a quantized or untied head is left alone."""
    head, token = _output_embeddings(model), _token_embedding(model)
    if not isinstance(token, QuantEmbedding) or token.weight_quantizer is None or head is None:
        return
    if deployed and type(head) is nn.Linear and head.weight is token.weight:
        new = QuantLinear.from_float(head, quant_config_of(model), weight_quantizer=token.weight_quantizer)
        new.input_quantizer = None
        new.deployed_head = True
        model.set_output_embeddings(new)
    elif not deployed and getattr(head, "deployed_head", False):
        model.set_output_embeddings(head.to_float())


@torch.no_grad()
def convert(model: nn.Module) -> nn.Module:
    """Bake a prepared model's integer codes and scales (in place) and return it.

    Each quantized weight becomes a `PackedWeight` (int8 codes, per-row or per-tensor scales) inside a
    `ConvertedLinear`/`ConvertedEmbedding`; the tied token embedding and LM head share one. In eval mode the
    converted model's outputs equal the fake-quantized model's exactly. The latent full-precision weights
    are dropped (biases, LayerNorms and positional embeddings stay), so convert a copy to keep training.
    A tied LM head that trained in full precision is converted onto the token embedding's codes (see
    `use_deployed_head`): the converted model is the deployed one.
    """
    if is_converted(model):
        return model
    if not is_prepared(model):
        raise UserError("convert needs a model prepared for quantization; call prepare(model, config) first")
    use_deployed_head(model, True)
    packed: dict[int, PackedWeight] = {}

    def pack(weight: nn.Parameter, quantizer: FakeQuantizer) -> PackedWeight:
        if id(weight) not in packed:
            packed[id(weight)] = PackedWeight.pack(quantizer, weight)
        return packed[id(weight)]

    replacements: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) not in replacements:
                if isinstance(child, QuantLinear) and child.weight_quantizer is not None:
                    replacements[id(child)] = ConvertedLinear(pack(child.weight, child.weight_quantizer),
                                                              child.bias, child.input_quantizer)
                elif isinstance(child, QuantEmbedding) and child.weight_quantizer is not None:
                    replacements[id(child)] = ConvertedEmbedding(pack(child.weight, child.weight_quantizer),
                                                                 child.padding_idx, child.embed_scale)
            if id(child) in replacements:
                setattr(parent, name, replacements[id(child)])
    setattr(model, CONVERTED_ATTR, True)
    return model


def holds_codes(state: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict was saved from a converted model (integer codes) rather than a prepared one."""
    return any(key.endswith(".packed.codes") for key in state)


def in_form_of(model: nn.Module, config: QuantConfig, state: dict[str, torch.Tensor],
               fresh: Callable[[], nn.Module]) -> nn.Module:
    """`model` in the form `state` was saved from, ready for `load_state_dict(state)`: prepared for `config`
    (latent weights) or also converted (integer codes). A converted model has lost its latent weights and
    cannot be prepared again, so for a latent state it is replaced by `fresh()` (a new model of the same
    architecture), prepared; in eval mode its fake-quantized forward equals the converted one."""
    if is_converted(model) and not holds_codes(state):
        model = fresh()
    if not is_prepared(model):
        prepare(model, config)
    if holds_codes(state):
        convert(model)
    return model


def set_quantization_enabled(model: nn.Module, enabled: bool) -> None:
    """Turn fake quantization on or off in every prepared module (off = full precision, for warm-up)."""
    for module in model.modules():
        if isinstance(module, (QuantLinear, QuantEmbedding)):
            module.quant_enabled = enabled
        elif isinstance(module, AttentionInputQuantizer):
            module.enabled = enabled


def quantizers(model: nn.Module) -> list[FakeQuantizer]:
    """Every quantizer in the model, each once (the tied embedding's is shared by several modules)."""
    return [m for m in model.modules() if isinstance(m, FakeQuantizer)]


def set_observe(model: nn.Module, observe: bool) -> None:
    """Make every quantizer record `last_stats` on its next forward passes (True) or stop (False)."""
    for quantizer in quantizers(model):
        quantizer.observe = observe
        if observe:
            quantizer.last_stats = None


_ROLES = {"weight_quantizer": "w", "input_quantizer": "a", "query": "q", "key": "k", "value": "v",
          "probs": "p"}


def collect_stats(model: nn.Module, per_layer: bool = True) -> dict[str, float]:
    """Statistics recorded since `set_observe(model, True)`, as `{"quant/...": value}`, then cleared.

    Per layer (with `per_layer`): `quant/<layer>/<role>_scale` and `quant/<layer>/<role>_clipped_frac`, the
    role being w (weight), a (Linear input) or q/k/v/p (attention inputs), the layer path without the
    leading `model.`. Aggregates over layers, always: `quant/<group>/scale_mean`,
    `quant/<group>/clipped_frac_mean` and `quant/<group>/clipped_frac_max` for the groups weight, embedding,
    act and attention.
    """
    out: dict[str, float] = {}
    groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for name, module in model.named_modules():
        if not isinstance(module, FakeQuantizer) or module.last_stats is None:
            continue
        path, _, attr = name.rpartition(".")
        if attr in ("query", "key", "value", "probs"):
            path = path.rpartition(".")[0]  # drop the AttentionInputQuantizer's own name
        layer = path.removeprefix("model.")
        role = _ROLES.get(attr, attr)
        scale, clipped = (float(module.last_stats[k]) for k in ("scale", "clipped_frac"))
        module.last_stats = None
        if per_layer:
            out[f"quant/{layer}/{role}_scale"] = scale
            out[f"quant/{layer}/{role}_clipped_frac"] = clipped
        parent = model.get_submodule(path) if path else model
        if role == "w":
            group = "embedding" if isinstance(parent, QuantEmbedding) else "weight"
        else:
            group = "act" if role == "a" else "attention"
        groups[group].append((scale, clipped))
    for group, values in groups.items():
        out[f"quant/{group}/scale_mean"] = sum(v[0] for v in values) / len(values)
        out[f"quant/{group}/clipped_frac_mean"] = sum(v[1] for v in values) / len(values)
        out[f"quant/{group}/clipped_frac_max"] = max(v[1] for v in values)
    return out
