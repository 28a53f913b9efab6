"""`TeacherModule`: fine-tunes BART (mBART for en-ro) on a task; its best model becomes the teacher."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dq_lightning.models.loading import load_or_build_model
from dq_lightning.seq2seq import Seq2SeqModule


class TeacherModule(Seq2SeqModule):
    """Label-smoothed fine-tuning with AdamW, linear warm-up and decay; scored by generation."""

    def __init__(self, model: str = "tiny", lr: float = 1e-3, weight_decay: float = 0.01,
                 warmup_ratio: float = 0.05, label_smoothing: float = 0.1, dropout: float | None = None,
                 generation: dict[str, Any] | None = None, generate_on_validation: bool = True,
                 attn_implementation: str = "eager"):
        """
        Args:
            model: a preset name (micro, tiny, small, bart-base, ...) built from scratch, a local Hugging Face
                model directory, or a Hub id such as facebook/bart-base.
            lr: peak learning rate of AdamW.
            weight_decay: AdamW weight decay (not applied to biases and LayerNorms).
            warmup_ratio: share of the training steps spent warming the learning rate up linearly.
            label_smoothing: label smoothing of the training cross-entropy.
            dropout: overrides the model config's dropout.
            generation: overrides of the task's decoding settings (num_beams, max_length, min_length,
                no_repeat_ngram_size, length_penalty, ...).
            generate_on_validation: generate and score ROUGE/BLEU at every validation, not only the loss.
            attn_implementation: "eager" (returns attention maps) or "sdpa" (faster, no maps).
        """
        super().__init__(lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio,
                         label_smoothing=label_smoothing, generation=generation,
                         generate_on_validation=generate_on_validation)
        self.save_hyperparameters()

    def build_model(self, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
        overrides = {} if self.hparams.dropout is None else {"dropout": self.hparams.dropout}
        return load_or_build_model(self.hparams.model, tokenizer, flag="model.model",
                                   attn_implementation=self.hparams.attn_implementation, **overrides)
