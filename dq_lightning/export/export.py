"""Packed export of a DQ student (`export_student`, `python -m dq_lightning export`) and loading it back
(`load_packed`).

    python -m dq_lightning export --ckpt runs/xsum/dq-tiny/checkpoints/last.ckpt --out runs/xsum/dq-tiny/packed

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
  file of the directory.

`load_packed(dir)` verifies all of it (a missing, altered or truncated tensor or file is a `UserError` naming
it, never a silently different model) and rebuilds a standard `BartForConditionalGeneration` /
`MBartForConditionalGeneration` whose weights are the dequantized codes (`code * scale`, the numbers the
fake-quantized student computes with) and whose quantized Linear layers keep the student's activation
quantizer (see `dq_lightning.export.runtime`), so `generate` returns the fake-quantized student's tokens.
`load_packed(dir, int8=True)` runs those Linear layers as int8 GEMMs instead.

Nothing from a model directory or a checkpoint is executed: checkpoints are read with
`torch.load(weights_only=True)`, tensors with safetensors, configs as JSON, and only BART/mBART model classes
are instantiated.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dq_lightning.errors import UserError
from dq_lightning.files import replace_directory, staging_directory
from dq_lightning.export.packing import pack, packed_numel, unpack
from dq_lightning.export.runtime import (attach_input_clip, attach_input_quantizer, int8_available, int8_linear,
                                         kernel_rounding_suffices)

FORMAT = "dq_lightning.packed"
VERSION = 1
MANIFEST = "dq_export.json"
WEIGHTS = "packed.safetensors"
MODEL_CLASSES = ("BartForConditionalGeneration", "MBartForConditionalGeneration")
STUDENT_KEYS = ("teacher", "mode", "w_bits", "e_bits", "a_bits")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "uint8": torch.uint8,
           "int8": torch.int8, "bool": torch.bool, "int64": torch.int64}


# -- reading a checkpoint ----------------------------------------------------------------------------------
def read_checkpoint(path: str | Path, flag: str = "--ckpt") -> dict[str, Any]:
    """A Lightning checkpoint of a `DQStudentModule`, read with `torch.load(weights_only=True)`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a bad file raises many types (pickle, zip, EOF, weights_only)
        raise UserError(f"{flag} {path}: cannot read it as a checkpoint with torch.load(weights_only=True) "
                        f"({_first_line(error)})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise UserError(f"{flag} {path}: not a Lightning checkpoint (no state_dict)")
    hparams = checkpoint.get("hyper_parameters")
    class_path = hparams.get("_class_path", "") if isinstance(hparams, dict) else ""
    if (not isinstance(hparams, dict) or not all(key in hparams for key in STUDENT_KEYS)
            or (class_path and not class_path.endswith("DQStudentModule"))):
        if isinstance(hparams, dict) and class_path:
            what = f"it holds a {class_path.rpartition('.')[2]}"
        elif isinstance(hparams, dict) and "model" in hparams and "teacher" not in hparams:
            what = f"it looks like a TeacherModule checkpoint (model={hparams['model']})"
        else:
            what = "its hyper-parameters name no teacher, mode and bits"
        raise UserError(f"{flag} {path}: not a DQ student checkpoint ({what}); export packs the checkpoint of a "
                        "DQStudentModule run (python -m dq_lightning fit --config experiments/<task>/dq-*.yaml)")
    return checkpoint


def load_student(checkpoint_path: str | Path, teacher: str | None = None):
    """The `DQStudentModule` of a checkpoint, rebuilt from its hyper-parameters and teacher directory, its
    student prepared for quantization (and converted, if the checkpoint holds converted codes) and loaded,
    in eval mode. Returns (module, checkpoint)."""
    from dq_lightning.distill.module import DQStudentModule
    from dq_lightning.quant import convert, prepare

    checkpoint = read_checkpoint(checkpoint_path)
    hparams = checkpoint["hyper_parameters"]
    accepted = inspect.signature(DQStudentModule.__init__).parameters
    settings = {key: value for key, value in hparams.items() if key in accepted and key != "self"}
    if "recipe" not in hparams:
        # Written before recipes existed: trained with what is now recipe dq_lightning.
        settings["recipe"] = "dq_lightning"
        if hparams.get("quantize_attention_inputs"):
            settings["attention_quant"] = "asym_probs"
    if teacher is not None:
        settings["teacher"] = str(teacher)
    try:
        module = DQStudentModule(**settings)
    except UserError as error:
        hint = "" if teacher is not None else \
            " (the student is rebuilt from its teacher directory; pass --teacher DIR if it has moved)"
        raise UserError(f"{error}{hint}") from None
    if module.quant_config is None:
        raise UserError(f"--ckpt {checkpoint_path}: the student is not quantized; there is nothing to pack")
    student = prepare(module.model, module.quant_config)
    state = {key[len("model."):]: value for key, value in checkpoint["state_dict"].items()
             if key.startswith("model.")}
    if any(key.endswith(".packed.codes") for key in state):
        convert(student)
    missing, unexpected = student.load_state_dict(state, strict=False)
    if missing or unexpected:
        details = "; ".join(part for part in (
            f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}" if missing else "",
            f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}" if unexpected else "")
            if part)
        raise UserError(f"--ckpt {checkpoint_path}: its student does not match the model rebuilt from its "
                        f"hyper-parameters and teacher {settings['teacher']} ({details})")
    student.eval()
    return module, checkpoint


