"""Packed export of a DQ student: `export_student` and `python -m dq_lightning export`.

    python -m dq_lightning export --ckpt runs/xsum/dq-tiny/checkpoints/last.ckpt --out runs/xsum/dq-tiny/packed

The student is rebuilt from its checkpoint (`dq_lightning.export.checkpoint`), converted to integer codes,
its tensors collected (`dq_lightning.export.tensors`) and written with a checksummed manifest in the format
`dq_lightning.export.manifest` describes; `dq_lightning.export.loading.load_packed` reads it back.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import Tensor

from dq_lightning.errors import UserError
from dq_lightning.export.checkpoint import load_student, resolve_task, trained_source_length
from dq_lightning.export.manifest import (FORMAT, MANIFEST, MODEL_CLASSES, VERSION, WEIGHTS, dtype_name,
                                          sha256_file, sha256_tensor, with_digest)
from dq_lightning.export.tensors import check_structure, collect_tensors
from dq_lightning.files import replace_directory, staging_directory


def export_student(checkpoint_path: str | Path, out_dir: str | Path, teacher: str | None = None,
                   tokenizer: str | None = None, task: str | None = None) -> dict[str, Any]:
    """Write the quantized student of a DQ student checkpoint as a packed directory (the format:
    `dq_lightning.export.manifest`). Returns the manifest. Nothing in `out_dir` changes until the export is
    complete; over an earlier export only the files an export writes are replaced, other files are left alone
    (see `_export_files`). An existing directory that is neither empty nor a packed export is refused."""
    from safetensors.torch import save_file

    from dq_lightning.quant import convert

    out_dir = Path(out_dir).expanduser()
    check_out_dir(out_dir)
    module, checkpoint = load_student(checkpoint_path, teacher)
    teacher_dir = str(module.hparams.teacher)
    tok = _shipped_tokenizer(tokenizer, teacher_dir)
    task_spec = resolve_task(checkpoint, teacher_dir, task)
    if task_spec is not None and task_spec.source_lang and hasattr(tok, "src_lang"):
        tok.src_lang, tok.tgt_lang = task_spec.source_lang, task_spec.target_lang
    student = module.model
    generation = _generation_config(module, task_spec, tok)
    # Read before convert: the library's attention function served only to return maps, unless the attention
    # operands are quantized.
    attn_implementation = student.config._attn_implementation if module.quant_config.quantizes_attention \
        else "eager"
    convert(student)  # int8 codes and scales: the numbers the fake-quantized forward computes with
    stored, structure = collect_tensors(student)
    check_structure(student, structure)
    if type(student).__name__ not in MODEL_CLASSES:
        raise UserError(f"--ckpt {checkpoint_path}: the student is a {type(student).__name__}; export supports "
                        f"{' and '.join(MODEL_CLASSES)}")

    with export_files(out_dir) as staging:
        student.config.save_pretrained(staging)
        generation.save_pretrained(staging)
        tok.save_pretrained(str(staging))
        save_file({name: tensor.contiguous() for name, tensor in stored.items()}, str(staging / WEIGHTS),
                  metadata={"format": f"{FORMAT} {VERSION}"})  # one key: safetensors writes several in random order
        files = {path.relative_to(staging).as_posix(): {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
                 for path in sorted(staging.rglob("*")) if path.is_file()}
        manifest = with_digest(_manifest(module, checkpoint, checkpoint_path, task_spec, attn_implementation, stored,
                                         structure, files))
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def export_full_precision_student(checkpoint_path: str | Path, out_dir: str | Path,
                                  teacher: str | None = None) -> Path:
    """The full-precision student of a 32-32-32 (distill_only) checkpoint, which has nothing to pack, as a
    Hugging Face directory: its decoding settings, and the task, trained source length and teacher in
    `dq_lightning.json`, as `predict` and `robustness` read them."""
    from dq_lightning.modules.seq2seq import save_hf_directory

    module, checkpoint = load_student(checkpoint_path, teacher, quantized=False)
    teacher_dir = str(module.hparams.teacher)
    tok = _shipped_tokenizer(None, teacher_dir)
    task_spec = resolve_task(checkpoint, teacher_dir, None)
    task = _task(task_spec, trained_source_length(checkpoint)) or {}
    module.model.generation_config = _generation_config(module, task_spec, tok)
    info = {"task": task.get("name"), "max_source_length": task.get("max_source_length"), "teacher": teacher_dir,
            "checkpoint": str(Path(checkpoint_path).expanduser().resolve())}
    return save_hf_directory(module.model, tok, out_dir, {key: value for key, value in info.items() if value})


def _shipped_tokenizer(tokenizer: str | None, teacher_dir: str):
    """`--tokenizer`'s tokenizer, else the teacher directory's (the one the student was trained with)."""
    from dq_lightning.models.tokenizer import load_tokenizer

    try:
        return load_tokenizer(tokenizer or teacher_dir, flag="--tokenizer")
    except UserError as error:
        if tokenizer is not None:
            raise
        raise UserError(f"{error} (by default the teacher directory's tokenizer is shipped; pass --tokenizer "
                        "DIR)") from None


def _manifest(module, checkpoint: dict[str, Any], checkpoint_path: str | Path, task_spec, attn_implementation: str,
              stored: dict[str, Tensor], structure: dict[str, Any], files: dict[str, Any]) -> dict[str, Any]:
    """What `load_packed` needs besides the tensors, the integrity table, and where the student came from."""
    quant, student, teacher_dir = module.quant_config, module.model, str(module.hparams.teacher)
    return {
        "format": FORMAT,
        "version": VERSION,
        "model_class": type(student).__name__,
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
        "tensors": {name: {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "sha256": sha256_tensor(t)}
                    for name, t in stored.items()},
        "files": files,
        "student": {
            "checkpoint": str(Path(checkpoint_path).expanduser().resolve()),
            "global_step": checkpoint.get("global_step"), "epoch": checkpoint.get("epoch"),
            "teacher": teacher_dir, "mode": module.hparams.mode,
            "encoder_layer_map": module.encoder_map, "decoder_layer_map": module.decoder_map,
            "width": module.hparams.get("width"),
        },
        "task": _task(task_spec, trained_source_length(checkpoint)),
        "size": _sizes(module, files[WEIGHTS]["bytes"], teacher_dir),
    }


def _task(task_spec, trained_length: int | None) -> dict[str, Any] | None:
    """The task's name and languages, and the source length the student was trained and tested with (its
    DataModule's truncation, else the task's default), so that `predict` reads what it read."""
    if task_spec is None:
        return {"max_source_length": trained_length} if trained_length else None
    return {"name": task_spec.name, "source_lang": task_spec.source_lang, "target_lang": task_spec.target_lang,
            "max_source_length": trained_length or task_spec.max_source_length}


def _sizes(module, weights_bytes: int, teacher_dir: str) -> dict[str, Any]:
    """The written weights beside the size accounting of `dq_lightning.size` (both conventions)."""
    strict, paper = module.size_report("strict"), module.size_report("paper")
    teacher_file = Path(teacher_dir).expanduser() / "model.safetensors"
    return {
        "weights_bytes": weights_bytes,
        "strict_bytes": strict.size_bits / 8,
        "weights_vs_strict": weights_bytes / (strict.size_bits / 8),
        "strict_compression": strict.compression,
        "paper_compression": paper.compression,
        "teacher_strict_bytes": strict.teacher_bits / 8,
        "teacher_file_bytes": teacher_file.stat().st_size if teacher_file.is_file() else None,
    }


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



def check_out_dir(out_dir: Path, manifest: str = MANIFEST, what: str = "a packed export",
                   same_format=lambda path: True) -> None:
    """Refuse, before the (slow) student is rebuilt, an `--out` that cannot become an export directory: one
    holding other files than an earlier export of the same kind (`manifest`, for which `same_format` holds)."""
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (
            (out_dir / manifest).exists() and same_format(out_dir / manifest)))):
        raise UserError(f"--out {out_dir}: exists and is not {what} (it holds other files, which would be "
                        "mixed with the export or lost); choose a new or empty directory")
    existing = next(path for path in (out_dir, *out_dir.parents) if path.exists() or path == path.parent)
    if not existing.is_dir():
        raise UserError(f"--out {out_dir}: {existing} is a file, so no directory can be made below it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {out_dir}: no permission to write in {existing}")


@contextlib.contextmanager
def export_files(out_dir: Path, manifest: str = MANIFEST) -> Iterator[Path]:
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
        if (out_dir / manifest).is_file():
            try:
                previous = list(json.loads((out_dir / manifest).read_text()).get("files", {}))
            except (ValueError, AttributeError):
                previous = []  # an unreadable manifest: replace what this export writes, remove nothing else
        staging = staging_directory(out_dir, ".dq_export.staging.")
        try:
            yield staging
            written = sorted((path.relative_to(staging) for path in staging.rglob("*") if path.is_file()),
                             key=lambda rel: rel.as_posix() == manifest)
            for rel in written:
                (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / rel, out_dir / rel)
            stale = set(previous) - {rel.as_posix() for rel in written} - {manifest}
            for name in stale:
                target = out_dir / name
                if target.is_file() and target.resolve().is_relative_to(out_dir.resolve()):
                    target.unlink()
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as error:
        where = f" ({error.filename})" if error.filename else ""
        raise UserError(f"--out {out_dir}: cannot write the export: {error.strerror or error}{where}") from None
