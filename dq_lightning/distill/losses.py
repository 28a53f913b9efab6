"""Distillation losses between student and teacher outputs (pure functions).

Masks are 1 for real tokens and 0 for padding: the encoder's attention mask for encoder positions and
`labels != -100` for decoder positions. With a mask, every mean is over real positions only, so batch padding
never changes a loss; `mask=None` averages over every position, padding included, as the official DQ-BART
script does (`torch.nn.MSELoss()` on whole tensors).

A thinner student (`dq_lightning.distill.width`) is compared with the teacher at the units it kept: `kept`
hidden dimensions select the last axis of every teacher state, `kept_heads` (one index tensor per student
layer) the heads of the teacher layer it was copied from. None is the full width: the tensors as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of `values` (batch, positions, ...) over positions where `mask` (batch, positions) is 1; with no
    mask, over all of it."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    per_position = values.reshape(*values.shape[:2], -1).mean(dim=-1)
    return (per_position * mask).sum() / mask.sum().clamp(min=1)


def logits_loss(student: Tensor, teacher: Tensor, mask: Tensor | None, kind: str = "mse",
                temperature: float = 1.0) -> Tensor:
    """`mse` (the paper's): squared logit difference averaged over the vocabulary and the positions.
    `kl`: temperature^2 * KL(teacher || student) of the softened distributions, averaged over the positions.
    """
    if kind == "mse":
        return _masked_mean((student.float() - teacher.float()) ** 2, mask)
    if kind == "kl":
        log_p_student = F.log_softmax(student.float() / temperature, dim=-1)
        log_p_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
        kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1, keepdim=True)
        return _masked_mean(kl, mask) * temperature ** 2
    raise ValueError(f"logits loss kind {kind!r} is not 'mse' or 'kl'")


def at_kept(tensor: Tensor, kept: Tensor | None, dim: int = -1) -> Tensor:
    """`tensor` at the `kept` indices of `dim` (the teacher's units a thinner student kept); None: all."""
    return tensor if kept is None else tensor.index_select(dim, kept.to(tensor.device))


def hidden_states_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], layer_map: Sequence[int],
                       mask: Tensor | None, kept: Tensor | None = None, project=None) -> Tensor:
    """Sum over student layers of the MSE to the teacher layer each was copied from, at the teacher's
    `kept` hidden dimensions (None: all), or, with `project` (a thinner student's learned map to the teacher's
    width), of the projected student states to the teacher's whole states.

    `student`/`teacher` are HF `*_hidden_states`: index 0 is the embedding output and index i + 1 the
    output of layer i; the embedding outputs are matched too.
    """
    pairs = [(0, 0)] + [(i + 1, t + 1) for i, t in enumerate(layer_map)]
    return sum(_masked_mean((ours.float() - theirs.float()) ** 2, mask)
               for ours, theirs in (aligned(student[s], teacher[t], kept, project) for s, t in pairs))


def aligned(student: Tensor, teacher: Tensor, kept: Tensor | None, project=None) -> tuple[Tensor, Tensor]:
    """A student state and the teacher state it is compared with: through `project` to the teacher's whole
    width, else at the teacher's `kept` dimensions (None: all)."""
    return (project(student), teacher) if project is not None else (student, at_kept(teacher, kept))


def per_example_states_loss(student: Tensor, teacher: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over the examples of a batch of each example's MSE between two (batch, positions, features) states.

    The official script's extra final-encoder-state term zips over the batch dimension of
    `encoder_last_hidden_state` and adds up one MSE per example: per-device batch size x this mean. The mean
    keeps the objective the same whatever the per-device batch and device count; its weight carries the
    official batch (`ObjectiveConfig.final_encoder_weight`).
    """
    squared = (student.float() - teacher.float()) ** 2
    if mask is None:
        return squared.mean(dim=(1, 2)).mean()
    mask = mask.to(squared.dtype)
    per_position = squared.mean(dim=-1)
    return ((per_position * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()


def attention_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], layer_map: Sequence[int],
                   query_mask: Tensor | None, key_mask: Tensor | None,
                   kept_heads: Sequence[Tensor] | None = None) -> Tensor:
    """Sum over student layers of the MSE between attention maps (batch, heads, queries, keys) and those of
    the teacher layer each was copied from, at the heads student layer i kept, `kept_heads[i]` (None: all):
    over real (query, key) pairs only, or with no masks over all."""
    # SDPA attention returns no maps (empty tuples in transformers 5): fail rather than distill nothing.
    if len(student) < len(layer_map) or len(teacher) <= max(layer_map) or any(a is None for a in student):
        raise ValueError("attention maps are missing: load teacher and student with attn_implementation='eager'")

    def target(s: int, t: int) -> Tensor:
        return at_kept(teacher[t], None if kept_heads is None else kept_heads[s], dim=1).float()

    if query_mask is None or key_mask is None:
        return sum(((student[s].float() - target(s, t)) ** 2).mean() for s, t in enumerate(layer_map))
    pair_mask = (query_mask[:, :, None] * key_mask[:, None, :]).float()  # batch, queries, keys
    total = 0.0
    for s, t in enumerate(layer_map):
        squared = ((student[s].float() - target(s, t)) ** 2).mean(dim=1)  # mean over heads
        total = total + (squared * pair_mask).sum() / pair_mask.sum().clamp(min=1)
    return total
