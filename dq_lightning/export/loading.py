"""Loading a packed export back (`load_packed`) as a standard transformers BART/mBART model.

The model's weights are the dequantized codes (`code * scale`, the numbers the fake-quantized student computes
with) and its quantized Linear layers keep the student's activation quantizer (`dq_lightning.export.runtime`),
so `generate` returns the fake-quantized student's tokens. With `int8=True` those Linear layers run as int8
GEMMs instead.

Nothing from a model directory is executed: tensors are read with safetensors, configs as JSON, and only
BART/mBART model classes are instantiated.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dq_lightning.errors import UserError, first_line
from dq_lightning.export.manifest import MANIFEST, read_manifest, read_tensors, verify_files
from dq_lightning.export.runtime import (attach_input_clip, attach_input_quantizer, int8_available, int8_linear,
                                         kernel_rounding_suffices)
from dq_lightning.export.tensors import module_and_attr, unpacked_codes


def load_packed(directory: str | Path, int8: bool = False, attn_implementation: str | None = None,
                flag: str = "--model"):
    """A standard transformers BART/mBART model from a packed export, verified against its manifest.

    Args:
        directory: what `export_student` wrote.
        int8: run every quantized Linear (the LM head included) as a dynamic int8 GEMM on the exported codes
            (`dq_lightning.export.runtime.int8_linear`), and look the token embedding up in its int8 codes
            (`ConvertedEmbedding`: code * row scale, computed for the looked-up rows only). Without it,
            weights are the dequantized codes in FP32, the modules are the standard transformers ones, and
            `generate` equals the fake-quantized student's token for token.
        attn_implementation: "eager" or "sdpa"; default the one the student was trained with. A student
            that quantizes attention inputs always uses its quantized attention.
    """
    from transformers import GenerationConfig

    directory = Path(directory).expanduser()
    where = f"{flag} {directory}"
    manifest = read_manifest(directory, flag)
    verify_files(directory, manifest, flag)
    tensors = read_tensors(directory, manifest, flag)
    if int8 and not int8_available():
        raise UserError("--int8: this PyTorch build has no quantized CPU engine (fbgemm/x86/qnnpack)")
    model = _meta_model(directory, manifest, attn_implementation, where)
    weights = _StoredWeights(manifest, tensors)
    from_codes = _load_float_weights(model, weights, int8, where)
    int8_linears = _swap_in_code_modules(model, weights, from_codes)
    _attach_activation_quantizers(model, manifest, tensors, int8_linears, where)
    if manifest["attention_quantizers"]:
        _attach_attention_quantizers(model, manifest, tensors, where)

    leftover = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if leftover:
        raise UserError(f"{where}: no stored value for {leftover[0]}")
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(directory))
    model.eval().requires_grad_(False)
    model.dq_export = manifest
    return model


def _meta_model(directory: Path, manifest: dict[str, Any], attn_implementation: str | None, where: str):
    """The manifest's model class built from config.json on the meta device (its weights are assigned later)."""
    from transformers import AutoConfig, BartForConditionalGeneration, MBartForConditionalGeneration

    try:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except Exception as error:  # noqa: BLE001
        raise UserError(f"{where}: cannot read config.json ({first_line(error)})") from None
    model_class = {"BartForConditionalGeneration": BartForConditionalGeneration,
                   "MBartForConditionalGeneration": MBartForConditionalGeneration}[manifest["model_class"]]
    attn = attn_implementation or manifest.get("attn_implementation") or "eager"
    if manifest["attention_quantizers"]:
        attn = "eager"  # replaced by the quantized attention in _attach_attention_quantizers
    try:
        with torch.device("meta"):
            return model_class._from_config(config, attn_implementation=attn)
    except Exception as error:  # noqa: BLE001
        raise UserError(f"{where}: cannot build a {manifest['model_class']} from config.json "
                        f"({first_line(error)})") from None


class _StoredWeights:
    """The manifest's weights over the stored tensors; each packed weight is unpacked (and dequantized) once."""

    def __init__(self, manifest: dict[str, Any], tensors: dict[str, Tensor]):
        self.entries, self.aliases, self.tensors = manifest["weights"], manifest["aliases"], tensors
        self._codes: dict[str, tuple[Tensor, Tensor]] = {}
        self._dequantized: dict[str, Tensor] = {}

    def codes(self, name: str) -> tuple[Tensor, Tensor]:
        if name not in self._codes:
            self._codes[name] = unpacked_codes(self.entries[name], self.tensors)
        return self._codes[name]

    def float_weight(self, name: str) -> Tensor:
        entry = self.entries[name]
        if "tensor" in entry:
            return self.tensors[entry["tensor"]]
        if name not in self._dequantized:
            weight_codes, scale = self.codes(name)
            self._dequantized[name] = weight_codes.to(scale.dtype) * scale  # what PackedWeight.dequantize computes
        return self._dequantized[name]


