"""Self-supervised objectives for pre-training a from-scratch BART teacher on offline text.

Why this module exists: a BART trained from scratch on a few hundred summarization pairs learns the
decoder's unconditional language model and ignores the encoder (every input gets the same summary).
Objectives whose target can only be predicted by reading the input teach the cross-attention to look at
the source and copy from it before the model ever sees a summary:

* `text_infilling` - BART's main noise (Lewis et al., 2020, section 2.2): spans with Poisson(3) lengths
  cover ~30% of the tokens and each span becomes one `<mask>` token (a 0-length span inserts a `<mask>`),
  so the model must also predict how many tokens are missing. The target is the clean text, which is
  mostly a copy of the input.
* `permute_sentences` - BART's sentence permutation: the target restores the original order.
* `gap_sentence_example` - PEGASUS gap-sentence generation (Zhang et al., 2020): the most "principal"
  sentence(s) (highest unigram F1 against the rest of the document) or the lead sentence(s) are removed
  from the document, replaced by one `<mask>` each, and become the target. This is the objective closest
  to abstractive single-sentence summarization (XSum).

Denoising alone does not make a from-scratch post-LN BART read its input: its encoder can collapse early in
training to one output vector for every position of every document, after which cross-attention carries no
information and the decoder learns an unconditional language model. `encoder_reconstruction_loss` (predict
every source token from the last encoder state through the tied embedding, `TeacherModule`'s
`encoder_aux_weight`) keeps every encoder position tied to its token, which is what the decoder needs to
learn to copy.

All functions are pure and deterministic given a `torch.Generator` (or a seed); they work on lists of
token ids (text infilling, permutation) or on sentence strings (gap sentences), never on Lightning objects.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import TypeVar

import torch

T = TypeVar("T")

__all__ = [
    "poisson_span_lengths",
    "text_infilling",
    "permute_sentences",
    "principal_sentence_scores",
    "gap_sentence_example",
    "unigram_f1",
    "encoder_reconstruction_loss",
]


def poisson_span_lengths(num_to_mask: int, poisson_lambda: float, generator: torch.Generator,
                         max_spans: int | None = None) -> list[int]:
    """Span lengths drawn from Poisson(`poisson_lambda`) until they cover exactly `num_to_mask` tokens.

    The last span is shortened so that the lengths sum to `num_to_mask`; 0-length spans (insertions) are
    kept, as in BART. With `max_spans`, at most that many spans are drawn; any tokens still to cover are
    added to the non-empty spans in turn, so the sum stays exact whenever a non-empty span exists.
    """
    if num_to_mask < 0:
        raise ValueError("num_to_mask must be >= 0")
    lengths: list[int] = []
    total = 0
    while total < num_to_mask and (max_spans is None or len(lengths) < max_spans):
        # Draw a block at a time: much faster than one sample per call.
        block = torch.poisson(torch.full((64,), float(poisson_lambda)), generator=generator).long().tolist()
        for length in block:
            if total >= num_to_mask or (max_spans is not None and len(lengths) >= max_spans):
                break
            length = min(length, num_to_mask - total)
            lengths.append(length)
            total += length
    if total < num_to_mask:  # only with max_spans: spread the remainder over the spans
        nonzero = [i for i, length in enumerate(lengths) if length > 0] or list(range(len(lengths)))
        i = 0
        while total < num_to_mask and nonzero:
            lengths[nonzero[i % len(nonzero)]] += 1
            total += 1
            i += 1
    return lengths


def text_infilling(ids: Sequence[int], mask_token_id: int, mask_ratio: float = 0.3,
                   poisson_lambda: float = 3.0, generator: torch.Generator | None = None,
                   protected_ids: Sequence[int] = (0, 1, 2)) -> list[int]:
    """BART text infilling: replace spans covering ~`mask_ratio` of the tokens by one `mask_token_id` each.

    `ids` is one sequence (it may start with `<s>` and end with `</s>`); tokens in `protected_ids`
    (by default `<s>`=0, `<pad>`=1, `</s>`=2) are never masked and keep their position at the ends.
    Exactly `round(mask_ratio * n)` of the n maskable tokens are removed, in spans with Poisson lengths;
    a 0-length span inserts a `<mask>` without removing anything. Spans never touch each other (at least
    one kept token between two spans), so the number of `<mask>` tokens equals the number of spans.
    Returns the noised sequence (the target is `ids` itself).
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    ids = list(ids)
    protected = set(protected_ids)
    # Protected tokens at the two ends stay where they are; the middle is the maskable body.
    start = 0
    while start < len(ids) and ids[start] in protected:
        start += 1
    end = len(ids)
    while end > start and ids[end - 1] in protected:
        end -= 1
    head, body, tail = ids[:start], ids[start:end], ids[end:]
    if not body or mask_ratio <= 0:
        return ids
    # Protected tokens inside the body (rare) are split out: noise each segment between them.
    if any(t in protected for t in body):
        out: list[int] = list(head)
        segment: list[int] = []
        for token in body + [None]:  # type: ignore[list-item]
            if token is None or token in protected:
                if segment:
                    out += text_infilling(segment, mask_token_id, mask_ratio, poisson_lambda, generator, ())
                    segment = []
                if token is not None:
                    out.append(token)
            else:
                segment.append(token)
        return out + tail
    num_to_mask = int(round(mask_ratio * len(body)))
    if num_to_mask == 0:
        return ids
    return head + _infill(body, mask_token_id, num_to_mask, poisson_lambda, generator) + tail


