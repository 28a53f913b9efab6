"""The packed export's on-disk format: file names, the manifest, and its integrity checks.

An export directory holds:

- `packed.safetensors`: every quantized weight as its integer codes packed at their width
  (`dq_lightning.export.packing`: ternary and 2-bit four to a byte, 3-bit eight in three bytes, 4-bit two to a
  byte, 8-bit as int8), under `<weight>.codes`, with its FP32 scales (one per row, or one per tensor) under
  `<weight>.scale`; biases, LayerNorms, positional embeddings and `final_logits_bias` in FP32 under their
  transformers names; the state of activation quantizers (LSQ steps) under `<module>.input_quantizer.*`.
  The tied token embedding / LM head is stored once.
- `config.json`, `generation_config.json`: the student's transformers config (its reduced depth) and the
  task's decoding settings.
- the tokenizer files (the teacher's tokenizer, which the student was trained with).
- `dq_export.json`, the manifest: format and version, the `QuantConfig`, which stored tensor each model
  weight comes from (bits, method, shape; aliases for tied weights), which Linear inputs are quantized and
  how, and an integrity table: shape, dtype and sha256 of every stored tensor, and size and sha256 of every
  file of the directory; last, `manifest_sha256`, the sha256 of the manifest's own content (every other key,
  as canonical JSON).

A missing, altered or truncated tensor or file is a `UserError` naming it, never a silently different model.
The manifest is not only an index: its activation-quantizer settings, quantization config, attention choice
and recorded source length change what the model computes. So no field of it is trusted on its own: any
edit to any field (or a removed or added one) changes its content hash and the export is refused, whether
or not that field influences generation.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dq_lightning.errors import UserError, first_line

FORMAT = "dq_lightning.packed"
# 2: the manifest checksums itself (`manifest_sha256`). Version 1 exports did not, so an edited setting of
# theirs could not be told from the exported one: they are refused, to be exported again.
VERSION = 2
DIGEST_KEY = "manifest_sha256"
MANIFEST = "dq_export.json"
WEIGHTS = "packed.safetensors"
MODEL_CLASSES = ("BartForConditionalGeneration", "MBartForConditionalGeneration")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_tensor(tensor: Tensor) -> str:
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy().tobytes() if data.numel() else b"").hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def manifest_digest(manifest: dict[str, Any]) -> str:
    """The sha256 of every field of `manifest` but the digest itself, as canonical JSON (sorted keys, no
    spaces): formatting and key order do not change it, any value does."""
    content = {key: value for key, value in manifest.items() if key != DIGEST_KEY}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def with_digest(manifest: dict[str, Any]) -> dict[str, Any]:
    """`manifest` with its `manifest_sha256` as its last field."""
    return {**{key: value for key, value in manifest.items() if key != DIGEST_KEY},
            DIGEST_KEY: manifest_digest(manifest)}


def read_manifest(directory: str | Path, flag: str = "--model") -> dict[str, Any]:
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise UserError(f"{flag} {directory}: no such directory")
    path = directory / MANIFEST
    if not path.is_file():
        raise UserError(f"{flag} {directory}: not a packed export (no {MANIFEST}); make one with "
                        "python -m dq_lightning export --ckpt <student checkpoint> --out <dir>")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{flag} {directory}: {MANIFEST} is unreadable ({first_line(error)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{flag} {directory}: {MANIFEST} is not a {FORMAT} manifest")
    if manifest.get("version") == 1 and DIGEST_KEY not in manifest:
        raise UserError(f"{flag} {directory}: packed format version 1, whose manifest settings are not "
                        f"checksummed; export the checkpoint again (python -m dq_lightning export --ckpt <student "
                        f"checkpoint> --out {directory})")
    if manifest.get("version") != VERSION:
        raise UserError(f"{flag} {directory}: packed format version {manifest.get('version')!r}; this "
                        f"dq_lightning reads version {VERSION}")
    if manifest.get(DIGEST_KEY) != manifest_digest(manifest):
        what = "has no manifest_sha256" if DIGEST_KEY not in manifest else "is altered (its content no longer " \
            "matches its manifest_sha256)"
        raise UserError(f"{flag} {directory}: {MANIFEST} {what}; a setting in it changes what the model computes, "
                        f"so it is not loaded: export the checkpoint again")
    for key in ("model_class", "weights", "aliases", "tensors", "files", "activation_quantizers",
                "attention_quantizers", "quant"):
        if key not in manifest:
            raise UserError(f"{flag} {directory}: {MANIFEST} has no {key!r} entry (altered or incomplete)")
    if manifest["model_class"] not in MODEL_CLASSES:
        raise UserError(f"{flag} {directory}: model class {manifest['model_class']!r} is not one of "
                        f"{', '.join(MODEL_CLASSES)}")
    return manifest


def verify_files(directory: Path, manifest: dict[str, Any], flag: str = "--model") -> None:
    """Every file the export wrote is present with its size and checksum (the weights file is checked
    tensor by tensor in `read_tensors`, then as a whole)."""
    for name, entry in manifest["files"].items():
        if name == manifest.get("weights_file", WEIGHTS):
            continue
        path = directory / name
        if not path.is_file():
            raise UserError(f"{flag} {directory}: file {name} is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            state = "truncated" if size < entry["bytes"] else "altered"
            raise UserError(f"{flag} {directory}: file {name} is {state} ({size} bytes, the export wrote "
                            f"{entry['bytes']})")
        if sha256_file(path) != entry["sha256"]:
            raise UserError(f"{flag} {directory}: file {name} is altered (its sha256 differs from the manifest's)")


def read_tensors(directory: Path, manifest: dict[str, Any], flag: str = "--model") -> dict[str, Tensor]:
    """The stored tensors, each checked against the manifest (presence, dtype, shape, sha256), then the
    whole file (size, sha256)."""
    from safetensors import safe_open

    name = manifest.get("weights_file", WEIGHTS)
    path = directory / name
    if not path.is_file():
        raise UserError(f"{flag} {directory}: file {name} is missing")
    recorded = manifest["files"].get(name, {})
    size = path.stat().st_size
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # noqa: BLE001 - safetensors reports a bad file as SafetensorError and others
        state = "truncated" if size < recorded.get("bytes", 0) else "corrupt"
        raise UserError(f"{flag} {directory}: file {name} is {state} ({size} bytes, the export wrote "
                        f"{recorded.get('bytes')}; {first_line(error)})") from None
    table = manifest["tensors"]
    for key, entry in table.items():
        if key not in tensors:
            raise UserError(f"{flag} {directory}: tensor {key} is missing from {name}")
        tensor = tensors[key]
        if dtype_name(tensor.dtype) != entry["dtype"] or list(tensor.shape) != entry["shape"]:
            raise UserError(f"{flag} {directory}: tensor {key} in {name} is {dtype_name(tensor.dtype)} "
                            f"{list(tensor.shape)}, the manifest records {entry['dtype']} {entry['shape']}")
        if sha256_tensor(tensor) != entry["sha256"]:
            raise UserError(f"{flag} {directory}: tensor {key} in {name} is altered (its sha256 differs from "
                            "the manifest's)")
    extra = sorted(set(tensors) - set(table))
    if extra:
        raise UserError(f"{flag} {directory}: {name} holds tensor {extra[0]} that the manifest does not list")
    if size != recorded.get("bytes") or sha256_file(path) != recorded.get("sha256"):
        raise UserError(f"{flag} {directory}: file {name} is altered (its size or sha256 differs from the "
                        "manifest's)")
    return tensors
