"""Generation metrics: ROUGE-1/2/L/Lsum and SacreBLEU from torchmetrics, as percentages.

ROUGE-Lsum scores the longest common subsequence sentence by sentence, so it needs a sentence splitter.
torchmetrics uses NLTK's `punkt_tab` model, which it downloads on first use; that download fails offline
(and on locked-down clusters). `pysbd`, a rule-based splitter with no data files, replaces it here.
"""

from __future__ import annotations

import functools
from unittest import mock

import torch
from torch import nn
from torchmetrics import CatMetric, MeanMetric
from torchmetrics.functional.text import rouge as _torchmetrics_rouge
from torchmetrics.text import ROUGEScore, SacreBLEUScore

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")

if not hasattr(_torchmetrics_rouge, "_split_sentence"):
    raise ImportError("this torchmetrics version no longer has rouge._split_sentence; dq_lightning's offline "
                      "ROUGE-Lsum (OfflineROUGEScore) must be adapted to it")


@functools.lru_cache(maxsize=1)
def _segmenter():
    import pysbd

    return pysbd.Segmenter(language="en", clean=False)


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`, found offline."""
    text = text.replace("<n>", " ")  # PEGASUS-style newline marker, as torchmetrics strips it
    return [sentence.strip() for sentence in _segmenter().segment(text) if sentence.strip()]


class OfflineROUGEScore(ROUGEScore):
    """torchmetrics' `ROUGEScore` with ROUGE-Lsum's sentences split by `split_sentences` instead of NLTK.

    torchmetrics takes no splitter argument, so the swap of its module-level splitter lasts only while this
    metric scores a batch: plain `ROUGEScore`s elsewhere in the process keep NLTK's.
    """

    def update(self, preds, target) -> None:
        with mock.patch.object(_torchmetrics_rouge, "_split_sentence", split_sentences):
            super().update(preds, target)


def text_hash(text: str) -> float:
    """A 52-bit hash of `text` that survives a float64 round trip (CatMetric states are float tensors)."""
    import hashlib

    return float(int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 12)


class GenerationMetrics(nn.Module):
    """Scores generated texts against references; `compute()` gives percentages keyed by metric name.

    Every state is a torchmetrics state, so values are reduced across DDP ranks before they are read.
    """

    def __init__(self, translation: bool = False):
        super().__init__()
        self.translation = translation
        if translation:
            self.bleu = SacreBLEUScore(tokenize="13a")
        else:
            self.rouge = OfflineROUGEScore(use_stemmer=True, rouge_keys=ROUGE_KEYS)
        self.gen_len = MeanMetric()
        # Hashes of the generated texts: `distinct` (share of different outputs) shows a model that ignores its
        # input and says the same thing for everything; hashes, unlike strings, gather across DDP ranks.
        self.output_hashes = CatMetric()

    def update(self, predictions: list[str], references: list[str], lengths: torch.Tensor) -> None:
        if self.translation:
            self.bleu.update(predictions, [[reference] for reference in references])
        else:
            self.rouge.update(predictions, references)
        self.gen_len.update(lengths.float())
        self.output_hashes.update(torch.tensor([text_hash(p) for p in predictions], dtype=torch.float64))

    def compute(self) -> dict[str, torch.Tensor]:
        if self.translation:
            scores = {"bleu": self.bleu.compute() * 100}
        else:
            rouge = self.rouge.compute()
            scores = {key: rouge[f"{key}_fmeasure"] * 100 for key in ROUGE_KEYS}
        scores["gen_len"] = self.gen_len.compute()
        hashes = self.output_hashes.compute()
        scores["distinct"] = torch.unique(hashes).numel() / max(hashes.numel(), 1) * 100
        return scores

    def reset(self) -> None:
        for metric in self.children():
            metric.reset()
