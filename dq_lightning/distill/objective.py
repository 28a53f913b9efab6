"""The DQ-BART training objective as one component: task cross-entropy plus distillation against the teacher.

    objective = DQObjective(resolve("dq-bart").objective_config(mode="dq"))  # dq_lightning.distill.recipe
    loss, terms = objective(student_outputs, teacher_outputs, labels, source_mask, encoder_map, decoder_map)

Terms (each a scalar, weighted and summed into the loss):

- `task`: cross-entropy on the labels (label -100 does not count);
- `logits`: MSE (or KL) between student and teacher logits;
- `hidden`: MSE between each student hidden state (embedding output included) and the teacher state of the
  layer it was copied from, encoder and decoder, summed over layers;
- `attention`: MSE between attention maps (encoder self, decoder self, cross), summed over layers;
- `final_encoder`: the official script's extra term on the final encoder state, the mean over the examples of
  each one's MSE (`per_example_states_loss`); the official script sums them over its per-device batch, which
  the weight's default (8, that batch) restores without tying the objective to a batch layout.

A thinner student (`model.width`) is compared at the teacher units it kept (`kept`, a `width.Units`): its
hidden states with the teacher's kept dimensions (final encoder state included), its attention maps with the
kept heads of the teacher layer each student layer was copied from; the logits (whole vocabulary) as they are.

`mask_padding` decides whether the distillation means skip padded positions or, as the official script,
average over them too.

On an unlabeled input (no reference; `dq_lightning.data.unlabeled`) the labels are the teacher's own output:
`reference=False` names the cross-entropy against them `pseudo_reference` and leaves it out at weight 0, and
`source_aligned=False` (the student read a restricted view of the source, `dq_lightning.distill.views`) keeps
only the decoder-side terms (logits, decoder hidden states, decoder self-attention): encoder states, the
final encoder state and cross-attention maps lie over source positions the view moved.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from torch import Tensor, nn

from dq_lightning.distill.losses import (aligned, attention_loss, hidden_states_loss, logits_loss,
                                         per_example_states_loss)
from dq_lightning.distill.width import Units
from dq_lightning.errors import UserError

LogitsLoss = Literal["mse", "kl"]
LOGITS_LOSSES = get_args(LogitsLoss)


@dataclass(frozen=True)
class ObjectiveConfig:
    """Weights and form of the DQ loss. The field defaults are the official recipe's."""

    distill: bool = True
    """Add the distillation terms (False: the task loss alone, the quant_only baseline)."""
    task_weight: float = 1.0
    """Weight of the task cross-entropy."""
    logits_weight: float = 1.0
    """Weight of the logits loss."""
    hidden_weight: float = 1.0
    """Weight of the hidden-state MSE (encoder and decoder, summed over layers)."""
    attention_weight: float = 1.0
    """Weight of the attention-map MSE (encoder self, decoder self, cross; summed over layers)."""
    final_encoder_weight: float = 8.0
    """Weight of the final-encoder-state term, the mean over the examples of each one's MSE (official: 8, its
    sum over a per-device batch of 8 at the other hidden-state terms' weight 1; recipe dq_lightning: 0, as that
    state is already the last encoder hidden state)."""
    logits_loss: LogitsLoss = "mse"
    """mse (official) or kl (temperature^2 * KL(teacher || student))."""
    temperature: float = 1.0
    """Softening temperature of the KL logits loss."""
    mask_padding: bool = False
    """Average the distillation terms over real tokens only (recipe dq_lightning), or over every position,
    padding included, as the official script does (False)."""
    label_smoothing: float = 0.0
    """Label smoothing of the task cross-entropy while training."""

    def __post_init__(self) -> None:
        for name in ("task_weight", "logits_weight", "hidden_weight", "attention_weight", "final_encoder_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise UserError(f"model.objective.{name}={value!r} must be a non-negative number")
        if self.logits_loss not in LOGITS_LOSSES:
            raise UserError(f"model.objective.logits_loss={self.logits_loss!r} is not one of {', '.join(LOGITS_LOSSES)}")
        if not self.temperature > 0:
            raise UserError(f"model.objective.temperature={self.temperature!r} must be positive")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"model.objective.label_smoothing={self.label_smoothing} must be in [0, 1)")

    @property
    def needs_hidden_states(self) -> bool:
        return self.distill and (self.hidden_weight > 0 or self.final_encoder_weight > 0)

    @property
    def needs_attentions(self) -> bool:
        return self.distill and self.attention_weight > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def task_loss(logits: Tensor, labels: Tensor, smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy over target positions; label -100 (padding) does not count."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                                       ignore_index=-100, label_smoothing=smoothing)


class DQObjective(nn.Module):
    """The weighted sum of the DQ terms (see the module docstring). No parameters: a plain function of the
    two models' outputs, held as a module so that it prints with the LightningModule."""

    def __init__(self, config: ObjectiveConfig):
        super().__init__()
        self.config = config

    def forward(self, student, teacher, labels: Tensor, source_mask: Tensor, encoder_map: list[int],
                decoder_map: list[int], training: bool = True, kept: Units | None = None, project=None,
                reference: bool = True, source_aligned: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        """`student` and `teacher` are transformers Seq2SeqLMOutputs of one batch (the teacher's may be None
        when not distilling); `kept`: the teacher units a thinner student kept (None: full width); `project`:
        a thinner student's learned map of its hidden states to the teacher's width, for the hidden-state terms
        (None: compare at the kept dimensions); `reference`: the labels are references (False: the teacher's
        outputs); `source_aligned`: the student read the teacher's source (False: a restricted view). Returns the
        loss and its unweighted terms."""
        c = self.config
        terms, weights = {}, {}
        if reference or c.task_weight > 0:
            name = "task" if reference else "pseudo_reference"
            terms[name] = task_loss(student.logits, labels, c.label_smoothing if training else 0.0)
            weights[name] = c.task_weight
        if c.distill:
            if teacher is None:
                raise ValueError("distillation needs the teacher's outputs")
            self._distillation_terms(student, teacher, labels != -100 if c.mask_padding else None,
                                     source_mask if c.mask_padding else None, encoder_map, decoder_map, kept,
                                     project, source_aligned, terms, weights)
        loss = sum(weights[name] * value for name, value in terms.items())
        return loss, terms

    def _distillation_terms(self, student, teacher, target_mask: Tensor | None, encoder_mask: Tensor | None,
                            encoder_map: list[int], decoder_map: list[int], kept: Units | None, project,
                            source_aligned: bool, terms: dict[str, Tensor], weights: dict[str, float]) -> None:
        c = self.config
        terms["logits"] = logits_loss(student.logits, teacher.logits, target_mask, c.logits_loss, c.temperature)
        weights["logits"] = c.logits_weight
        hidden = None if kept is None else kept.hidden
        if c.hidden_weight > 0:
            encoder = hidden_states_loss(student.encoder_hidden_states, teacher.encoder_hidden_states, encoder_map,
                                         encoder_mask, hidden, project) if source_aligned else None
            decoder = hidden_states_loss(student.decoder_hidden_states, teacher.decoder_hidden_states, decoder_map,
                                         target_mask, hidden, project)
            terms["hidden"] = decoder if encoder is None else encoder + decoder
            weights["hidden"] = c.hidden_weight
        if c.final_encoder_weight > 0 and source_aligned:
            terms["final_encoder"] = per_example_states_loss(
                *aligned(student.encoder_last_hidden_state, teacher.encoder_last_hidden_state, hidden, project),
                encoder_mask)
            weights["final_encoder"] = c.final_encoder_weight
        if c.attention_weight > 0:
            terms["attention"] = self._attention_terms(student, teacher, encoder_map, decoder_map,
                                                       target_mask, encoder_mask, kept, source_aligned)
            weights["attention"] = c.attention_weight

    @staticmethod
    def _attention_terms(student, teacher, encoder_map: list[int], decoder_map: list[int],
                         target_mask: Tensor | None, encoder_mask: Tensor | None, kept: Units | None,
                         source_aligned: bool = True) -> Tensor:
        def heads(stack: str, attention: str) -> list[Tensor] | None:
            return None if kept is None else kept.layer_heads(stack, attention)

        def decoder_self() -> Tensor:
            return attention_loss(student.decoder_attentions, teacher.decoder_attentions, decoder_map,
                                  target_mask, target_mask, heads("decoder", "self_attn"))

        if not source_aligned:
            return decoder_self()
        return (attention_loss(student.encoder_attentions, teacher.encoder_attentions, encoder_map,
                               encoder_mask, encoder_mask, heads("encoder", "self_attn"))
                + decoder_self()
                + attention_loss(student.cross_attentions, teacher.cross_attentions, decoder_map,
                                 target_mask, encoder_mask, heads("decoder", "encoder_attn")))

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.to_dict().items())