# -- export ----------------------------------------------------------------------------------------------
def _describe_quantizer(quantizer) -> dict[str, Any]:
    return {"method": quantizer.method, "bits": quantizer.bits, "granularity": quantizer.granularity,
            "clip": quantizer.clip}


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
            activation[name] = {**_describe_quantizer(module.input_quantizer),
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


def _check_structure(model: nn.Module, structure: dict[str, Any]) -> None:
    """The stored weights and aliases must be exactly the state of a standard model of this config."""
    from transformers import AutoModelForSeq2SeqLM

    with torch.device("meta"):
        standard = AutoModelForSeq2SeqLM.from_config(model.config)
    expected = set(standard.state_dict())
    have = set(structure["weights"]) | set(structure["aliases"])
    if expected != have:
        raise RuntimeError(f"export does not cover the standard model's state: missing {sorted(expected - have)[:5]}, "
                           f"extra {sorted(have - expected)[:5]}")


def resolve_task(checkpoint: dict[str, Any], teacher: str, task: str | None):
    """The task whose decoding settings the student uses: `task`, else the checkpoint's DataModule class
    (LightningCLI records it), else the teacher directory's `dq_lightning.json`; None if none says."""
    from dq_lightning.data.datamodule import DATAMODULES
    from dq_lightning.data.tasks import get_task

    if task is not None:
        return get_task(task)
    data = checkpoint.get("datamodule_hyper_parameters")
    class_name = str(data.get("_class_path", "")).rpartition(".")[2] if isinstance(data, dict) else ""
    for name, datamodule in DATAMODULES.items():
        if datamodule.__name__ == class_name:
            return get_task(name)
    name = hf_directory_task(Path(teacher).expanduser())
    return get_task(name) if name else None


def hf_directory_task(directory: Path):
    """The task a Hugging Face directory written by this project records (`dq_lightning.json`), or None; as
    written, so a value that names no task is the caller's to refuse."""
    try:
        return json.loads((directory / "dq_lightning.json").read_text()).get("task") or None
    except (OSError, ValueError, AttributeError):
        return None


def _generation_config(module, task, tokenizer):
    from transformers import GenerationConfig

    if task is not None:
        module.task, module.tokenizer = task, tokenizer
        try:
            return module.generation_config()
        finally:
            module.task = module.tokenizer = None
    settings = {**module.model.generation_config.to_dict(), **(module.hparams.get("generation") or {})}
    return GenerationConfig(**{k: v for k, v in settings.items() if not k.startswith("_")})


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_tensor(tensor: Tensor) -> str:
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy().tobytes() if data.numel() else b"").hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def export_student(checkpoint_path: str | Path, out_dir: str | Path, teacher: str | None = None,
                   tokenizer: str | None = None, task: str | None = None) -> dict[str, Any]:
    """Write the quantized student of a DQ student checkpoint as a packed directory (see the module
    docstring). Returns the manifest. Nothing in `out_dir` changes until the export is complete; over an
    earlier export only the files an export writes are replaced, other files are left alone (see
    `_export_files`). An existing directory that is neither empty nor a packed export is refused."""
    from safetensors.torch import save_file

    from dq_lightning.models.tokenizer import load_tokenizer
    from dq_lightning.quant import convert
    from dq_lightning.size import model_size

    out_dir = Path(out_dir).expanduser()
    _check_out_dir(out_dir)
    module, checkpoint = load_student(checkpoint_path, teacher)
    teacher_dir = str(module.hparams.teacher)
    try:
        tok = load_tokenizer(tokenizer or teacher_dir, flag="--tokenizer")
    except UserError as error:
        if tokenizer is not None:
            raise
        raise UserError(f"{error} (by default the teacher directory's tokenizer is shipped; pass --tokenizer "
                        "DIR)") from None
    task_spec = resolve_task(checkpoint, teacher_dir, task)
    if task_spec is not None and task_spec.source_lang and hasattr(tok, "src_lang"):
        tok.src_lang, tok.tgt_lang = task_spec.source_lang, task_spec.target_lang
    student = module.model
    generation = _generation_config(module, task_spec, tok)
    quant = module.quant_config
    attn_implementation = student.config._attn_implementation
    if not quant.quantizes_attention:
        attn_implementation = "eager"  # the library's attention function served only to return maps
    convert(student)  # int8 codes and scales: the numbers the fake-quantized forward computes with
    stored, structure = collect_tensors(student)
    _check_structure(student, structure)
    model_class = type(student).__name__
    if model_class not in MODEL_CLASSES:
        raise UserError(f"--ckpt {checkpoint_path}: the student is a {model_class}; export supports "
                        f"{' and '.join(MODEL_CLASSES)}")

    teacher_config = module.teacher.config
    depth = dict(encoder_layers=len(module.encoder_map), decoder_layers=len(module.decoder_map))
    strict = model_size(teacher_config, quant, convention="strict", **depth)
    paper = model_size(teacher_config, quant, convention="paper", **depth)

    with _export_files(out_dir) as staging:
        student.config.save_pretrained(staging)
        generation.save_pretrained(staging)
        tok.save_pretrained(str(staging))
        save_file({name: tensor.contiguous() for name, tensor in stored.items()}, str(staging / WEIGHTS),
                  metadata={"format": f"{FORMAT} {VERSION}"})  # one key: safetensors writes several in random order
        files = {}
        for path in sorted(staging.rglob("*")):
            if path.is_file():
                files[path.relative_to(staging).as_posix()] = {"bytes": path.stat().st_size,
                                                               "sha256": sha256_file(path)}
        weights_bytes = files[WEIGHTS]["bytes"]
        teacher_file = Path(teacher_dir).expanduser() / "model.safetensors"
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "model_class": model_class,
            "attn_implementation": attn_implementation,
            "quant": quant.to_dict(),
            "notation": quant.notation,
            "recipe": module.hparams.get("recipe"),
            # The tied LM head always ships as the E-bit token embedding codes (what the sizes count); a
            # student trained with a full-precision head (the official recipe) was evaluated with another head.
            "lm_head": {"deployed": f"tied token embedding at {quant.e_bits} bits, input not quantized"
                        if not quant.quantize_lm_head else
                        f"tied token embedding at {quant.e_bits} bits, input at {quant.a_bits} bits",
                        "trained": "quantized" if quant.quantize_lm_head else "full_precision"},
            "weights_file": WEIGHTS,
            **structure,
            "tensors": {name: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape), "sha256": sha256_tensor(t)}
                        for name, t in stored.items()},
            "files": files,
            "student": {
                "checkpoint": str(Path(checkpoint_path).expanduser().resolve()),
                "global_step": checkpoint.get("global_step"), "epoch": checkpoint.get("epoch"),
                "teacher": teacher_dir, "mode": module.hparams.mode,
                "encoder_layer_map": module.encoder_map, "decoder_layer_map": module.decoder_map,
            },
            "task": None if task_spec is None else {
                "name": task_spec.name, "source_lang": task_spec.source_lang, "target_lang": task_spec.target_lang,
                "max_source_length": task_spec.max_source_length},
            "size": {
                "weights_bytes": weights_bytes,
                "strict_bytes": strict.size_bits / 8,
                "weights_vs_strict": weights_bytes / (strict.size_bits / 8),
                "strict_compression": strict.compression,
                "paper_compression": paper.compression,
                "teacher_strict_bytes": strict.teacher_bits / 8,
                "teacher_file_bytes": teacher_file.stat().st_size if teacher_file.is_file() else None,
            },
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _check_out_dir(out_dir: Path) -> None:
    """Refuse, before the (slow) student is rebuilt, an `--out` that cannot become an export directory."""
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST).exists())):
        raise UserError(f"--out {out_dir}: exists and is not a packed export; choose a new directory")
    existing = next(path for path in (out_dir, *out_dir.parents) if path.exists() or path == path.parent)
    if not existing.is_dir():
        raise UserError(f"--out {out_dir}: {existing} is a file, so no directory can be made below it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {out_dir}: no permission to write in {existing}")


@contextlib.contextmanager
def _export_files(out_dir: Path) -> Iterator[Path]:
    """Yield an empty staging directory; when the block succeeds, its files become the export in `out_dir`.

    A new `out_dir` is the staging directory renamed (`replace_directory`). An existing one (empty, or an
    earlier export) keeps every file the export does not write: users keep notes, predictions or benchmark
    results beside a model. The staging directory is then inside `out_dir`, so each file moves in with an
    atomic rename on the same filesystem, the manifest last: a crash midway leaves the previous manifest,
    whose checksums `load_packed` finds no longer match, never a mix that loads. Files the previous export
    wrote (its manifest lists them) that this one does not are removed. OSErrors become a `UserError`
    naming `--out`; a failed block leaves `out_dir` as it was.
    """
    try:
        if not out_dir.is_dir():
            with replace_directory(out_dir) as staging:
                yield staging
            return
        previous = []
        if (out_dir / MANIFEST).is_file():
            try:
                previous = list(json.loads((out_dir / MANIFEST).read_text()).get("files", {}))
            except (ValueError, AttributeError):
                previous = []  # an unreadable manifest: replace what this export writes, remove nothing else
        staging = staging_directory(out_dir, ".dq_export.staging.")
        try:
            yield staging
            written = sorted((path.relative_to(staging) for path in staging.rglob("*") if path.is_file()),
                             key=lambda rel: rel.as_posix() == MANIFEST)
            for rel in written:
                (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / rel, out_dir / rel)
            stale = set(previous) - {rel.as_posix() for rel in written} - {MANIFEST}
            for name in stale:
                target = out_dir / name
                if target.is_file() and target.resolve().is_relative_to(out_dir.resolve()):
                    target.unlink()
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as error:
        where = f" ({error.filename})" if error.filename else ""
        raise UserError(f"--out {out_dir}: cannot write the export: {error.strerror or error}{where}") from None


# -- loading ---------------------------------------------------------------------------------------------
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
        raise UserError(f"{flag} {directory}: {MANIFEST} is unreadable ({_first_line(error)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{flag} {directory}: {MANIFEST} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise UserError(f"{flag} {directory}: packed format version {manifest.get('version')!r}; this "
                        f"dq_lightning reads version {VERSION}")
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
                        f"{recorded.get('bytes')}; {_first_line(error)})") from None
    table = manifest["tensors"]
    for key, entry in table.items():
        if key not in tensors:
            raise UserError(f"{flag} {directory}: tensor {key} is missing from {name}")
        tensor = tensors[key]
        if _dtype_name(tensor.dtype) != entry["dtype"] or list(tensor.shape) != entry["shape"]:
            raise UserError(f"{flag} {directory}: tensor {key} in {name} is {_dtype_name(tensor.dtype)} "
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


def _unpacked(entry: dict[str, Any], tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
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


def _module_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


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
    from transformers import AutoConfig, GenerationConfig
    from transformers import BartForConditionalGeneration, MBartForConditionalGeneration

    from dq_lightning.quant.config import QuantConfig
    from dq_lightning.quant.modules import (ATTENTION_IMPLEMENTATION, ATTENTION_QUANTIZER_ATTR,
                                            AttentionInputQuantizer, ConvertedEmbedding, PackedWeight,
                                            register_quantized_attention)
    from dq_lightning.quant.quantizers import make_activation_quantizer

    directory = Path(directory).expanduser()
    manifest = read_manifest(directory, flag)
    verify_files(directory, manifest, flag)
    tensors = read_tensors(directory, manifest, flag)
    if int8 and not int8_available():
        raise UserError("--int8: this PyTorch build has no quantized CPU engine (fbgemm/x86/qnnpack)")
    try:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except Exception as error:  # noqa: BLE001
        raise UserError(f"{flag} {directory}: cannot read config.json ({_first_line(error)})") from None
    model_class = {"BartForConditionalGeneration": BartForConditionalGeneration,
                   "MBartForConditionalGeneration": MBartForConditionalGeneration}[manifest["model_class"]]
    attention_quantized = bool(manifest["attention_quantizers"])
    attn = attn_implementation or manifest.get("attn_implementation") or "eager"
    if attention_quantized:
        attn = "eager"  # replaced by the quantized attention below
    try:
        with torch.device("meta"):
            model = model_class._from_config(config, attn_implementation=attn)
    except Exception as error:  # noqa: BLE001
        raise UserError(f"{flag} {directory}: cannot build a {manifest['model_class']} from config.json "
                        f"({_first_line(error)})") from None

    # With int8, quantized Linear layers and token embeddings are built from the codes themselves; every
    # other weight (and every weight without int8) is loaded as a float tensor.
    from_codes_types = (nn.Linear, nn.Embedding) if int8 else ()
    module_types = {name: module for name, module in model.named_modules(remove_duplicate=False)}
    weights, aliases = manifest["weights"], manifest["aliases"]
    codes: dict[str, tuple[Tensor, Tensor]] = {}
    dequantized: dict[str, Tensor] = {}

    def codes_of(name: str) -> tuple[Tensor, Tensor]:
        if name not in codes:
            codes[name] = _unpacked(weights[name], tensors)
        return codes[name]

    def float_weight(name: str) -> Tensor:
        entry = weights[name]
        if "tensor" in entry:
            return tensors[entry["tensor"]]
        if name not in dequantized:
            weight_codes, scale = codes_of(name)
            dequantized[name] = weight_codes.to(scale.dtype) * scale  # what PackedWeight.dequantize computes
        return dequantized[name]

    state: dict[str, Tensor] = {}
    from_codes: dict[str, str] = {}  # weight name -> the packed weight it is built from
    try:
        for name in [*weights, *aliases]:
            target = aliases.get(name, name)
            owner = module_types.get(name.removesuffix(".weight"))
            if "codes" in weights[target] and isinstance(owner, from_codes_types):
                from_codes[name] = target
            else:
                state[name] = float_weight(target)
    except KeyError as error:
        raise UserError(f"{flag} {directory}: {MANIFEST} refers to {error}, which is not stored") from None

    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) != set(from_codes):
        raise UserError(f"{flag} {directory}: the stored weights do not fit config.json's "
                        f"{manifest['model_class']} (missing {sorted(set(missing) - set(from_codes))[:3]}, "
                        f"unexpected {unexpected[:3]})")
    # One Parameter per tied group, as in a freshly loaded model.
    for alias, target in aliases.items():
        if alias in state and target in state:
            parent, attr = _module_and_attr(model, alias)
            source_parent, source_attr = _module_and_attr(model, target)
            setattr(parent, attr, getattr(source_parent, source_attr))

    int8_modules: dict[tuple[int, str], nn.Module] = {}  # (id of the replaced module, packed weight) -> new
    packed_embeddings: dict[str, PackedWeight] = {}
    for name, target in from_codes.items():
        parent, attr = _module_and_attr(model, name.removesuffix(".weight"))
        original = getattr(parent, attr)
        key = (id(original), target)
        if key not in int8_modules:
            weight_codes, scale = codes_of(target)
            if isinstance(original, nn.Linear):
                int8_modules[key] = int8_linear(weight_codes, scale, original.bias)
            else:  # the token embedding: int8 codes looked up and scaled per row, shared by its tied modules
                if target not in packed_embeddings:
                    packed_embeddings[target] = PackedWeight(weight_codes, scale, weights[target]["bits"],
                                                             weights[target]["method"])
                int8_modules[key] = ConvertedEmbedding(packed_embeddings[target], original.padding_idx,
                                                       getattr(original, "embed_scale", None))
        setattr(parent, attr, int8_modules[key])
    int8_linears = {id(module) for module in int8_modules.values() if not isinstance(module, ConvertedEmbedding)}

    for name, entry in manifest["activation_quantizers"].items():
        try:
            linear = model.get_submodule(name)
            quantizer = make_activation_quantizer(entry["bits"], entry["method"], entry["granularity"],
                                                  entry["clip"])
            quantizer.load_state_dict({key: tensors[stored] for key, stored in entry["state"].items()})
        except (AttributeError, KeyError, ValueError, RuntimeError) as error:
            raise UserError(f"{flag} {directory}: activation quantizer of {name} cannot be rebuilt "
                            f"({_first_line(error)})") from None
        if id(linear) in int8_linears and kernel_rounding_suffices(quantizer):
            attach_input_clip(linear, quantizer.clip)
        else:
            attach_input_quantizer(linear, quantizer)
    if attention_quantized:
        quant = QuantConfig(**_current_quant_fields(manifest["quant"]))
        for name, entry in manifest["attention_quantizers"].items():
            quantizer = AttentionInputQuantizer(quant)
            try:
                quantizer.load_state_dict({key: tensors[stored] for key, stored in entry["state"].items()})
                setattr(model.get_submodule(name), ATTENTION_QUANTIZER_ATTR, quantizer)
            except (AttributeError, KeyError, RuntimeError) as error:
                raise UserError(f"{flag} {directory}: attention quantizer of {name} cannot be rebuilt "
                                f"({_first_line(error)})") from None
        register_quantized_attention()
        model.set_attn_implementation(ATTENTION_IMPLEMENTATION)

    leftover = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if leftover:
        raise UserError(f"{flag} {directory}: no stored value for {leftover[0]}")
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(directory))
    model.eval().requires_grad_(False)
    model.dq_export = manifest
    return model


