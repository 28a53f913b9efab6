"""How faithfully the student reproduces the teacher, under teacher forcing (per target position).

- label loyalty: share of positions where the student's top token is the teacher's;
- probability loyalty: 1 - Jensen-Shannon distance (base 2, so in [0, 1]) between the two distributions.
Both are 1 for a student identical to its teacher.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric


def label_agreement(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    return (student_logits.argmax(dim=-1) == teacher_logits.argmax(dim=-1)).float()


def probability_loyalty(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    log_p = torch.log_softmax(student_logits.float(), dim=-1)
    log_q = torch.log_softmax(teacher_logits.float(), dim=-1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2)
    p, q = log_p.exp(), log_q.exp()
    js_divergence = 0.5 * ((p * (log_p - log_m)).sum(-1) + (q * (log_q - log_m)).sum(-1)) / math.log(2)
    return 1 - js_divergence.clamp(min=0).sqrt()


class Loyalty(nn.Module):
    """Accumulates both loyalties over real target positions (DDP-reduced through torchmetrics)."""

    def __init__(self):
        super().__init__()
        self.label = MeanMetric()
        self.probability = MeanMetric()

    def update(self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> None:
        keep = mask.bool()
        self.label.update(label_agreement(student_logits, teacher_logits)[keep])
        self.probability.update(probability_loyalty(student_logits, teacher_logits)[keep])

    def compute(self) -> dict[str, Tensor]:
        return {"label_loyalty": self.label.compute(), "prob_loyalty": self.probability.compute()}

    def reset(self) -> None:
        self.label.reset()
        self.probability.reset()
