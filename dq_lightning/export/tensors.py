"""Between a converted student and the stored tensors: what an export stores, and the codes it reads back."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn

from dq_lightning.errors import UserError
from dq_lightning.export.packing import pack, packed_numel, unpack


def describe_quantizer(quantizer) -> dict[str, Any]:
    """The manifest's entry of a quantizer: its spec (`QuantizerSpec`), from which `load_packed` rebuilds it."""
    return asdict(quantizer.spec)


def collect_tensors(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """What to store for a converted student: {stored name: tensor} and the structure part of the manifest
    (weights, aliases, activation and attention quantizers)."""
    from dq_lightning.quant.modules import (ATTENTION_QUANTIZER_ATTR, AttentionInputQuantizer, ConvertedEmbedding,
                                            ConvertedLinear, QuantLinear)
    from dq_lightning.quant.quantizers import FakeQuantizer

    stored: dict[str, Tensor] = {}
    weights: dict[str, dict[str, Any]] = {}
    aliases: dict[str, str] = {}
    activation: dict[str, dict[str, Any]] = {}
    attention: dict[str, dict[str, Any]] = {}
    packed_names: dict[int, str] = {}
    quantizer_prefixes: list[str] = []

    def store_state(prefix: str, module: nn.Module) -> dict[str, str]:
        names = {}
        for key, value in module.state_dict().items():
            stored[f"{prefix}.{key}"] = value.detach().clone()
            names[key] = f"{prefix}.{key}"
        return names

    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, (FakeQuantizer, AttentionInputQuantizer)):
            quantizer_prefixes.append(name + ".")
        if isinstance(module, (ConvertedLinear, ConvertedEmbedding)):
            weight_name, packed = f"{name}.weight", module.packed
            if id(packed) in packed_names:
                aliases[weight_name] = packed_names[id(packed)]
            else:
                packed_names[id(packed)] = weight_name
                codes = packed.codes
                bits = packed.bits
                stored_codes = pack(codes, bits)
                stored[f"{weight_name}.codes"] = stored_codes.view(torch.int8) if bits == 8 else stored_codes
                stored[f"{weight_name}.scale"] = packed.scale.detach().clone()
                weights[weight_name] = {"codes": f"{weight_name}.codes", "scale": f"{weight_name}.scale",
                                        "bits": bits, "method": packed.method, "shape": list(codes.shape)}
        if isinstance(module, (ConvertedLinear, QuantLinear)) and module.input_quantizer is not None \
                and name not in activation:
            activation[name] = {**describe_quantizer(module.input_quantizer),
                                "state": store_state(f"{name}.input_quantizer", module.input_quantizer)}
        attention_quantizer = getattr(module, ATTENTION_QUANTIZER_ATTR, None)
        if isinstance(attention_quantizer, AttentionInputQuantizer) and name not in attention:
            attention[name] = {"state": store_state(f"{name}.{ATTENTION_QUANTIZER_ATTR}", attention_quantizer)}

    float_names: dict[int, str] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if ".packed." in key or any(key.startswith(prefix) for prefix in quantizer_prefixes):
            continue
        if id(value) in float_names:
            aliases[key] = float_names[id(value)]
            continue
        float_names[id(value)] = key
        stored[key] = value.detach().clone()
        weights[key] = {"tensor": key}
    structure = {"weights": weights, "aliases": aliases, "activation_quantizers": activation,
                 "attention_quantizers": attention}
    return stored, structure


def check_structure(model: nn.Module, structure: dict[str, Any]) -> None:
    """The stored weights and aliases must be exactly the state of a standard model of this config."""
    from transformers import AutoModelForSeq2SeqLM

    with torch.device("meta"):
        standard = AutoModelForSeq2SeqLM.from_config(model.config)
    expected = set(standard.state_dict())
    have = set(structure["weights"]) | set(structure["aliases"])
    if expected != have:
        raise RuntimeError(f"export does not cover the standard model's state: missing {sorted(expected - have)[:5]}, "
                           f"extra {sorted(have - expected)[:5]}")


def unpacked_codes(entry: dict[str, Any], tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(int8 codes in the weight's shape, scale) of a packed weight."""
    shape = entry["shape"]
    numel = 1
    for dim in shape:
        numel *= dim
    stored = tensors[entry["codes"]]
    if stored.numel() != packed_numel(numel, entry["bits"]):
        raise UserError(f"tensor {entry['codes']} holds {stored.numel()} bytes, not {entry['bits']}-bit codes "
                        f"of shape {shape}")
    codes = unpack(stored, entry["bits"], numel).reshape(shape)
    return codes, tensors[entry["scale"]]


def module_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr

