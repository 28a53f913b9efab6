"""`TeacherModule`: fine-tunes BART (mBART for en-ro) on a task; its best model becomes the teacher."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dq_lightning.errors import UserError
from dq_lightning.models.loading import load_or_build_model
from dq_lightning.pretrain.noising import encoder_reconstruction_loss
from dq_lightning.modules.seq2seq import Seq2SeqModule


class TeacherModule(Seq2SeqModule):
    """Label-smoothed fine-tuning with AdamW, linear warm-up and decay; scored by generation."""

    def __init__(self, model: str = "tiny", lr: float = 1e-3, weight_decay: float = 0.01,
                 warmup_ratio: float = 0.05, label_smoothing: float = 0.1, dropout: float | None = None,
                 generation: dict[str, Any] | None = None, generate_on_validation: bool = True,
                 attn_implementation: str = "eager", encoder_aux_weight: float = 0.0,
                 prediction_table_rows: int = 100):
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
            encoder_aux_weight: weight of an auxiliary loss that reconstructs every source token from the
                encoder's last hidden state through the tied embedding. A from-scratch post-LN encoder
                collapses to one output for every input within ~50 steps (the decoder then ignores the
                source); this term keeps the encoder's outputs input-specific. Used in CPU-scale pre-training.
            prediction_table_rows: test examples shown as a W&B table (source, reference, output, score); 0
                logs none. Every example's output and score is written to test_predictions.jsonl regardless.
        """
        super().__init__(lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio,
                         label_smoothing=label_smoothing, generation=generation,
                         generate_on_validation=generate_on_validation,
                         prediction_table_rows=prediction_table_rows)
        if encoder_aux_weight < 0:
            raise UserError(f"model.encoder_aux_weight={encoder_aux_weight} must not be negative")
        self.save_hyperparameters()

    def build_model(self, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
        overrides = {} if self.hparams.dropout is None else {"dropout": self.hparams.dropout}
        model = load_or_build_model(self.hparams.model, tokenizer, flag="model.model",
                                    attn_implementation=self.hparams.attn_implementation, **overrides)
        # from_pretrained returns the model in eval mode, and Lightning keeps modules in the mode it finds them:
        # without this, fine-tuning a pretrained BART would run without dropout.
        return model.train()

    def auxiliary_losses(self, batch: dict[str, torch.Tensor], outputs) -> dict[str, tuple[float, torch.Tensor]]:
        weight = self.hparams.encoder_aux_weight
        if weight == 0:
            return {}
        reconstruction = encoder_reconstruction_loss(outputs.encoder_last_hidden_state,
                                                     self.model.get_input_embeddings().weight, batch["input_ids"],
                                                     self.tokenizer.all_special_ids)
        return {"encoder_aux": (weight, reconstruction)}
