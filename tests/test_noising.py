"""Fast tests of the self-supervised noise functions in `dq_lightning.pretrain.noising`."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from dq_lightning.pretrain.noising import (
    encoder_reconstruction_loss,
    gap_sentence_example,
    permute_sentences,
    poisson_span_lengths,
    principal_sentence_scores,
    text_infilling,
    unigram_f1,
)

BOS, PAD, EOS, MASK = 0, 1, 2, 4
SPECIALS = (BOS, PAD, EOS, 3, MASK)


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spans(noised: list[int], original: list[int], mask: int) -> list[int]:
    """Lengths of the spans each `<mask>` replaced, by aligning kept tokens (original tokens are unique)."""
    lengths, pos = [], 0
    pending = 0
    for token in noised:
        if token == mask:
            pending += 1
            continue
        idx = original.index(token, pos)
        if pending:
            assert pending == 1, "two adjacent masks"
            lengths.append(idx - pos)
            pending = 0
        pos = idx + 1
    if pending:
        lengths.append(len(original) - pos)
    return lengths


def test_poisson_span_lengths_sum_exactly_and_mean_is_lambda():
    g = make_generator(0)
    all_lengths = []
    for target in range(0, 200, 7):
        lengths = poisson_span_lengths(target, 3.0, g)
        assert sum(lengths) == target
        all_lengths += lengths[:-1]  # the last span is truncated
    mean = sum(all_lengths) / len(all_lengths)
    assert 2.6 < mean < 3.4
    assert 0 in all_lengths  # Poisson(3) gives ~5% empty spans (insertions)


def test_text_infilling_respects_mask_ratio_and_keeps_ends():
    g = make_generator(1)
    ids = [BOS] + list(range(10, 410)) + [EOS]
    noised = text_infilling(ids, MASK, mask_ratio=0.3, poisson_lambda=3.0, generator=g)
    assert noised[0] == BOS and noised[-1] == EOS
    kept = [t for t in noised if t not in (MASK, BOS, EOS)]
    assert len(kept) == 400 - round(0.3 * 400)  # exactly 30% removed
    assert kept == sorted(kept)  # kept tokens keep their order
    # each <mask> stands for one span; spans have Poisson(3)-like lengths
    spans = _spans(noised[1:-1], ids[1:-1], MASK)
    assert len(spans) == noised.count(MASK)
    assert sum(spans) == 120
    assert 2.0 < sum(spans) / len(spans) < 4.5


def test_text_infilling_span_length_distribution_is_poisson_like():
    g = make_generator(2)
    lengths = []
    for _ in range(50):
        ids = list(range(100, 300))
        noised = text_infilling(ids, MASK, 0.3, 3.0, g, protected_ids=())
        lengths += _spans(noised, ids, MASK)
    counts = Counter(lengths)
    mean = sum(lengths) / len(lengths)
    var = sum((x - mean) ** 2 for x in lengths) / len(lengths)
    assert 2.5 < mean < 3.5
    assert 1.5 < var < 4.5  # Poisson: variance ~ mean
    assert counts[0] > 0  # insertions happen
    assert counts[3] > counts[7]


def test_text_infilling_never_masks_special_tokens():
    g = make_generator(3)
    ids = [BOS] + list(range(10, 60)) + [EOS, EOS] + list(range(60, 110)) + [EOS]
    for _ in range(20):
        noised = text_infilling(ids, MASK, 0.5, 3.0, g, protected_ids=(BOS, PAD, EOS))
        assert noised.count(EOS) == 3 and noised.count(BOS) == 1
        assert noised[0] == BOS and noised[-1] == EOS


def test_text_infilling_is_deterministic_given_seed_and_varies_across_seeds():
    ids = list(range(10, 210))
    a = text_infilling(ids, MASK, 0.3, 3.0, make_generator(7), protected_ids=())
    b = text_infilling(ids, MASK, 0.3, 3.0, make_generator(7), protected_ids=())
    c = text_infilling(ids, MASK, 0.3, 3.0, make_generator(8), protected_ids=())
    assert a == b
    assert a != c


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_text_infilling_edge_ratios(ratio):
    ids = [BOS] + list(range(10, 30)) + [EOS]
    noised = text_infilling(ids, MASK, ratio, 3.0, make_generator(0))
    if ratio == 0.0:
        assert noised == ids
    else:
        assert noised[0] == BOS and noised[-1] == EOS
        assert all(t == MASK for t in noised[1:-1]) and len(noised) == 3


def test_permute_sentences_keeps_the_multiset_and_shuffles():
    sentences = [[10 + i, 20 + i] for i in range(8)]
    g = make_generator(0)
    orders = set()
    for _ in range(10):
        out = permute_sentences(sentences, g)
        assert sorted(out) == sorted(sentences)
        orders.add(tuple(map(tuple, out)))
    assert len(orders) > 5
    assert permute_sentences(sentences, make_generator(5)) == permute_sentences(sentences, make_generator(5))
    assert permute_sentences(["only"], g) == ["only"]


def test_permute_sentences_partial_ratio_moves_only_some():
    sentences = [f"s{i}" for i in range(20)]
    out = permute_sentences(sentences, make_generator(1), ratio=0.2)
    assert sorted(out) == sorted(sentences)
    assert sum(a != b for a, b in zip(out, sentences)) <= 4


def test_unigram_f1_and_principal_scores():
    assert unigram_f1("the cat sat", "the cat sat") == pytest.approx(1.0)
    assert unigram_f1("a b", "c d") == 0.0
    doc = ["Police arrested a man in Leeds.", "It rained.", "The man arrested by police in Leeds was charged."]
    scores = principal_sentence_scores(doc)
    assert scores[1] == 0.0 and scores[0] > 0.3 and scores[2] > 0.3


def test_gap_sentence_example_principal_lead_and_random():
    doc = ["Police arrested a man in Leeds.", "It rained.", "The man arrested by police in Leeds was charged.",
           "Nothing else."]
    src, tgt = gap_sentence_example(doc, strategy="principal", generator=make_generator(0))
    assert tgt in (doc[0], doc[2])
    assert src.count("<mask>") == 1 and tgt not in src
    src, tgt = gap_sentence_example(doc, strategy="lead", generator=make_generator(0))
    assert tgt == doc[0] and src.startswith("<mask> It rained.")
    src, tgt = gap_sentence_example(doc, strategy="random", num_gaps=2, generator=make_generator(0))
    assert src.count("<mask>") == 2 and len(tgt) > 0
    # keep_gap_prob=1: the gap sentence stays in the source (copy examples)
    src, tgt = gap_sentence_example(doc, strategy="lead", keep_gap_prob=1.0, generator=make_generator(0))
    assert "<mask>" not in src and src.startswith(tgt)
    # a one-sentence document has nothing to remove
    assert gap_sentence_example(["Just one."]) == ("Just one.", "Just one.")
    with pytest.raises(ValueError):
        gap_sentence_example(doc, strategy="nope")


def test_gap_sentence_top_k_varies_the_gap_deterministically():
    doc = [f"Sentence {i} about the council budget and {i} cuts." for i in range(6)] + ["Unrelated."]
    picks = {gap_sentence_example(doc, strategy="principal", top_k=3, generator=make_generator(s))[1]
             for s in range(20)}
    assert 1 < len(picks) <= 3
    a = gap_sentence_example(doc, strategy="principal", top_k=3, generator=make_generator(4))
    assert a == gap_sentence_example(doc, strategy="principal", top_k=3, generator=make_generator(4))


def test_generator_default_is_deterministic():
    ids = list(range(10, 60))
    assert text_infilling(ids, MASK, protected_ids=()) == text_infilling(ids, MASK, protected_ids=())


def test_encoder_reconstruction_loss_ignores_specials_and_rewards_identity():
    vocab, d = 12, 16
    emb = torch.eye(vocab, d) * 20.0  # tokens are orthogonal: hidden == embedding gives ~0 loss
    ids = torch.tensor([[BOS, 5, 6, 7, EOS, PAD], [BOS, 8, 9, 10, 11, EOS]])
    perfect = emb[ids]
    assert encoder_reconstruction_loss(perfect, emb, ids, SPECIALS).item() < 1e-3
    collapsed = torch.zeros(2, 6, d)  # a collapsed encoder: uniform prediction
    assert encoder_reconstruction_loss(collapsed, emb, ids, SPECIALS).item() == pytest.approx(torch.log(torch.tensor(12.0)).item(), rel=1e-5)
    only_specials = torch.tensor([[BOS, EOS, PAD]])
    assert encoder_reconstruction_loss(torch.zeros(1, 3, d), emb, only_specials, SPECIALS).item() == 0.0  # nothing to predict
