"""Where a DQ student comes from: the frozen teacher, loaded once, and students copied from its layers.

`TeacherAndStudent` is the one factory of both. The LightningModule asks it for the student it trains, and
again for a fresh one when a checkpoint of latent weights is loaded into a student already converted to
integer codes; export rebuilds a checkpoint's student through the same module.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from dq_lightning.distill.layer_map import LayerMapStrategy, layer_map
from dq_lightning.distill.recipe import ResolvedRecipe
from dq_lightning.distill.width import Units, WidthMethod, WidthSpec, extract, importance, random_importance
from dq_lightning.errors import UserError
from dq_lightning.models.loading import load_pretrained
from dq_lightning.quant import QuantConfig, return_maps_before_dropout
from dq_lightning.quant.config import FULL_PRECISION
from dq_lightning.size import SizeReport, model_size

_loaded_teachers: dict[tuple, PreTrainedModel] | None = None  # set inside `each_teacher_loaded_once`


@contextlib.contextmanager
def each_teacher_loaded_once() -> Iterator[None]:
    """Within this block a teacher directory is read once, however many students are built from it (the
    sweep check builds one per grid point; mbart-large takes seconds to read). The teacher is frozen, so
    sharing it is safe; each student is still its own copy."""
    global _loaded_teachers
    outer, _loaded_teachers = _loaded_teachers, {} if _loaded_teachers is None else _loaded_teachers
    try:
        yield
    finally:
        _loaded_teachers = outer


_stand_ins: dict[Path, Any] | None = None


@contextlib.contextmanager
def teachers_stood_in(stand_ins: dict[Path, Any]) -> Iterator[None]:
    """Within this block a teacher directory of `stand_ins` ({directory: its transformers config}) that does not
    exist yet is a randomly initialised model of that config: the shape a student is checked against before
    the teacher is trained (`sweep --preflight`, which `make sweep` runs before `make teacher`)."""
    global _stand_ins
    outer, _stand_ins = _stand_ins, {Path(path).absolute(): config for path, config in stand_ins.items()}
    try:
        yield
    finally:
        _stand_ins = outer


def load_teacher(name: str, flag: str = "model.teacher") -> PreTrainedModel:
    """The teacher of `name` (a Hugging Face directory or Hub id), frozen and in eval mode, with eager attention
    (SDPA returns no attention maps, which attention distillation needs)."""
    key = (str(name), flag)
    if _loaded_teachers is not None and key in _loaded_teachers:
        return _loaded_teachers[key]
    stand_in = (_stand_ins or {}).get(Path(str(name)).expanduser().absolute())
    if stand_in is not None and not Path(str(name)).expanduser().exists():
        from transformers import AutoModelForSeq2SeqLM

        teacher = AutoModelForSeq2SeqLM.from_config(stand_in, attn_implementation="eager")
    else:
        teacher = load_pretrained(name, flag=flag, attn_implementation="eager")
    teacher = teacher.eval().requires_grad_(False)
    if _loaded_teachers is not None:
        _loaded_teachers[key] = teacher
    return teacher


def copy_student(teacher: PreTrainedModel, encoder_map: list[int], decoder_map: list[int]) -> PreTrainedModel:
    """A new model whose encoder/decoder layer i is a copy of the teacher's layer `map[i]`.

    Everything else (token and positional embeddings, layer norms, LM head and its bias) is copied as is,
    and tied weights stay tied. With the full maps the student equals the teacher exactly.
    """
    student = copy.deepcopy(teacher)
    student.train(teacher.training)
    encoder, decoder = student.get_encoder(), student.get_decoder()
    encoder.layers = nn.ModuleList([encoder.layers[i] for i in encoder_map])
    decoder.layers = nn.ModuleList([decoder.layers[i] for i in decoder_map])
    # The KV cache is indexed by each attention's layer_idx; copied layers must be renumbered.
    for layers in (encoder.layers, decoder.layers):
        for new_index, layer in enumerate(layers):
            for module in layer.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = new_index
    student.config.encoder_layers = len(encoder_map)
    student.config.decoder_layers = len(decoder_map)
    student.config.num_hidden_layers = len(encoder_map)
    return student


class TeacherAndStudent:
    """The frozen teacher and the layer maps of its student; `new_student()` copies a trainable student.

    The teacher is held here, a plain object, rather than as a child of the LightningModule: so it is never
    in the optimizer, never wrapped by DDP and never written again into the student's checkpoints (its
    directory is a hyper-parameter, and the student is rebuilt from it before a checkpoint is restored).
    """

    def __init__(self, teacher: str, encoder_layers: int | None = None, decoder_layers: int | None = None,
                 strategy: LayerMapStrategy = "dq-bart", encoder_layer_map: Sequence[int] | None = None,
                 decoder_layer_map: Sequence[int] | None = None, maps_before_dropout: bool = False,
                 unsorted_layer_maps: bool = False, width: str | None = None, width_method: WidthMethod = "impt",
                 width_seed: int = 0):
        """
        Args:
            teacher: the teacher's Hugging Face directory or Hub id.
            encoder_layers, decoder_layers: the student's depth (None: the teacher's).
            strategy: how the teacher layers are chosen (`dq_lightning.distill.layer_map`).
            encoder_layer_map, decoder_layer_map: explicit teacher layers, overriding `strategy` per stack.
            maps_before_dropout: the student returns its attention maps before dropout (the official code's
                distillation target) instead of after.
            unsorted_layer_maps: explicit maps may list distinct teacher layers in any order.
            width: a thinner student extracted from the layer-copied one (`dq_lightning.distill.width`):
                `heads=`, `ffn=`, `d_model=` settings or one ratio in (0, 1]; None: the teacher's widths.
            width_method: impt (the most important units; `score_width` first) or rand (a seeded choice).
            width_seed: the seed of the rand choice.
        """
        self.teacher = load_teacher(teacher)
        config = self.teacher.config
        self.encoder_map = self._map("encoder", config.encoder_layers, encoder_layers, strategy, encoder_layer_map,
                                     unsorted_layer_maps)
        self.decoder_map = self._map("decoder", config.decoder_layers, decoder_layers, strategy, decoder_layer_map,
                                     unsorted_layer_maps)
        self.maps_before_dropout = maps_before_dropout
        self.width = None if width is None else WidthSpec.parse(width, config, width_method)
        self.width_seed = width_seed
        self.width_scores: Units | None = None
        self.kept: Units | None = None
        """The teacher units a thinner student kept (indices; layers numbered as the student's), once built."""

    @classmethod
    def for_recipe(cls, teacher: str, recipe: ResolvedRecipe, mode: str, encoder_layers: int | None = None,
                   decoder_layers: int | None = None, width: str | None = None) -> TeacherAndStudent:
        """The factory of a student of `mode` at this depth and width, made as `recipe` says (its layer maps,
        width method and attention maps)."""
        shape = recipe.shape
        return cls(teacher, encoder_layers, decoder_layers, shape.layer_map, shape.encoder_layer_map,
                   shape.decoder_layer_map, maps_before_dropout=recipe.maps_before_dropout(mode),
                   unsorted_layer_maps=shape.unsorted_layer_maps, width=None if width is None else str(width),
                   width_method=shape.width_method, width_seed=shape.width_seed)

    @staticmethod
    def _map(stack: str, teacher_layers: int, layers: int | None, strategy: str,
             explicit: Sequence[int] | None, unsorted: bool) -> list[int]:
        layers = teacher_layers if layers is None else layers
        if explicit is not None:
            return layer_map(teacher_layers, layers, explicit, flag=f"model.shape.{stack}_layer_map",
                             allow_unsorted=unsorted)
        return layer_map(teacher_layers, layers, strategy, flag=f"model.depth ({stack})")

    def score_width(self, batches: Iterable[Mapping[str, torch.Tensor]]) -> None:
        """Score the units of the layer-copied student on a few training batches, for `width_method` impt."""
        self.width_scores = importance(copy_student(self.teacher, self.encoder_map, self.decoder_map), batches)

    def student_config(self):
        """The teacher's config at the student's widths (its depth stays the teacher's: `model_size` cuts)."""
        config = self.teacher.config
        return copy.deepcopy(config) if self.width is None else self.width.student.applied_to(config)

    def keep_width(self, kept: Units) -> None:
        """Take `kept` (a checkpoint's stored choice) as the thinner student's units: `new_student` rebuilds
        exactly them, without scoring. Refused when they are not units of this student's widths and depth."""
        scores = kept.as_scores(self.width.teacher)
        depths = {("encoder", "self_attn"): len(self.encoder_map), ("decoder", "self_attn"): len(self.decoder_map),
                  ("decoder", "encoder_attn"): len(self.decoder_map)}
        try:
            same_layers = all(len(kept.layer_heads(*key)) == depth for key, depth in depths.items())
        except KeyError:
            same_layers = False
        if not same_layers or not kept.equals(scores.keep(self.width)):
            raise UserError(f"model.width={self.width.text}: the checkpoint's thinner student kept other widths "
                            "or layers than this one (set model.width, the depth and layer maps as trained)")
        self.width_scores = scores

    def new_student(self) -> PreTrainedModel:
        """A trainable full-precision student copied from the teacher's layers of the two maps, and made
        thinner by `width`."""
        return self._student(self._scores_for)

    def provisional_student(self) -> PreTrainedModel:
        """A student of the `width` sizes whose units are a seeded random choice, not stored: the shape that
        a checkpoint's stored units (`keep_width`) replace before its weights are loaded."""
        return self._student(lambda student: random_importance(student, self.width_seed), store=False)

    def _student(self, scores_for, store: bool = True) -> PreTrainedModel:
        student = copy_student(self.teacher, self.encoder_map, self.decoder_map)
        if self.width is not None:
            student, kept = extract(student, self.width, scores_for(student))
            self.kept = kept if store else self.kept
        student.requires_grad_(True).train()
        if self.maps_before_dropout:
            return_maps_before_dropout(student)
        return student

    def _scores_for(self, student: PreTrainedModel) -> Units:
        if self.width_scores is not None:  # scored (impt) or a checkpoint's choice (either method)
            return self.width_scores
        if self.width.method == "rand":
            return random_importance(student, self.width_seed)
        raise RuntimeError("model.width with width_method impt: call score_width(batches) before new_student")

    def size_report(self, quant: QuantConfig | None, convention: str) -> SizeReport:
        """The student's size under `convention` (`dq_lightning.size`), from shapes alone: its depth, and a
        thinner student's own widths, against the full-width FP32 teacher; `quant` None is full precision."""
        quant = quant or QuantConfig(w_bits=FULL_PRECISION, e_bits=FULL_PRECISION, a_bits=FULL_PRECISION)
        source, teacher = (self.teacher.config, None) if self.width is None else (
            self.student_config(), self.teacher.config)
        return model_size(source, quant, encoder_layers=len(self.encoder_map), decoder_layers=len(self.decoder_map),
                          convention=convention, teacher=teacher)

    def check_tokenizer(self, tokenizer, teacher: str) -> None:
        """Refuse a data tokenizer that is not the teacher's (a student reads what its teacher read)."""
        vocabulary = self.teacher.get_input_embeddings().num_embeddings
        if len(tokenizer) > vocabulary or tokenizer.pad_token_id != self.teacher.config.pad_token_id:
            raise UserError(f"model.teacher={teacher}: its vocabulary ({vocabulary} tokens) is not the data "
                            f"tokenizer's ({len(tokenizer)}); set data.tokenizer to the teacher's directory")

    def teacher_on(self, device: torch.device) -> PreTrainedModel:
        """The teacher, moved to `device` on first use there (it is not moved with the LightningModule)."""
        if self.teacher.device != device:
            self.teacher.to(device)
        return self.teacher

    def teacher_outputs(self, inputs: dict[str, torch.Tensor], device: torch.device, details: bool) -> Any:
        """The teacher's forward on `inputs`, without gradients; `details`: with hidden states and attentions."""
        with torch.no_grad():
            return self.teacher_on(device)(**inputs, output_hidden_states=details, output_attentions=details)