def _load_float_weights(model: nn.Module, weights: _StoredWeights, int8: bool, where: str) -> dict[str, str]:
    """Assign every weight that is loaded as a float tensor; return the others, {weight name: the packed weight
    it is built from} (with int8, quantized Linear layers and token embeddings are built from the codes)."""
    from_codes_types = (nn.Linear, nn.Embedding) if int8 else ()
    modules = dict(model.named_modules(remove_duplicate=False))
    state: dict[str, Tensor] = {}
    from_codes: dict[str, str] = {}
    try:
        for name in [*weights.entries, *weights.aliases]:
            target = weights.aliases.get(name, name)
            if "codes" in weights.entries[target] and isinstance(modules.get(name.removesuffix(".weight")),
                                                                 from_codes_types):
                from_codes[name] = target
            else:
                state[name] = weights.float_weight(target)
    except KeyError as error:
        raise UserError(f"{where}: {MANIFEST} refers to {error}, which is not stored") from None
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) != set(from_codes):
        raise UserError(f"{where}: the stored weights do not fit config.json's {type(model).__name__} "
                        f"(missing {sorted(set(missing) - set(from_codes))[:3]}, unexpected {unexpected[:3]})")
    # One Parameter per tied group, as in a freshly loaded model.
    for alias, target in weights.aliases.items():
        if alias in state and target in state:
            parent, attr = module_and_attr(model, alias)
            source_parent, source_attr = module_and_attr(model, target)
            setattr(parent, attr, getattr(source_parent, source_attr))
    return from_codes


def _swap_in_code_modules(model: nn.Module, weights: _StoredWeights, from_codes: dict[str, str]) -> set[int]:
    """Replace the modules of `from_codes` by int8 Linears and code-lookup embeddings (tied modules share
    one); return the ids of the int8 Linears."""
    from dq_lightning.quant.modules import ConvertedEmbedding, PackedWeight

    replaced: dict[tuple[int, str], nn.Module] = {}  # (id of the replaced module, packed weight) -> new
    packed_embeddings: dict[str, PackedWeight] = {}
    for name, target in from_codes.items():
        parent, attr = module_and_attr(model, name.removesuffix(".weight"))
        original = getattr(parent, attr)
        key = (id(original), target)
        if key not in replaced:
            weight_codes, scale = weights.codes(target)
            if isinstance(original, nn.Linear):
                replaced[key] = int8_linear(weight_codes, scale, original.bias)
            else:  # the token embedding: int8 codes looked up and scaled per row, shared by its tied modules
                if target not in packed_embeddings:
                    entry = weights.entries[target]
                    packed_embeddings[target] = PackedWeight(weight_codes, scale, entry["bits"], entry["method"])
                replaced[key] = ConvertedEmbedding(packed_embeddings[target], original.padding_idx,
                                                   getattr(original, "embed_scale", None))
        setattr(parent, attr, replaced[key])
    return {id(module) for module in replaced.values() if not isinstance(module, ConvertedEmbedding)}


def _attach_activation_quantizers(model: nn.Module, manifest: dict[str, Any], tensors: dict[str, Tensor],
                                  int8_linears: set[int], where: str) -> None:
    """Give each quantized Linear its input quantizer back (on the int8 path, a clip where the kernel's own
    rounding is the quantizer's)."""
    from dq_lightning.quant.quantizers import QuantizerSpec, make_activation_quantizer

    for name, entry in manifest["activation_quantizers"].items():
        try:
            linear = model.get_submodule(name)
            spec = QuantizerSpec(entry["method"], entry["bits"], entry["granularity"], entry["clip"])
            quantizer = make_activation_quantizer(**asdict(spec))
            quantizer.load_state_dict({key: tensors[stored] for key, stored in entry["state"].items()})
        except (AttributeError, KeyError, ValueError, RuntimeError) as error:
            raise UserError(f"{where}: activation quantizer of {name} cannot be rebuilt "
                            f"({first_line(error)})") from None
        if id(linear) in int8_linears and kernel_rounding_suffices(quantizer):
            attach_input_clip(linear, quantizer.clip)
        else:
            attach_input_quantizer(linear, quantizer)


def _attach_attention_quantizers(model: nn.Module, manifest: dict[str, Any], tensors: dict[str, Tensor],
                                 where: str) -> None:
    """Rebuild the attention-operand quantizers from the manifest's `QuantConfig` and switch the model to the
    quantized attention."""
    from dq_lightning.quant.config import QuantConfig
    from dq_lightning.quant.modules import (ATTENTION_IMPLEMENTATION, ATTENTION_QUANTIZER_ATTR,
                                            AttentionInputQuantizer, register_quantized_attention)

    try:
        quant = QuantConfig(**manifest["quant"])
    except (TypeError, UserError) as error:  # written by a dq_lightning whose QuantConfig had other fields
        raise UserError(f"{where}: the manifest's quant settings cannot be rebuilt ({first_line(error)}); "
                        "export the checkpoint again with this dq_lightning") from None
    for name, entry in manifest["attention_quantizers"].items():
        quantizer = AttentionInputQuantizer(quant)
        try:
            quantizer.load_state_dict({key: tensors[stored] for key, stored in entry["state"].items()})
            setattr(model.get_submodule(name), ATTENTION_QUANTIZER_ATTR, quantizer)
        except (AttributeError, KeyError, RuntimeError) as error:
            raise UserError(f"{where}: attention quantizer of {name} cannot be rebuilt "
                            f"({first_line(error)})") from None
    register_quantized_attention()
    model.set_attn_implementation(ATTENTION_IMPLEMENTATION)
