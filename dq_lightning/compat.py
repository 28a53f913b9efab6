"""What keeps checkpoints and configs written by earlier versions loading: the import paths of moved classes, and
their DQ student settings as the student takes them today.

Moved modules. Checkpoints and run folders' config.yaml name their classes by import path
(`class_path: dq_lightning.teacher.TeacherModule`), so an old path must still import. `MOVED_MODULES` maps each
old module to its home today; `install_aliases` (called when the package is imported) makes Python import the
new module under the old name, lazily, so no old path costs an import until something asks for it.

Until the settings were grouped (`dq_lightning.distill.recipe`), `DQStudentModule` took one flat list of 45
arguments, saved as such in every checkpoint's hyper-parameters (`w_bits`, `student_decoder_layers`,
`task_weight`, `weight_decay`, ...). `upgrade_student_hparams` maps such a list onto today's arguments; every
reader of a student's saved hyper-parameters (LightningCLI's `--ckpt_path`, `load_from_checkpoint`, export)
calls it first, so an old checkpoint is never rebuilt with a setting silently dropped.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path
from typing import Any

from dq_lightning.errors import UserError

MOVED_MODULES = {
    "dq_lightning.seq2seq": "dq_lightning.modules.seq2seq",
    "dq_lightning.teacher": "dq_lightning.modules.teacher",
    "dq_lightning.distill.module": "dq_lightning.modules.student",
    "dq_lightning.data.pretrain": "dq_lightning.pretrain.datamodule",
}


def moved_class(path: str) -> str:
    """A class path as it is today (`dq_lightning.teacher.TeacherModule` -> `dq_lightning.modules.teacher.
    TeacherModule`); a path that never moved comes back as it is."""
    module, _, name = path.rpartition(".")
    return f"{MOVED_MODULES[module]}.{name}" if module in MOVED_MODULES else path


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports a moved module's old name as its new module (the same module object)."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED_MODULES else None

    def create_module(self, spec):
        return importlib.import_module(MOVED_MODULES[spec.name])

    def exec_module(self, module):
        pass  # the new module is already executed


def install_aliases() -> None:
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())


# Flat setting of the old signature -> (group, field) today.
_GROUPED = {
    **{name: ("shape", name) for name in ("layer_map", "encoder_layer_map", "decoder_layer_map",
                                          "unsorted_layer_maps", "width_method", "width_batches", "width_seed",
                                          "width_hidden")},
    **{name: ("objective", name) for name in ("task_weight", "logits_weight", "hidden_weight", "attention_weight",
                                              "final_encoder_weight", "logits_loss", "temperature", "mask_padding",
                                              "attention_maps", "label_smoothing")},
    **{name: ("quant_settings", name) for name in ("weight_method", "weight_granularity", "weight_clip",
                                                   "quantize_lm_head", "attention_quant")},
    "quant_warmup_steps": ("quant_settings", "warmup_steps"),
    **{name: ("optimizer", name) for name in ("weight_decay", "gradient_clip", "warmup_ratio")},
    **{name: ("evaluation", name) for name in ("eval_head", "evaluate_teacher", "generate_on_validation",
                                               "prediction_table_rows")},
}
_BITS = ("w_bits", "e_bits", "a_bits")
_OLD_BITS_DEFAULTS = (2, 2, 8)  # the old signature's defaults
_DEPTH = ("student_encoder_layers", "student_decoder_layers")
LEGACY_KEYS = frozenset(_GROUPED) | frozenset(_BITS) | frozenset(_DEPTH) | {"quantize_attention_inputs"}


def moved_setting(name: str) -> str | None:
    """Where an old flat student setting lives today, as the flag to type (`task_weight` ->
    `--model.objective.task_weight`), or None for a name that never was one."""
    if name in _GROUPED:
        group, field = _GROUPED[name]
        return f"--model.{group}.{field}"
    if name in _BITS:
        return "--model.bits=W-E-A (e.g. 2-2-8)"
    if name in _DEPTH:
        return "--model.depth=ENCODER-DECODER (e.g. 6-3)"
    return None


def is_legacy(hparams: dict[str, Any]) -> bool:
    return any(key in hparams for key in LEGACY_KEYS) or "recipe" not in hparams


def upgrade_student_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """A student's saved hyper-parameters with the old flat settings moved into today's groups, `bits` and
    `depth`; today's hyper-parameters come back unchanged (a copy)."""
    hparams = dict(hparams)
    if not is_legacy(hparams):
        return hparams
    if "recipe" not in hparams:
        # Written before recipes existed: trained with what is now recipe dq_lightning.
        hparams["recipe"] = "dq_lightning"
        if hparams.get("quantize_attention_inputs"):
            hparams["attention_quant"] = "asym_probs"
    hparams.pop("quantize_attention_inputs", None)
    widths = [hparams.pop(name, default) for name, default in zip(_BITS, _OLD_BITS_DEFAULTS)]
    if hparams.get("bits") is None:
        hparams["bits"] = "-".join(str(width) for width in widths)
    layers = [hparams.pop(name, None) for name in _DEPTH]
    if hparams.get("depth") is None and any(count is not None for count in layers):
        hparams["depth"] = _depth(hparams.get("teacher"), layers)
    groups: dict[str, dict[str, Any]] = {}
    for name, (group, field) in _GROUPED.items():
        if name in hparams:
            groups.setdefault(group, {})[field] = hparams.pop(name)
    for group, settings in groups.items():
        saved = hparams.get(group)
        hparams[group] = {**settings, **(saved if isinstance(saved, dict) else {})}
    return hparams


def _depth(teacher: str | None, layers: list[int | None]) -> str:
    """`encoder-decoder` from the old per-stack counts, a missing one (the teacher's depth) read from the
    teacher's config."""
    if None in layers:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(Path(str(teacher)).expanduser()))
        except Exception as error:  # noqa: BLE001 - any unreadable config means the same thing here
            raise UserError(f"model.teacher={teacher}: cannot read its config, which the checkpoint's depth "
                            f"(student_encoder_layers={layers[0]}, student_decoder_layers={layers[1]}) needs "
                            f"({type(error).__name__})") from None
        layers = [config.encoder_layers if layers[0] is None else layers[0],
                  config.decoder_layers if layers[1] is None else layers[1]]
    return f"{layers[0]}-{layers[1]}"
