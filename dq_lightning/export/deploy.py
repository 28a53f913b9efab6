"""Runtime exports: `python -m dq_lightning export --format onnx|ctranslate2`, and loading them back for `predict`.

    python -m dq_lightning export --format onnx --ckpt runs/xsum/dq-tiny/checkpoints/last.ckpt --out model-onnx
    python -m dq_lightning export --format ctranslate2 --model runs/xsum/dq-tiny/packed --out model-ct2
    python -m dq_lightning export --format onnx --model runs/xsum/teacher-tiny/hf --out teacher-onnx

The source is a DQ student checkpoint, a packed export or a full-precision Hugging Face directory (the teacher)
(`dq_lightning.export.deploy_source`). A runtime directory holds the runtime's files (`*.onnx` + `weights.bin`,
or `ctranslate2/`), the Hugging Face config, decoding settings and tokenizer that `predict` reads, and the
manifest `dq_deploy.json`: format, where the model came from, its W-E-A setting and task, what of the trained
quantizers the runtime reproduces, and the size and sha256 of every file (checked when it is loaded).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dq_lightning.errors import UserError

DEPLOY_MANIFEST = "dq_deploy.json"
DEPLOY_FORMATS = {"onnx": "dq_lightning.onnx", "ctranslate2": "dq_lightning.ctranslate2"}
DEPLOY_VERSION = 1
RUNTIMES = ("torch", "int8", "onnx", "ctranslate2")


def require_runtime(runtime: str, flag: str) -> None:
    """A one-line error when `runtime`'s package is missing."""
    if runtime == "onnx":
        from dq_lightning.export.onnx_runtime import require_onnxruntime

        require_onnxruntime(flag)
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise UserError(f"{flag}: the onnx package is not installed (pip install onnx; `make install` "
                            "installs it)") from None
    elif runtime == "ctranslate2":
        from dq_lightning.export.ct2 import require_ctranslate2

        require_ctranslate2(flag)


def export_runtime(fmt: str, out_dir: str | Path, model_dir: str | None = None, checkpoint: str | None = None,
                   teacher: str | None = None, task: str | None = None) -> dict[str, Any]:
    """Write the `fmt` ("onnx", "ctranslate2") export of a checkpoint or model directory into `out_dir`; returns
    its manifest. `out_dir` must be new, empty or an earlier export of the same format (whose files are
    replaced; other files there are kept)."""
    from dq_lightning.export.deploy_source import read_source
    from dq_lightning.export.export import check_out_dir, export_files
    from dq_lightning.export.manifest import sha256_file

    if fmt not in DEPLOY_FORMATS:
        raise UserError(f"--format {fmt}: choose from packed, {', '.join(DEPLOY_FORMATS)}")
    require_runtime(fmt, f"--format {fmt}")
    out_dir = Path(out_dir).expanduser()
    check_out_dir(out_dir, DEPLOY_MANIFEST, f"an earlier --format {fmt} export",
                   lambda path: _format_of(path) == DEPLOY_FORMATS[fmt])
    source = read_source(model_dir=model_dir, checkpoint=checkpoint, teacher=teacher, task=task)
    with export_files(out_dir, DEPLOY_MANIFEST) as staging:
        if fmt == "onnx":
            from dq_lightning.export.onnx_graph import build_graphs, save_graphs

            save_graphs(build_graphs(source), staging)
        else:
            from dq_lightning.export.ct2 import build_ct2

            build_ct2(source, staging)
        source.config.save_pretrained(staging)
        source.generation_config.save_pretrained(staging)
        source.tokenizer.save_pretrained(str(staging))
        files = {path.relative_to(staging).as_posix(): {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
                 for path in sorted(staging.rglob("*")) if path.is_file()}
        manifest = _manifest(fmt, source, files)
        (staging / DEPLOY_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _format_of(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None


def _manifest(fmt: str, source, files: dict[str, Any]) -> dict[str, Any]:
    import importlib.metadata as metadata

    quant = (source.manifest or {}).get("quant")
    runtime_package = {"onnx": "onnxruntime", "ctranslate2": "ctranslate2"}[fmt]
    return {
        "format": DEPLOY_FORMATS[fmt],
        "version": DEPLOY_VERSION,
        "model_class": type(source.model).__name__,
        "source": source.origin,
        "notation": source.notation,
        "quant": quant,
        "task": source.task or None,
        "quantizers": _what_is_reproduced(fmt, quant),
        "default_compute_type": ("int8" if quant else "float32") if fmt == "ctranslate2" else None,
        "built_with": {runtime_package: metadata.version(runtime_package)},
        "files": files,
    }


def _what_is_reproduced(fmt: str, quant: dict | None) -> str:
    if quant is None:
        return "full precision: nothing is quantized"
    if fmt == "onnx":
        return ("weights: the exported int8 codes and scales; activations and attention operands: the trained "
                "quantizers (symmetric min-max and LSQ as int8 codes into integer MatMuls, asymmetric "
                "ones fake-quantized in float)")
    return ("weights: the exported int8 codes and scales; activations: not the trained quantizer (CTranslate2 "
            "rounds each row dynamically to int8 with compute_type int8, and not at all with float32); attention "
            "operands: float")


# -- loading -------------------------------------------------------------------------------------------------------
def read_deploy_manifest(directory: Path, flag: str = "--model") -> dict[str, Any] | None:
    """The runtime export manifest of `directory`, checked (format, version, every file's size and sha256); None
    when the directory is not a runtime export."""
    from dq_lightning.errors import first_line
    from dq_lightning.export.manifest import verify_files

    path = directory / DEPLOY_MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{flag} {directory}: {DEPLOY_MANIFEST} is unreadable ({first_line(error)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in DEPLOY_FORMATS.values() \
            or not isinstance(manifest.get("files"), dict):
        raise UserError(f"{flag} {directory}: {DEPLOY_MANIFEST} is not a runtime export manifest")
    if manifest.get("version") != DEPLOY_VERSION:
        raise UserError(f"{flag} {directory}: runtime export version {manifest.get('version')!r}; this "
                        f"dq_lightning reads version {DEPLOY_VERSION}")
    verify_files(directory, {**manifest, "weights_file": None}, flag)
    return manifest


def runtime_of(manifest: dict[str, Any]) -> str:
    return {value: key for key, value in DEPLOY_FORMATS.items()}[manifest["format"]]


def load_runtime_model(directory: Path, manifest: dict[str, Any], runtime: str, threads: int | None,
                       compute_type: str | None, flag: str = "--model"):
    """The generator of a runtime export: an `OnnxSeq2SeqLM` or a `Ct2Seq2Seq` (both with `.config`,
    `.generation_config` and `generate(input_ids=, attention_mask=, generation_config=)`)."""
    from dq_lightning.models.tokenizer import load_tokenizer

    stored = runtime_of(manifest)
    if runtime != stored:
        raise UserError(f"--runtime {runtime}: {flag} {directory} is a --format {stored} export; use --runtime "
                        f"{stored}, or export the model again with --format {runtime}")
    require_runtime(runtime, f"--runtime {runtime}")
    if runtime == "onnx":
        from dq_lightning.export.onnx_runtime import load_onnx_model

        return load_onnx_model(directory, threads)
    from dq_lightning.export.ct2 import Ct2Seq2Seq

    return Ct2Seq2Seq(directory, load_tokenizer(str(directory), flag=flag), threads,
                      compute_type or manifest.get("default_compute_type") or "int8")
