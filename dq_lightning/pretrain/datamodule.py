"""`DenoisingDataModule`: self-supervised pre-training pairs built from offline text.

A from-scratch BART fine-tuned on a few hundred summaries learns to ignore its input. Pre-training on
objectives whose targets can only be produced by reading the source (BART's text infilling and sentence
permutation, PEGASUS' gap sentences; see `noising`) teaches the encoder and cross-attention first. The
texts are the task's own training sources plus any `extra_text` (other local JSONL columns), never a
validation or test document; validation pairs are made from the validation sources, for the loss only.

Noise is drawn afresh every epoch from a generator seeded by (seed, epoch, example), so every epoch sees
new masks and a resumed run draws exactly the noise the uninterrupted run would have.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

from dq_lightning.data.datamodule import DATAMODULES, Seq2SeqDataModule, column_values
from dq_lightning.data.jsonl import get_field, read_lines
from dq_lightning.errors import UserError
from dq_lightning.metrics import split_sentences
from dq_lightning.pretrain.noising import gap_sentence_example, permute_sentences, text_infilling

OBJECTIVES = ("infilling", "gap_sentence", "lead")


class DenoisingDataset(Dataset):
    """One example per document per epoch; the objective and the noise are drawn per (epoch, index)."""

    def __init__(self, documents: list[list[str]], sentence_ids: list[list[list[int]]], module: DenoisingDataModule,
                 fixed_epoch: int | None = None):
        self.documents, self.sentence_ids, self.module, self.fixed_epoch = documents, sentence_ids, module, fixed_epoch

    def __len__(self) -> int:
        return len(self.documents)

    def _epoch(self) -> int:
        if self.fixed_epoch is not None:
            return self.fixed_epoch
        trainer = self.module.trainer
        return trainer.current_epoch if trainer is not None else 0

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        hp = self.module.hparams
        generator = torch.Generator().manual_seed(hp.seed * 1_000_003 + self._epoch() * 7919 + index)
        names = list(hp.objectives)
        weights = torch.tensor([float(hp.objectives[name]) for name in names])
        objective = names[int(torch.multinomial(weights, 1, generator=generator))]
        if objective == "infilling":
            return self._infilling(index, generator)
        return self._gap_sentence(index, generator, "lead" if objective == "lead" else "principal")

    def _wrap(self, ids: list[int], length: int) -> list[int]:
        tokenizer = self.module.tokenizer
        return [tokenizer.bos_token_id, *ids[: length - 2], tokenizer.eos_token_id]

    def _infilling(self, index: int, generator: torch.Generator) -> dict[str, list[int]]:
        """BART: a sentence-aligned chunk, sentences permuted, spans infilled; the target is the clean chunk."""
        hp, sentences = self.module.hparams, self.sentence_ids[index]
        length = hp.chunk_tokens
        if hp.min_chunk_tokens:
            length = int(torch.randint(hp.min_chunk_tokens, hp.chunk_tokens + 1, (1,), generator=generator))
        budget = length - 2
        start = int(torch.randint(len(sentences), (1,), generator=generator)) if len(sentences) > 1 else 0
        chunk, total = [], 0
        for sentence in sentences[start:]:
            if chunk and total + len(sentence) > budget:
                break
            chunk.append(sentence[:budget])
            total += len(chunk[-1])
        clean = [token for sentence in chunk for token in sentence]
        shuffled = permute_sentences(chunk, generator) if hp.permute_sentences else chunk
        noised = text_infilling([t for s in shuffled for t in s], self.module.tokenizer.mask_token_id,
                                hp.mask_ratio, hp.poisson_lambda, generator, protected_ids=())
        return {"input_ids": self._wrap(noised, hp.chunk_tokens), "labels": self._wrap(clean, hp.chunk_tokens)}

    def _gap_sentence(self, index: int, generator: torch.Generator, strategy: str) -> dict[str, list[int]]:
        """PEGASUS: a salient sentence (or the lead sentences) masked in the document is the target."""
        module, hp = self.module, self.module.hparams
        tokenizer, mask = module.tokenizer, module.tokenizer.mask_token
        lead = strategy == "lead"
        keep_prob = hp.lead_keep_prob if lead and hp.lead_keep_prob is not None else hp.gap_keep_prob
        source, target = gap_sentence_example(self.documents[index], mask, strategy=strategy, generator=generator,
                                              num_gaps=hp.lead_sentences if lead else 1,
                                              keep_gap_prob=keep_prob, top_k=hp.gap_top_k)
        return {"input_ids": tokenizer(source, max_length=module.max_source_length, truncation=True)["input_ids"],
                "labels": tokenizer(text_target=target, max_length=module.max_target_length,
                                    truncation=True)["input_ids"]}


class DenoisingDataModule(Seq2SeqDataModule):
    """Pre-training pairs (noised text -> clean text, or document -> gap sentence) from a task's sources."""

    def __init__(self, task: str = "xsum", extra_text: list[str] | None = None,
                 objectives: dict[str, float] | None = None, chunk_tokens: int = 128, min_chunk_tokens: int = 0,
                 mask_ratio: float = 0.3,
                 poisson_lambda: float = 3.0, permute_sentences: bool = True, gap_keep_prob: float = 0.2,
                 gap_top_k: int = 3, lead_sentences: int = 1, lead_keep_prob: float | None = None, seed: int = 0,
                 **kwargs):
        """
        Args:
            task: the task whose training sources (and tokenizer) are pre-trained on.
            extra_text: more offline text, as "<file.jsonl>:<column>" (dotted columns read nested fields).
            objectives: sampling weights of infilling (BART), gap_sentence (PEGASUS, principal sentence)
                and lead (PEGASUS, the first `lead_sentences`); default {infilling: 1.0}.
            chunk_tokens: length of the sentence-aligned chunks that infilling reconstructs.
            min_chunk_tokens: if > 0, each chunk's length is drawn uniformly from [min_chunk_tokens,
                chunk_tokens], so the model also sees short inputs (summary-length reconstruction).
            mask_ratio: share of tokens masked by infilling.
            poisson_lambda: mean span length of infilling.
            permute_sentences: shuffle the chunk's sentences before infilling (BART's permutation).
            gap_keep_prob: probability that a gap sentence stays in the source (PEGASUS keeps 20%).
            gap_top_k: draw the gap sentence among the k most salient.
            lead_sentences: how many leading sentences the lead objective takes as its target (news
                highlights follow about three).
            lead_keep_prob: probability that each lead sentence stays in the source; default gap_keep_prob.
                1.0 makes the lead objective "copy the lead", the extractive habit a summarizer of news starts from.
            seed: seed of the noise.
            **kwargs: the task DataModule's settings (data_dir, tokenizer, vocab_size, lengths, batch sizes).
        """
        self.task_name = task
        if isinstance(lead_sentences, bool) or not isinstance(lead_sentences, int) or lead_sentences < 1:
            raise UserError(f"data.lead_sentences={lead_sentences!r}: give a whole number >= 1")
        probabilities = {"gap_keep_prob": gap_keep_prob}
        if lead_keep_prob is not None:  # None: the lead objective keeps gap_keep_prob
            probabilities["lead_keep_prob"] = lead_keep_prob
        for name, prob in probabilities.items():
            if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0:
                raise UserError(f"data.{name}={prob!r}: a probability in [0, 1]")
        super().__init__(**kwargs)
        objectives = objectives or {"infilling": 1.0}
        for key, weight in objectives.items():
            if key not in OBJECTIVES:
                raise UserError(f"data.objectives.{key}: unknown key in --data.objectives; choose from "
                                f"{', '.join(OBJECTIVES)}")
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight >= 0:
                raise UserError(f"data.objectives.{key}={weight!r}: a weight must be a number >= 0")
        if not any(weight > 0 for weight in objectives.values()):
            raise UserError(f"data.objectives={objectives}: weights of {', '.join(OBJECTIVES)}, at least one positive")
        self.hparams["objectives"] = objectives
        self.extra_text = [self._parse_extra(entry) for entry in (extra_text or [])]

    def local_data_dir(self):
        # The task's own DataModule knows where its offline files are (the demo corpus is generated on first use).
        return DATAMODULES[self.task_name].local_data_dir(self)

    @staticmethod
    def _parse_extra(entry: str) -> tuple[Path, str]:
        path, _, column = entry.rpartition(":")
        if not path or not column:
            raise UserError(f"data.extra_text entry {entry!r} is not '<file.jsonl>:<column>'")
        if not Path(path).is_file():
            raise UserError(f"data.extra_text: {path}: no such file")
        return Path(path), column

    def _documents(self, texts: list[str]) -> tuple[list[list[str]], list[list[list[int]]]]:
        documents = [sentences for sentences in (split_sentences(text) for text in texts) if sentences]
        flat = [" " + sentence for document in documents for sentence in document]  # byte-level BPE word start
        encoded = self.tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
        sentence_ids, position = [], 0
        for document in documents:
            sentence_ids.append(encoded[position:position + len(document)])
            position += len(document)
        return documents, sentence_ids

    def _texts(self, split: str) -> list[str]:
        raw = self._raw_split(split)
        texts = list(column_values(raw[:], self.task.source_column))
        if split == "train":
            for path, column in self.extra_text:
                for number, line in read_lines(path):  # file and line for invalid UTF-8 too
                    if line.strip():
                        try:
                            texts.append(get_field(json.loads(line), column))
                        except (json.JSONDecodeError, KeyError):
                            raise UserError(f"{path}:{number}: no text in column {column!r}") from None
        return [text for text in texts if isinstance(text, str) and text.strip()]

    def _load_splits(self, splits: tuple[str, ...]) -> None:
        if self.tokenizer is None:
            self.tokenizer = self.build_tokenizer()
        if self.tokenizer.mask_token_id is None:
            raise UserError("data.tokenizer has no <mask> token, which denoising needs")
        for split in splits:
            if split in self.datasets or split == "test":
                continue
            documents, sentence_ids = self._documents(self._texts(split))
            if not documents:
                raise UserError(f"no text to pre-train on in the {split} split")
            self.datasets[split] = DenoisingDataset(documents, sentence_ids, self,
                                                    fixed_epoch=None if split == "train" else 0)

    def prepare_data(self) -> None:
        if self.tokenizer is None:
            self.tokenizer = self.build_tokenizer()

    def test_dataloader(self):
        raise UserError("a pre-training stage has no test split; fine-tune the model, then test it")
