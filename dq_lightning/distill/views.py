"""Restricted views of a source: what a student reads of an unlabeled input while matching the teacher on all
of it (Cross-View Training's auxiliary views; Clark et al. 2018).

Views (`VIEWS`), each at `rate`:
- `full`: the source as the teacher reads it;
- `word_dropout`: each word (a token that starts a word, with the tokens that continue it) dropped with
  probability `rate`, at least one word kept;
- `perturb`: the robustness perturbations (`dq_lightning.evaluation.perturb`: typos, dropped and swapped
  words, changed digits) of `rate` of the words, on the decoded text, encoded again;
- `truncate`: the last `rate` share of the source's tokens cut (rounding to keep more).

Special tokens (`<s>`, `</s>`, language codes) always stay. The draws are seeded by (seed, epoch, the input's
index), so they are the same whatever the batch and after a resume, and differ from epoch to epoch.
"""

from __future__ import annotations

import math
import random
from typing import Literal, get_args

import torch
from torch import Tensor

from dq_lightning.evaluation.perturb import perturb
from dq_lightning.models.tokenizer import encode_texts, language_ids

View = Literal["full", "word_dropout", "perturb", "truncate"]
VIEWS = get_args(View)
_WORD_MARKERS = ("\u0120", "\u2581")  # byte-level BPE's "Ġ" and SentencePiece's "▁" begin a word


def draw_seed(seed: int, epoch: int, index: int) -> int:
    """One seed per (run seed, epoch, input), independent of batching."""
    return random.Random(f"{seed}:{epoch}:{index}").getrandbits(63)


def _pad_rows(rows: list[Tensor], pad_token_id: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of different lengths as a right-padded batch and its attention mask."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=like.dtype, device=like.device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=like.device)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    return ids, mask


class SourceView:
    """`view(input_ids, attention_mask, example_index, epoch)` -> the student's (input_ids, attention_mask)."""

    def __init__(self, kind: View, rate: float, tokenizer, max_source_length: int, seed: int = 0,
                 source_lang: str | None = None, target_lang: str | None = None):
        self.kind, self.rate, self.tokenizer, self.seed = kind, rate, tokenizer, seed
        self.max_source_length = max_source_length
        self.source_language = (language_ids(tokenizer, source_lang, target_lang) or (None,))[0]
        size = len(tokenizer)
        self.special = torch.zeros(size, dtype=torch.bool)
        special_ids = [i for i in tokenizer.all_special_ids if 0 <= i < size]
        if self.source_language is not None:
            special_ids.append(self.source_language)
        self.special[special_ids] = True
        self.word_start = torch.tensor([str(token).startswith(_WORD_MARKERS)
                                        for token in tokenizer.convert_ids_to_tokens(list(range(size)))])

    @property
    def keeps_source(self) -> bool:
        """The student reads exactly the teacher's source (the encoder-side terms compare like with like)."""
        return self.kind == "full"

    def __call__(self, input_ids: Tensor, attention_mask: Tensor, example_index: Tensor,
                 epoch: int) -> tuple[Tensor, Tensor]:
        if self.kind == "full":
            return input_ids, attention_mask
        if self.kind == "perturb":
            return self._perturbed(input_ids, attention_mask, example_index, epoch)
        rows = [ids[mask.bool()] for ids, mask in zip(input_ids, attention_mask)]
        if self.kind == "truncate":
            kept = [row[self._truncated(row)] for row in rows]
        else:
            kept = [row[self._words_kept(row, draw_seed(self.seed, epoch, int(index)))]
                    for row, index in zip(rows, example_index)]
        return _pad_rows(kept, self.tokenizer.pad_token_id, input_ids)

    def _truncated(self, row: Tensor) -> Tensor:
        special = self.special.to(row.device)[row]
        content = ~special
        keep = math.ceil((1 - self.rate) * int(content.sum()))
        return special | (torch.cumsum(content.long(), 0) <= keep)

    def _words_kept(self, row: Tensor, seed: int) -> Tensor:
        special = self.special.to(row.device)[row]
        after_special = torch.cat([torch.ones(1, dtype=torch.bool, device=row.device), special[:-1]])
        starts = self.word_start.to(row.device)[row] | special | after_special
        word = torch.cumsum(starts.long(), 0) - 1
        words = int(word[-1]) + 1 if len(word) else 0
        dropped = torch.rand(words, generator=torch.Generator().manual_seed(seed)) < self.rate
        keep = ~dropped.to(row.device)[word] | special
        if not bool((keep & ~special).any()) and bool((~special).any()):
            keep = torch.ones_like(keep)  # a view that drops every word reads nothing: keep the source
        return keep

    def _perturbed(self, input_ids: Tensor, attention_mask: Tensor, example_index: Tensor,
                   epoch: int) -> tuple[Tensor, Tensor]:
        texts = self.tokenizer.batch_decode(torch.where(attention_mask.bool(), input_ids, self.tokenizer.pad_token_id),
                                            skip_special_tokens=True)
        seeds = [draw_seed(self.seed, epoch, int(index)) for index in example_index]
        perturbed = [perturb(text, self.rate, seed).text for text, seed in zip(texts, seeds)]
        encoded = encode_texts(self.tokenizer, perturbed, self.max_source_length, self.source_language)
        return _pad_rows([torch.tensor(ids) for ids in encoded], self.tokenizer.pad_token_id, input_ids)
