"""What a runtime export (`--format onnx|ctranslate2`) is built from: a packed export, a student checkpoint (packed
first) or a full-precision Hugging Face directory (the teacher), read into one `DeploySource`.

A packed export is loaded with `load_packed` (its FP32 path): the returned model holds every float tensor
(LayerNorms, biases, positions, the dequantized weights) and, on each quantized Linear and attention module,
the student's own quantizers (`input_quantizer`, `attention_input_quantizer`). The integer codes and scales
of the quantized weights are read from the same verified tensors, so a runtime receives the exported codes
themselves and never rounds a weight a second time.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from dq_lightning.errors import UserError


@dataclass
class DeploySource:
    """A model to hand to a runtime: the transformers model (FP32 path), its tokenizer and decoding settings,
    and the integer codes of its quantized weights."""

    model: nn.Module
    tokenizer: Any
    task: dict[str, Any]
    codes: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    """{weight name: (int8 codes [out, in], FP32 scale [out, 1] or []) }, tied names included."""
    manifest: dict[str, Any] | None = None
    """The packed export's manifest; None for a full-precision model."""
    origin: str = ""

    @property
    def config(self):
        return self.model.config

    @property
    def generation_config(self):
        return self.model.generation_config

    @property
    def is_mbart(self) -> bool:
        return self.config.model_type == "mbart"

    @property
    def notation(self) -> str:
        return self.manifest["notation"] if self.manifest else "32-32-32"

    def weight_codes(self, weight_name: str) -> tuple[Tensor, Tensor] | None:
        return self.codes.get(weight_name)


def read_source(model_dir: str | None = None, checkpoint: str | None = None, teacher: str | None = None,
                task: str | None = None) -> DeploySource:
    """The `DeploySource` of `--model DIR` (a packed export or a Hugging Face directory) or `--ckpt FILE` (a DQ
    student checkpoint, packed into a temporary directory first)."""
    from dq_lightning.export.manifest import MANIFEST

    if checkpoint is not None:
        from dq_lightning.export.checkpoint import NotQuantized
        from dq_lightning.export.export import export_full_precision_student, export_student

        with tempfile.TemporaryDirectory(prefix="dq_deploy_") as work:
            packed = Path(work) / "packed"
            try:
                export_student(checkpoint, packed, teacher=teacher, task=task)
                source = _read_packed(packed, "--ckpt")
            except NotQuantized:  # a full-precision (32-32-32) student: exported as a Hugging Face directory
                export_full_precision_student(checkpoint, packed, teacher=teacher)
                source = _read_hf(packed, task)
        source.origin = str(Path(checkpoint).expanduser().resolve())
        return source
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise UserError(f"--model {model_dir}: no such directory")
    if (path / MANIFEST).exists():
        source = _read_packed(path, "--model")
    elif (path / "config.json").exists():
        source = _read_hf(path, task)
    else:
        raise UserError(f"--model {model_dir}: neither a packed export (no {MANIFEST}) nor a Hugging Face model "
                        "directory (no config.json)")
    source.origin = str(path.resolve())
    return source


def _read_packed(path: Path, flag: str) -> DeploySource:
    from dq_lightning.export.loading import _StoredWeights, load_packed
    from dq_lightning.export.manifest import read_manifest, read_tensors
    from dq_lightning.models.tokenizer import load_tokenizer

    model = load_packed(path, attn_implementation="eager", flag=flag)
    manifest = read_manifest(path, flag)
    stored = _StoredWeights(manifest, read_tensors(path, manifest, flag))
    codes = {}
    for name in [*stored.entries, *stored.aliases]:
        target = stored.aliases.get(name, name)
        if "codes" in stored.entries[target]:
            codes[name] = stored.codes(target)
    tokenizer = load_tokenizer(str(path), flag=flag)
    source = DeploySource(model, tokenizer, manifest.get("task") or {}, codes, manifest)
    check_languages(source, f"{flag} {path}")
    return source


def _read_hf(path: Path, task: str | None) -> DeploySource:
    from transformers import AutoConfig

    from dq_lightning.data.tasks import get_task
    from dq_lightning.models.directory import hf_directory_task_info
    from dq_lightning.models.loading import load_pretrained
    from dq_lightning.models.tokenizer import load_tokenizer

    info = hf_directory_task_info(path)
    if task is not None:
        spec = get_task(task)
        info = {**info, "source_lang": spec.source_lang, "target_lang": spec.target_lang}
    tokenizer = load_tokenizer(str(path), flag="--model")
    try:
        model_type = AutoConfig.from_pretrained(str(path), local_files_only=True).model_type
    except (OSError, ValueError) as error:
        raise UserError(f"--model {path}: cannot read config.json ({error})") from None
    if model_type == "mbart":  # refused before the weights are read
        _language_codes(tokenizer, info, f"--model {path}")
    model = load_pretrained(str(path), flag="--model", attn_implementation="eager").eval().requires_grad_(False)
    source = DeploySource(model, tokenizer, info)
    check_languages(source, f"--model {path}", set_start=True)
    return source


def _language_codes(tokenizer, task: dict[str, Any], where: str) -> tuple[str, str]:
    source_lang, target_lang = task.get("source_lang"), task.get("target_lang")
    vocab = tokenizer.get_vocab()
    missing = [code for code in (source_lang, target_lang) if not code or code not in vocab]
    if missing:
        reason = "none is recorded" if not (source_lang and target_lang) else f"{missing[0]} is not in the tokenizer"
        raise UserError(f"{where}: an mBART model needs its source and target language codes (the task's "
                        f"source_lang/target_lang, as tokens of its tokenizer); {reason}; pass --task (e.g. "
                        "--task wmt16_en_ro)")
    return source_lang, target_lang


def check_languages(source: DeploySource, where: str, set_start: bool = False) -> None:
    """An mBART model starts its decoder on the target-language code and reads sources ending in the source
    code; without both codes (the task's, present in the tokenizer) a runtime would decode from </s>, which the
    model never learned."""
    if not source.is_mbart:
        return
    source_lang, target_lang = _language_codes(source.tokenizer, source.task, where)
    vocab = source.tokenizer.get_vocab()
    if set_start:  # a Hugging Face directory: the settings a student's export records (`mbart_generation_settings`)
        from dq_lightning.modules.seq2seq import mbart_generation_settings

        settings = mbart_generation_settings(source.model, source.tokenizer, source_lang, target_lang)
        source.generation_config.decoder_start_token_id = settings["decoder_start_token_id"]
        source.generation_config.suppress_tokens = sorted({*(source.generation_config.suppress_tokens or ()),
                                                           *settings["suppress_tokens"]})
    start = source.generation_config.decoder_start_token_id
    if start != vocab[target_lang]:
        raise UserError(f"{where}: the mBART model's generation_config starts decoding at token {start}, not at "
                        f"the target code {target_lang} ({vocab[target_lang]}); export it again with --task")