def _current_quant_fields(quant: dict[str, Any]) -> dict[str, Any]:
    """A manifest's `QuantConfig` fields; exports written before recipes existed name fewer of them."""
    quant = dict(quant)
    if "quantize_attention_inputs" in quant:
        quant["attention_quant"] = "asym_probs" if quant.pop("quantize_attention_inputs") else "off"
        quant.setdefault("quantize_lm_head", True)
        quant.setdefault("embedding_granularity", quant.get("weight_granularity", "row"))
    return quant


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# -- command line ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dq_lightning export",
        description="Write a DQ student checkpoint as a packed low-bit directory: integer codes at their width "
                    "plus FP32 scales in safetensors, with config, tokenizer and a checksummed manifest. Load it "
                    "with dq_lightning.export.load_packed or `python -m dq_lightning predict --model DIR`.")
    parser.add_argument("--ckpt", required=True, metavar="FILE", help="a DQStudentModule checkpoint (.ckpt)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the export directory to write")
    parser.add_argument("--teacher", metavar="DIR", help="the teacher directory, if it moved since training "
                        "(default: the checkpoint's model.teacher)")
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer to ship (default: the teacher's)")
    parser.add_argument("--task", metavar="NAME", help="task whose decoding settings to ship (default: from the "
                        "checkpoint or the teacher directory)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        manifest = export_student(args.ckpt, args.out, teacher=args.teacher, tokenizer=args.tokenizer,
                                  task=args.task)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    size = manifest["size"]
    total = sum(entry["bytes"] for entry in manifest["files"].values())
    lines = [f"wrote {args.out}: {manifest['model_class']} W-E-A {manifest['notation']}, "
             f"{len(manifest['student']['encoder_layer_map'])} encoder / "
             f"{len(manifest['student']['decoder_layer_map'])} decoder layers",
             f"  {WEIGHTS}: {size['weights_bytes'] / 2**20:.3f} MiB "
             f"(strict accounting {size['strict_bytes'] / 2**20:.3f} "
             f"MiB, x{size['weights_vs_strict']:.3f}); directory with tokenizer: {total / 2**20:.3f} MiB",
             f"  compression vs FP32 teacher: strict {size['strict_compression']:.2f}x, paper "
             f"{size['paper_compression']:.2f}x"]
    if size.get("teacher_file_bytes"):
        lines.append(f"  file ratio vs the teacher's model.safetensors: "
                     f"{size['teacher_file_bytes'] / size['weights_bytes']:.2f}x")
    print("\n".join(lines))
    return 0