def _infill(body: list[int], mask_token_id: int, num_to_mask: int, poisson_lambda: float,
            generator: torch.Generator) -> list[int]:
    """`body` with `num_to_mask` of its tokens removed in Poisson spans, each span one `mask_token_id`."""
    n = len(body)
    # Spans need distinct slots among the n - num_to_mask + 1 gaps around the kept tokens.
    lengths = poisson_span_lengths(num_to_mask, poisson_lambda, generator)
    kept = n - num_to_mask
    # Too many spans for the gaps: merge the last ones (keeps the masked count exact).
    while len(lengths) > kept + 1:
        last = lengths.pop()
        lengths[-1] += last
    slots = sorted(torch.randperm(kept + 1, generator=generator)[: len(lengths)].tolist())
    order = torch.randperm(len(lengths), generator=generator).tolist()  # spans in random order
    span_at = {slot: lengths[i] for slot, i in zip(slots, order)}
    out: list[int] = []
    pos = 0  # index into body
    for gap in range(kept + 1):
        if gap in span_at:
            out.append(mask_token_id)
            pos += span_at[gap]
        if gap < kept:
            out.append(body[pos])
            pos += 1
    assert pos == n
    return out


def permute_sentences(sentences: Sequence[T], generator: torch.Generator | None = None,
                      ratio: float = 1.0) -> list[T]:
    """BART sentence permutation: a random order of `sentences` (token-id lists or strings).

    With `ratio` < 1 only that fraction of the sentences (chosen at random) change places among
    themselves, as in fairseq's `permute_sentence_ratio`. The multiset of sentences is unchanged.
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    sentences = list(sentences)
    n = len(sentences)
    if n < 2 or ratio <= 0:
        return sentences
    k = max(2, int(round(ratio * n))) if ratio < 1 else n
    chosen = torch.randperm(n, generator=generator)[:k].tolist()
    shuffled = [chosen[i] for i in torch.randperm(k, generator=generator).tolist()]
    out = list(sentences)
    for dst, src in zip(chosen, shuffled):
        out[dst] = sentences[src]
    return out


_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def unigram_f1(candidate: str | Sequence[str], reference: str | Sequence[str]) -> float:
    """ROUGE-1 F1 between two texts (lower-cased alphanumeric words, no stemming): fast and dependency-free."""
    c = Counter(_words(candidate) if isinstance(candidate, str) else candidate)
    r = Counter(_words(reference) if isinstance(reference, str) else reference)
    overlap = sum((c & r).values())
    if overlap == 0:
        return 0.0
    precision = overlap / sum(c.values())
    recall = overlap / sum(r.values())
    return 2 * precision * recall / (precision + recall)


def principal_sentence_scores(sentences: Sequence[str]) -> list[float]:
    """PEGASUS "Ind-Orig" score of each sentence: unigram F1 between it and the rest of the document."""
    words = [_words(s) for s in sentences]
    total = Counter(w for ws in words for w in ws)
    scores = []
    for ws in words:
        rest = total - Counter(ws)
        scores.append(unigram_f1(ws, list(rest.elements())))
    return scores


def gap_sentence_example(sentences: Sequence[str], mask_token: str = "<mask>", strategy: str = "principal",
                         num_gaps: int = 1, generator: torch.Generator | None = None,
                         keep_gap_prob: float = 0.0, top_k: int = 1) -> tuple[str, str]:
    """PEGASUS gap-sentence generation: (source, target) built from one document's `sentences`.

    `strategy` picks the gap sentences:
      * "principal": the `num_gaps` sentences with the highest unigram F1 against the rest of the document
        (with `top_k` > `num_gaps`, `num_gaps` are drawn at random among the `top_k` best, for variety
        across epochs);
      * "lead": the first `num_gaps` sentences (the lead is the classic extractive summary of news);
      * "random": `num_gaps` sentences drawn at random.
    Each gap sentence is replaced in the source by `mask_token`, unless kept (probability `keep_gap_prob`,
    PEGASUS keeps 20% so that the model also learns to copy). The target is the gap sentences, in document
    order, joined by a space. Documents with fewer than 2 sentences give (document, document).
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    sentences = [s.strip() for s in sentences if s.strip()]
    n = len(sentences)
    if n < 2:
        text = " ".join(sentences)
        return text, text
    num_gaps = max(1, min(num_gaps, n - 1))
    if strategy == "principal":
        scores = principal_sentence_scores(sentences)
        ranked = sorted(range(n), key=lambda i: (-scores[i], i))
        pool = ranked[: max(num_gaps, min(top_k, n - 1))]
        pick = torch.randperm(len(pool), generator=generator)[:num_gaps].tolist() if len(pool) > num_gaps \
            else range(num_gaps)
        gaps = sorted(pool[i] for i in pick)
    elif strategy == "lead":
        gaps = list(range(num_gaps))
    elif strategy == "random":
        gaps = sorted(torch.randperm(n, generator=generator)[:num_gaps].tolist())
    else:
        raise ValueError(f"unknown gap-sentence strategy {strategy!r}; use principal, lead or random")
    gap_set = set(gaps)
    source_parts = []
    for i, sentence in enumerate(sentences):
        if i in gap_set:
            keep = keep_gap_prob > 0 and torch.rand((), generator=generator).item() < keep_gap_prob
            source_parts.append(sentence if keep else mask_token)
        else:
            source_parts.append(sentence)
    target = " ".join(sentences[i] for i in gaps)
    return " ".join(source_parts), target


def encoder_reconstruction_loss(encoder_hidden: torch.Tensor, embedding_weight: torch.Tensor,
                                input_ids: torch.Tensor, special_ids: Sequence[int]) -> torch.Tensor:
    """Cross-entropy of predicting each source token from the last encoder state via the (tied) embedding.

    `encoder_hidden` is (batch, src_len, d_model), `embedding_weight` (vocab, d_model) - BART's shared
    embedding, which is also its output projection - and `input_ids` (batch, src_len). Positions holding one of
    `special_ids` (`<s>`, `<pad>`, `</s>`, `<mask>`, language codes, ...) are not predicted.

    Why: while cross-attention is still unfocused, any variation in the encoder output is noise to the
    decoder's language model, so a from-scratch encoder is pushed towards a constant (the module docstring).
    This term makes every encoder position keep its token's identity. It costs one (src_len x vocab)
    projection per batch.
    """
    logits = torch.nn.functional.linear(encoder_hidden, embedding_weight)
    special = torch.as_tensor(list(special_ids), device=input_ids.device)
    targets = input_ids.masked_fill(torch.isin(input_ids, special), -100)
    if not bool((targets != -100).any()):
        return logits.sum() * 0.0  # nothing to predict: a zero that keeps the graph
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
