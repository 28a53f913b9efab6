"""`DQStudentModule`: distillation-aware quantization of a layer-copied student (DQ-BART).

The frozen teacher is held outside the module tree: it is not an `nn.Module` child, so it is never in the
optimizer, never wrapped by DDP, and never written again into the student's checkpoints (its directory is a
setting, and the student is rebuilt from it before a checkpoint is restored).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dq_lightning.callbacks.quantize import QuantizeOnForward
from dq_lightning.distill.layer_map import layer_map as make_layer_map
from dq_lightning.distill.losses import attention_loss, hidden_states_loss, logits_loss
from dq_lightning.distill.loyalty import Loyalty
from dq_lightning.distill.student import copy_student
from dq_lightning.errors import UserError
from dq_lightning.metrics import GenerationMetrics
from dq_lightning.models.loading import load_pretrained
from dq_lightning.quant import QuantConfig, is_converted, prepare
from dq_lightning.quant.config import FULL_PRECISION, parse_wea
from dq_lightning.seq2seq import Seq2SeqModule, label_smoothed_loss
from dq_lightning.size import model_size

MODES = ("dq", "quant_only", "distill_only")
LOGITS_LOSSES = ("mse", "kl")


def parse_depth(depth: str) -> tuple[int, int]:
    """`"6-3"` -> (6 encoder layers, 3 decoder layers)."""
    try:
        encoder, decoder = (int(part) for part in str(depth).split("-"))
    except ValueError:
        raise UserError(f"model.depth={depth!r} is not 'encoder-decoder' layers like '6-3'") from None
    return encoder, decoder


class DQStudentModule(Seq2SeqModule):
    """A shallower, quantized student trained against a frozen teacher.

    Modes give the paper's comparison: `dq` (distillation + quantization), `quant_only` (quantized student,
    task loss only) and `distill_only` (full-precision student, distillation losses).
    """

    def __init__(
        self,
        teacher: str,
        mode: str = "dq",
        w_bits: int = 2,
        e_bits: int = 2,
        a_bits: int = 8,
        bits: str | None = None,
        depth: str | None = None,
        student_encoder_layers: int | None = None,
        student_decoder_layers: int | None = None,
        layer_map: str = "max_spacing",
        encoder_layer_map: list[int] | None = None,
        decoder_layer_map: list[int] | None = None,
        task_weight: float = 1.0,
        logits_weight: float = 1.0,
        hidden_weight: float = 1.0,
        attention_weight: float = 1.0,
        logits_loss: str = "mse",
        temperature: float = 1.0,
        weight_method: str = "auto",
        quantize_attention_inputs: bool = False,
        quant_settings: dict[str, Any] | None = None,
        quant_warmup_steps: int = 0,
        evaluate_teacher: bool = False,
        lr: float = 3e-5,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.05,
        label_smoothing: float = 0.0,
        generation: dict[str, Any] | None = None,
        generate_on_validation: bool = True,
    ):
        """
        Args:
            teacher: the teacher's Hugging Face directory (what TeacherModule exports) or Hub id.
            mode: dq (distillation + quantization), quant_only (quantized, task loss only) or distill_only
                (full precision, distillation losses).
            w_bits: bits of the Linear weights (2 = ternary by default, 3, 4, 8, or 32 = full precision).
            e_bits: bits of the token embedding (shared with the LM head).
            a_bits: bits of the Linear layers' input activations.
            bits: the paper's W-E-A notation ("2-2-8"); overrides w_bits, e_bits and a_bits. "32-32-32" is a
                full-precision student (with mode dq, the distill_only baseline).
            depth: student "encoder-decoder" layers ("6-3"); overrides student_encoder_layers and
                student_decoder_layers.
            student_encoder_layers: encoder depth of the student (default: the teacher's).
            student_decoder_layers: decoder depth of the student (default: the teacher's).
            layer_map: which teacher layers the student copies: max_spacing (paper), uniform, first, last.
            encoder_layer_map: explicit teacher encoder layers to copy (overrides layer_map for the encoder).
            decoder_layer_map: explicit teacher decoder layers to copy (overrides layer_map for the decoder).
            task_weight: weight of the task cross-entropy.
            logits_weight: weight of the logits distillation loss.
            hidden_weight: weight of the hidden-state MSE (encoder + decoder, summed over layers).
            attention_weight: weight of the attention-map MSE (encoder self, decoder self, cross).
            logits_loss: mse (the paper's) or kl (with `temperature`).
            temperature: softening temperature of the KL logits loss.
            weight_method: weight quantizer: auto (ternary at 2 bits, min-max otherwise), minmax, ternary, lsq.
            quantize_attention_inputs: also quantize query, key, attention probabilities and value.
            quant_settings: further `QuantConfig` fields (e.g. {act_clip: 2.5, weight_granularity: row}).
            quant_warmup_steps: optimizer steps in full precision before quantization starts.
            evaluate_teacher: at test time also generate with the teacher and log test/teacher_<metric>.
            lr: peak learning rate of AdamW.
            weight_decay: AdamW weight decay (not applied to biases and LayerNorms).
            warmup_ratio: share of the steps spent warming the learning rate up linearly.
            label_smoothing: label smoothing of the task cross-entropy.
            generation: overrides of the task's decoding settings.
            generate_on_validation: generate and score ROUGE/BLEU at every validation.
        """
        super().__init__(lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio,
                         label_smoothing=label_smoothing, generation=generation,
                         generate_on_validation=generate_on_validation)
        self.save_hyperparameters()
        if mode not in MODES:
            raise UserError(f"model.mode={mode!r} is not one of {', '.join(MODES)}")
        if logits_loss not in LOGITS_LOSSES:
            raise UserError(f"model.logits_loss={logits_loss!r} is not one of {', '.join(LOGITS_LOSSES)}")
        for name in ("task_weight", "logits_weight", "hidden_weight", "attention_weight"):
            if self.hparams[name] < 0:
                raise UserError(f"model.{name}={self.hparams[name]} must not be negative")
        if bits is not None:
            w_bits, e_bits, a_bits = parse_wea(bits)
        if depth is not None:
            student_encoder_layers, student_decoder_layers = parse_depth(depth)
        full_precision = (w_bits, e_bits, a_bits) == (FULL_PRECISION,) * 3
        self.quant_config = None if mode == "distill_only" or full_precision else QuantConfig(
            w_bits=w_bits, e_bits=e_bits, a_bits=a_bits, weight_method=weight_method,
            quantize_attention_inputs=quantize_attention_inputs, **(quant_settings or {}))

        teacher_model = load_pretrained(teacher, flag="model.teacher", attn_implementation="eager")
        teacher_model.eval().requires_grad_(False)
        object.__setattr__(self, "_teacher", teacher_model)  # not a child module: see the module docstring
        config = teacher_model.config
        self.encoder_map = self._map("encoder", config.encoder_layers, student_encoder_layers, encoder_layer_map)
        self.decoder_map = self._map("decoder", config.decoder_layers, student_decoder_layers, decoder_layer_map)
        self.model = self._copy_student()
        self.val_loyalty, self.test_loyalty = Loyalty(), Loyalty()
        self.teacher_test_metrics: GenerationMetrics | None = None

    def _copy_student(self) -> PreTrainedModel:
        """A trainable full-precision student copied from the teacher's layers of the two maps."""
        return copy_student(self.teacher, self.encoder_map, self.decoder_map).requires_grad_(True).train()

    def _map(self, stack: str, teacher_layers: int, layers: int | None, explicit: list[int] | None) -> list[int]:
        layers = teacher_layers if layers is None else layers
        if explicit is not None:
            return make_layer_map(teacher_layers, layers, explicit, flag=f"model.{stack}_layer_map")
        return make_layer_map(teacher_layers, layers, self.hparams.layer_map, flag=f"model.student_{stack}_layers")

    @property
    def teacher(self) -> PreTrainedModel:
        return self._teacher

    def build_model(self, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
        return self.model

    def configure_model(self) -> None:
        super().configure_model()
        vocabulary = self.teacher.get_input_embeddings().num_embeddings
        if len(self.tokenizer) > vocabulary or self.tokenizer.pad_token_id != self.teacher.config.pad_token_id:
            raise UserError(f"model.teacher={self.hparams.teacher}: its vocabulary ({vocabulary} tokens) is not the "
                            f"data tokenizer's ({len(self.tokenizer)}); set data.tokenizer to the teacher's directory")
        if self.hparams.evaluate_teacher and self.teacher_test_metrics is None:
            self.teacher_test_metrics = GenerationMetrics(translation=self.task.is_translation)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("state_dict", {})
        if is_converted(self.model) and not any(key.endswith(".packed.codes") for key in state):
            # Testing the best checkpoint right after fit (test_after_fit): fit ended by converting the student
            # to integer codes, but checkpoints hold the latent weights. A fresh prepared student takes them;
            # its fake-quantized forward equals the converted one.
            generation_config = self.model.generation_config
            self.model = self._copy_student().to(self.device)
            self.model.generation_config = generation_config
            prepare(self.model, self.quant_config)

    def configure_callbacks(self):
        if self.quant_config is None:
            return []
        return [QuantizeOnForward(self.quant_config, student_attr="model", teacher_attr="teacher",
                                  warmup_steps=self.hparams.quant_warmup_steps)]

    # -- training -------------------------------------------------------------------------------------
    def _needs_teacher(self, stage: str) -> bool:
        return self.hparams.mode != "quant_only" or stage != "train"

    def _teacher_outputs(self, inputs: dict[str, torch.Tensor], details: bool):
        if self.teacher.device != self.device:
            self.teacher.to(self.device)
        with torch.no_grad():
            return self.teacher(**inputs, output_hidden_states=details, output_attentions=details)

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        hp = self.hparams
        labels = batch["labels"]
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      decoder_input_ids=self.model.prepare_decoder_input_ids_from_labels(labels=labels))
        distill = hp.mode != "quant_only"
        want_hidden, want_attention = distill and hp.hidden_weight > 0, distill and hp.attention_weight > 0
        student = self.model(**inputs, output_hidden_states=want_hidden, output_attentions=want_attention)
        teacher = (self._teacher_outputs(inputs, want_hidden or want_attention)
                   if self._needs_teacher(stage) else None)

        source_mask, target_mask = batch["attention_mask"], labels != -100
        terms = {"task": label_smoothed_loss(student.logits, labels, hp.label_smoothing if stage == "train" else 0)}
        weights = {"task": hp.task_weight}
        if distill:
            terms["logits"] = logits_loss(student.logits, teacher.logits, target_mask, hp.logits_loss,
                                          hp.temperature)
            weights["logits"] = hp.logits_weight
        if want_hidden:
            terms["hidden"] = (
                hidden_states_loss(student.encoder_hidden_states, teacher.encoder_hidden_states,
                                   self.encoder_map, source_mask)
                + hidden_states_loss(student.decoder_hidden_states, teacher.decoder_hidden_states,
                                     self.decoder_map, target_mask))
            weights["hidden"] = hp.hidden_weight
        if want_attention:
            terms["attention"] = (
                attention_loss(student.encoder_attentions, teacher.encoder_attentions, self.encoder_map,
                               source_mask, source_mask)
                + attention_loss(student.decoder_attentions, teacher.decoder_attentions, self.decoder_map,
                                 target_mask, target_mask)
                + attention_loss(student.cross_attentions, teacher.cross_attentions, self.decoder_map,
                                 target_mask, source_mask))
            weights["attention"] = hp.attention_weight
        loss = sum(weights[name] * value for name, value in terms.items())

        batch_size = labels.size(0)
        sync = stage != "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=sync)
        self.log_dict({f"{stage}/loss_{name}": value for name, value in terms.items()},
                      batch_size=batch_size, sync_dist=sync)
        if stage in ("val", "test"):
            (self.val_loyalty if stage == "val" else self.test_loyalty).update(student.logits, teacher.logits,
                                                                               target_mask)
        self.last_loss_terms = {name: value.detach() for name, value in terms.items()}
        return loss

    def run_summary(self) -> dict[str, Any]:
        """What this run is, for sweep results: mode, W-E-A bits and depth as actually used."""
        quant = self.quant_config
        # dq at 32-32-32 trains exactly as distill_only does; one name keeps them one series in plots.
        mode = "distill_only" if quant is None and self.hparams.mode == "dq" else self.hparams.mode
        return {"mode": mode, "bits": quant.notation if quant else "32-32-32",
                "encoder_layers": len(self.encoder_map), "decoder_layers": len(self.decoder_map),
                "encoder_layer_map": self.encoder_map, "decoder_layer_map": self.decoder_map,
                "teacher": self.hparams.teacher}

    # -- evaluation -----------------------------------------------------------------------------------
    def size_metrics(self) -> dict[str, float]:
        """Size (MiB) and compression against the FP32 teacher, DQ-BART's accounting and the strict one."""
        quant = self.quant_config or QuantConfig(w_bits=32, e_bits=32, a_bits=32)
        paper = model_size(self.teacher.config, quant, encoder_layers=len(self.encoder_map),
                           decoder_layers=len(self.decoder_map), convention="paper")
        strict = model_size(self.teacher.config, quant, encoder_layers=len(self.encoder_map),
                            decoder_layers=len(self.decoder_map), convention="strict")
        return {"size_mb": paper.size_mb, "compression": paper.compression,
                "size_mb_strict": strict.size_mb, "compression_strict": strict.compression}

    def _log_generation_metrics(self, stage: str) -> None:
        super()._log_generation_metrics(stage)
        loyalty = self.val_loyalty if stage == "val" else self.test_loyalty
        self.log_dict({f"{stage}/{key}": value for key, value in loyalty.compute().items()})
        loyalty.reset()
        self.log_dict({f"{stage}/{key}": float(value) for key, value in self.size_metrics().items()})
        if stage == "test" and self.teacher_test_metrics is not None:
            scores = self.teacher_test_metrics.compute()
            self.log_dict({f"test/teacher_{key}": value for key, value in scores.items()})
            self.teacher_test_metrics.reset()

    def _evaluate(self, batch, stage: str) -> None:
        super()._evaluate(batch, stage)
        if stage == "test" and self.teacher_test_metrics is not None:
            if self.teacher.device != self.device:
                self.teacher.to(self.device)
            generated = self.teacher.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                              generation_config=self.model.generation_config)
            lengths = (generated != self.tokenizer.pad_token_id).sum(dim=1) - 1
            self.teacher_test_metrics.update(self.decode(generated), self.decode(batch["labels"]), lengths)
