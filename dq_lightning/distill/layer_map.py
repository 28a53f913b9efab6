"""Which teacher layers a shallower student copies (and is distilled against)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

from dq_lightning.errors import UserError

LayerMapStrategy = Literal["dq-bart", "max_spacing", "uniform", "first", "last", "dq-bart-new"]
STRATEGIES = get_args(LayerMapStrategy)
# The strategies that apply one rule to both stacks (dq-bart-new treats the decoder apart): the hand-made seeds of
# `search-map`.
SAME_RULE_STRATEGIES = STRATEGIES[:5]
Stack = Literal["encoder", "decoder"]

# The official DQ-BART table (`distill_mappings` in run_summarization_no_trainer.py:90-96), for 6-layer teachers
# (bart-base, and each stack of the CPU-scale teachers). It differs from max_spacing at 4 and 5 layers.
DQ_BART_TABLE = {1: [5], 2: [0, 5], 3: [0, 2, 5], 4: [0, 2, 3, 5], 5: [0, 1, 3, 4, 5], 6: [0, 1, 2, 3, 4, 5]}
# Its `--new_distill_map` (`distill_mappings_new`, :97, used for the decoder only, :436-438): a 1-layer decoder
# copies teacher layer 0; the script refuses other decoder depths (:292-293).
DQ_BART_NEW_DECODER = {1: [0]}

def layer_map(teacher_layers: int, student_layers: int, strategy: str | Sequence[int] = "max_spacing",
              flag: str = "model.layer_map", allow_unsorted: bool = False, stack: Stack | None = None) -> list[int]:
    """Teacher layer index for each student layer of `stack` (encoder or decoder), in order.

    - `dq-bart`: the official code's table for a 6-layer teacher (1: [5], 2: [0, 5], 3: [0, 2, 5],
      4: [0, 2, 3, 5], 5: [0, 1, 3, 4, 5]); the official code has no table for other depths, which get
      max_spacing's formula.
    - `dq-bart-new`: the official `--new_distill_map`: the encoder as dq-bart, a decoder of 1 layer copies teacher
      layer 0 (the only decoder depth the official code takes with it); needs `stack`.
    - `max_spacing`: spread from the first to the last layer, i * (T-1) // (S-1); a 6-layer teacher gives
      [0, 2, 5] for 3 layers, [0, 5] for 2, [0, 1, 3, 5] for 4 and [0, 1, 2, 3, 5] for 5; one layer takes
      the last.
    - `uniform`: the last layer of each of S equal blocks, e.g. [1, 3, 5] for 6 -> 3.
    - `first` / `last`: the first or last S layers.
    - an explicit list of S increasing teacher indices; with `allow_unsorted`, S distinct teacher indices in any
      order (never a repeat: copying one teacher layer twice would put one module twice in the student, two
      layers sharing one set of weights).
    """
    if teacher_layers < 1:
        raise UserError(f"{flag}: the teacher has no layers")
    if not 1 <= student_layers <= teacher_layers:
        raise UserError(f"{flag}: a student of {student_layers} layers cannot be copied from a teacher of "
                        f"{teacher_layers} (the student may not be deeper than the teacher)")
    if isinstance(strategy, str):
        if strategy == "dq-bart-new":
            if stack is None:
                raise ValueError("layer map dq-bart-new differs per stack: give stack='encoder' or 'decoder'")
            if stack == "decoder":
                if student_layers not in DQ_BART_NEW_DECODER:
                    raise UserError(f"{flag}: model.shape.layer_map=dq-bart-new (the official --new_distill_map) "
                                    f"takes a 1-layer decoder only, not {student_layers}; set the depth to E-1")
                return list(DQ_BART_NEW_DECODER[student_layers])
            strategy = "dq-bart"
        if strategy == "dq-bart" and teacher_layers == 6:
            return list(DQ_BART_TABLE[student_layers])
        if strategy in ("dq-bart", "max_spacing"):
            if student_layers == 1:
                return [teacher_layers - 1]
            return [i * (teacher_layers - 1) // (student_layers - 1) for i in range(student_layers)]
        if strategy == "uniform":
            return [(i + 1) * teacher_layers // student_layers - 1 for i in range(student_layers)]
        if strategy == "first":
            return list(range(student_layers))
        if strategy == "last":
            return list(range(teacher_layers - student_layers, teacher_layers))
        raise UserError(f"{flag}={strategy!r} is not a strategy ({', '.join(STRATEGIES)}) or a list of layers")
    indices = [int(i) for i in strategy]
    if len(indices) != student_layers:
        raise UserError(f"{flag}={indices} has {len(indices)} entries but the student has {student_layers} layers")
    for index in indices:
        if not 0 <= index < teacher_layers:
            raise UserError(f"{flag}={indices}: layer {index} is outside the teacher's {teacher_layers} layers "
                            f"(0..{teacher_layers - 1})")
    if allow_unsorted and len(set(indices)) != len(indices):
        raise UserError(f"{flag}={indices} repeats a layer (a student copies each teacher layer at most once)")
    if not allow_unsorted and any(b <= a for a, b in zip(indices, indices[1:])):
        raise UserError(f"{flag}={indices} must be strictly increasing")
    return indices
