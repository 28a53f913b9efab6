import pytest
import torch

from dq_lightning.metrics import GenerationMetrics, split_sentences


def test_sentence_splitting_is_offline(monkeypatch):
    import nltk

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download NLTK data")

    monkeypatch.setattr(nltk, "download", no_download)
    assert split_sentences("Mr. Smith went to Washington. He arrived at 3 p.m. on Monday! Then he left.") == [
        "Mr. Smith went to Washington.", "He arrived at 3 p.m. on Monday!", "Then he left."]


def test_rouge_lsum_scores_sentence_by_sentence(monkeypatch):
    import nltk

    monkeypatch.setattr(nltk, "download", lambda *a, **k: (_ for _ in ()).throw(AssertionError("download")))
    metrics = GenerationMetrics()
    # Same sentences in swapped order: one LCS over the whole text loses a sentence, the union of
    # per-sentence LCS (Lsum) does not.
    prediction = "the cat sat on the mat. a dog ran in the park."
    reference = "a dog ran in the park. the cat sat on the mat."
    metrics.update([prediction], [reference], torch.tensor([12]))
    scores = metrics.compute()
    assert scores["rouge1"] == pytest.approx(100.0)
    assert scores["rougeLsum"] == pytest.approx(100.0)
    assert scores["rougeL"] < 60.0
    assert scores["gen_len"] == 12


def test_offline_splitter_is_used_only_while_scoring(monkeypatch):
    from torchmetrics.functional.text import rouge as torchmetrics_rouge

    import dq_lightning.metrics as metrics_module

    nltk_splitter = torchmetrics_rouge._split_sentence
    seen = []

    def recording_split(text):
        seen.append(text)
        return split_sentences(text)

    monkeypatch.setattr(metrics_module, "split_sentences", recording_split)
    metrics_module.OfflineROUGEScore(rouge_keys=("rougeLsum",)).update(["one. two."], ["two. one."])
    assert seen == ["one. two.", "two. one."]
    assert torchmetrics_rouge._split_sentence is nltk_splitter  # other ROUGEScores keep NLTK's


def test_bleu_for_translation():
    metrics = GenerationMetrics(translation=True)
    metrics.update(["the cat is on the mat"], ["the cat is on the mat"], torch.tensor([6]))
    assert metrics.compute()["bleu"] == pytest.approx(100.0)
    metrics.reset()
    metrics.update(["a completely different sentence here"], ["the cat is on the mat"], torch.tensor([5]))
    assert metrics.compute()["bleu"] < 10.0
