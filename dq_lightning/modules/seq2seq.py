"""What the teacher and the student share: the task loss, generation, scoring and the optimizer.

The model is built in `configure_model`, once the DataModule has its tokenizer (a trained BPE decides the
vocabulary size); Lightning calls it before restoring a checkpoint, so `--ckpt_path` works for every stage.
"""

from __future__ import annotations

import difflib
import json
import math
import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers import get_linear_schedule_with_warmup

from dq_lightning.checkpoints import class_path, record_stop_mid_epoch
from dq_lightning.data.tasks import TaskSpec
from dq_lightning.errors import UserError
from dq_lightning.evaluation.per_example import SOURCE_CHARS, gather_rows, score_rows
from dq_lightning.files import replace_directory
from dq_lightning.metrics import GenerationMetrics

class NonFiniteLossError(UserError):
    """The loss became NaN or infinite."""


NO_DECAY = ("bias", "layer_norm", "layernorm", "LayerNorm")


def label_smoothed_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Mean cross-entropy over target positions; label -100 (padding) does not count."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                           ignore_index=-100, label_smoothing=smoothing)


def mbart_generation_settings(model, tokenizer, source_lang: str | None, target_lang: str | None) -> dict:
    """For an mBART model whose tokenizer has the target code: start the decoder at it, and never write a
    language code (mBART's labels end `</s> ro_RO`, so a model early in training ranks the code high at every
    step, and a code is never part of a translation). `{}` for other models and tasks."""
    if not target_lang or tokenizer is None or model is None or model.config.model_type != "mbart":
        return {}
    vocab = tokenizer.get_vocab()
    if target_lang not in vocab:
        return {}
    codes = sorted({vocab[code] for code in (source_lang, target_lang) if code in vocab})
    return {"decoder_start_token_id": vocab[target_lang], "suppress_tokens": codes}


def save_hf_directory(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path,
                      info: dict[str, Any]) -> Path:
    """Write model + tokenizer as a Hugging Face directory, replacing `out_dir` only once complete."""
    with replace_directory(out_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "dq_lightning.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    return Path(out_dir)


def _check_generation_keys(generation: dict[str, Any] | None) -> None:
    """Refuse a key GenerationConfig does not know (it would keep it as an attribute that nothing reads)."""
    known = GenerationConfig().to_dict()
    for key in generation or {}:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise UserError(f"model.generation.{key}: unknown generation setting in --model.generation{hint}")


class Seq2SeqModule(pl.LightningModule):
    """Base LightningModule for a seq2seq model trained on a `Seq2SeqDataModule`.

    Subclasses build `self.model` in `build_model()` and may add terms to the loss in `auxiliary_losses()`.
    """

    def __init__(self, lr: float = 1e-3, weight_decay: float = 0.01, warmup_ratio: float = 0.05,
                 label_smoothing: float = 0.1, generation: dict[str, Any] | None = None,
                 generate_on_validation: bool = True, prediction_table_rows: int = 100):
        super().__init__()
        if prediction_table_rows < 0:
            raise UserError(f"model.prediction_table_rows={prediction_table_rows} must be 0 or more")
        if lr <= 0:
            raise UserError(f"model.lr={lr} must be positive")
        if not 0 <= warmup_ratio < 1:
            raise UserError(f"model.warmup_ratio={warmup_ratio} must be in [0, 1)")
        if not 0 <= label_smoothing < 1:
            raise UserError(f"model.label_smoothing={label_smoothing} must be in [0, 1)")
        _check_generation_keys(generation)
        # Held here rather than read from hparams: a subclass may group its own arguments differently.
        self.lr, self.weight_decay, self.warmup_ratio, self.label_smoothing = lr, weight_decay, warmup_ratio, \
            label_smoothing
        self.generation_overrides, self.generate_on_validation = generation, generate_on_validation
        self.prediction_table_rows = prediction_table_rows
        self.model: PreTrainedModel | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.task: TaskSpec | None = None
        self.val_metrics: GenerationMetrics | None = None
        self.test_metrics: GenerationMetrics | None = None
        self._test_rows: list[dict[str, Any]] = []
        # The last test's per-example rows, scored (on rank 0): MetricsFile writes them to the run directory.
        self.test_predictions: list[dict[str, Any]] | None = None

    # -- building ---------------------------------------------------------------------------------------
    def build_model(self, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
        raise NotImplementedError

    def attach(self, tokenizer: PreTrainedTokenizerBase, task: TaskSpec) -> None:
        """Bind the tokenizer and task, building the model if it does not exist yet (idempotent)."""
        if self.tokenizer is not None:
            return
        self.tokenizer, self.task = tokenizer, task
        if self.model is None:
            self.model = self.build_model(tokenizer)
        self.model.generation_config = self.generation_config()
        self.val_metrics = GenerationMetrics(translation=task.is_translation)
        self.test_metrics = GenerationMetrics(translation=task.is_translation)

    def standalone_context(self) -> tuple[PreTrainedTokenizerBase, TaskSpec]:
        """The tokenizer and task of `load_from_checkpoint` outside a Trainer, where no DataModule gives them."""
        raise UserError(f"{type(self).__name__}.load_from_checkpoint needs a Trainer here (its DataModule gives "
                        "the tokenizer); use trainer.test(model, datamodule, ckpt_path=...)")

    def configure_model(self) -> None:
        if self._trainer is None:  # Lightning's load_from_checkpoint outside a Trainer
            self.attach(*self.standalone_context())
            return
        datamodule = self.trainer.datamodule
        if datamodule is None or getattr(datamodule, "tokenizer", None) is None:
            raise UserError("this model needs a dq_lightning DataModule (the `data:` section of the config)")
        self.attach(datamodule.tokenizer, datamodule.task)
        positions = self.model.config.max_position_embeddings
        for flag, length in (("data.max_source_length", datamodule.max_source_length),
                             ("data.max_target_length", datamodule.max_target_length)):
            if length > positions:
                raise UserError(f"{flag}={length} exceeds the model's {positions} positions "
                                "(max_position_embeddings)")

    def generation_config(self) -> GenerationConfig:
        settings = {**self.task.generation, **(self.generation_overrides or {})}
        _check_generation_keys(settings)
        base = self.model.generation_config.to_dict() if self.model is not None else {}
        for key in ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id",
                    "forced_eos_token_id", "forced_bos_token_id"):
            if base.get(key) is not None:
                settings.setdefault(key, base[key])
        # mBART generates after the target-language code (en-ro: ro_RO) instead of </s>: its shift_tokens_right
        # starts the decoder on the labels' last token, the code. BART's shift starts on </s>, so a BART model
        # keeps </s> even when the tokenizer holds language codes.
        mbart = mbart_generation_settings(self.model, self.tokenizer, self.task.source_lang, self.task.target_lang)
        if mbart:
            settings["decoder_start_token_id"] = mbart["decoder_start_token_id"]
            settings["suppress_tokens"] = sorted({*(settings.get("suppress_tokens") or ()), *mbart["suppress_tokens"]})
        return GenerationConfig(**settings)

    # -- training -------------------------------------------------------------------------------------
    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        labels = batch["labels"]
        outputs = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             decoder_input_ids=self.model.prepare_decoder_input_ids_from_labels(labels=labels))
        task = label_smoothed_loss(outputs.logits, labels, self.label_smoothing if stage == "train" else 0.0)
        auxiliary = self.auxiliary_losses(batch, outputs)
        loss = task
        for weight, term in auxiliary.values():
            loss = loss + weight * term
        size, sync = labels.size(0), stage != "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=size, sync_dist=sync)
        if auxiliary:
            terms = {"task": task, **{name: term for name, (_, term) in auxiliary.items()}}
            self.log_dict({f"{stage}/loss_{name}": term for name, term in terms.items()}, batch_size=size,
                          sync_dist=sync)
            self.last_loss_terms = {name: term.detach() for name, term in terms.items()}
        return loss

    def auxiliary_losses(self, batch: dict[str, torch.Tensor], outputs) -> dict[str, tuple[float, torch.Tensor]]:
        """Terms added to the task loss, by name: (weight, value). Each is logged as `<stage>/loss_<name>`."""
        return {}

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, "train")
        self.check_finite(loss)
        # Logged here rather than by LearningRateMonitor, which refuses to run with --trainer.logger=false.
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch["labels"].size(0))
        return loss

    def check_finite(self, loss: torch.Tensor) -> None:
        """Stop the run on a NaN/inf loss, naming the step and the loss term that went bad.

        All ranks agree first (one rank raising alone would leave the others waiting forever). The
        checkpoints already written are the last good ones; nothing is saved from the bad step.
        """
        bad = not torch.isfinite(loss.detach()).all().item()
        if self.trainer is not None and self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        terms = {name: value for name, value in getattr(self, "last_loss_terms", {}).items()
                 if not torch.isfinite(value).all()}
        culprit = ", ".join(f"train/loss_{name}={value.item()}" for name, value in terms.items())
        raise NonFiniteLossError(f"non-finite loss at step {self.global_step} "
                                 f"({culprit or f'train/loss={loss.item()}'}); training stopped, the last "
                                 "good checkpoint is kept (lower model.lr or check the data, then resume with "
                                 "--ckpt_path=last)")

    # Global RNG states travel with the checkpoint, so dropout after a resume draws what an uninterrupted run
    # would have drawn. Every rank's states are saved: under DDP the ranks draw different amounts (their batches
    # differ in shape), so rank 0's states would be wrong for the others.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Which class saved it: `--ckpt_path` with another stage's checkpoint is refused (dq_lightning.checkpoints).
        checkpoint["module_class"] = class_path(type(self))
        if self._trainer is not None and self._trainer.state.fn == "fit":
            record_stop_mid_epoch(checkpoint, self._trainer)  # max_steps, max_time: resumed where it stopped
        states = rng_states()
        checkpoint["rng_states"] = states
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank builds the checkpoint (Lightning's dump_checkpoint); only rank 0 writes it.
            every_rank = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(every_rank, states)
            checkpoint["rng_states_per_rank"] = every_rank

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self._trainer is None or self._trainer.state.fn != "fit":  # self.trainer raises outside one
            return
        states = checkpoint.get("rng_states")
        every_rank = checkpoint.get("rng_states_per_rank")
        if every_rank and len(every_rank) == self.trainer.world_size:
            states = every_rank[self.trainer.global_rank]
        if states:
            set_rng_states(states)

    # -- evaluation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   generation_config=self.model.generation_config)

    def decode(self, token_ids: torch.Tensor) -> list[str]:
        token_ids = torch.where(token_ids < 0, self.tokenizer.pad_token_id, token_ids)
        return [text.strip() for text in self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)]

    def _evaluate(self, batch, stage: str) -> None:
        self._step(batch, stage)
        if stage == "val" and not self.generate_on_validation:
            return
        generated = self.generate(batch)
        lengths = (generated != self.tokenizer.pad_token_id).sum(dim=1) - 1  # minus the start token
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        predictions, references = self.decode(generated), self.decode(batch["labels"])
        metrics.update(predictions, references, lengths)
        if stage == "test":
            self._test_rows.extend(self._rows_of(batch, predictions, references))

    def _rows_of(self, batch, predictions: list[str], references: list[str]) -> list[dict[str, Any]]:
        indices = batch.get("example_index")
        indices = (indices.tolist() if indices is not None
                   else range(len(self._test_rows), len(self._test_rows) + len(predictions)))
        sources = self.decode(batch["input_ids"])
        return [{"index": int(index), "source": source[:SOURCE_CHARS], "reference": reference,
                 "prediction": prediction}
                for index, source, reference, prediction in zip(indices, sources, references, predictions)]

    def _log_generation_metrics(self, stage: str) -> None:
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        if stage == "val" and not self.generate_on_validation:
            return
        scores = metrics.compute()
        self.log_dict({f"{stage}/{key}": value for key, value in scores.items()},
                      prog_bar=stage == "val")
        metrics.reset()

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_generation_metrics("val")

    def on_test_epoch_start(self) -> None:
        self._test_rows, self.test_predictions = [], None

    def on_test_epoch_end(self) -> None:
        self._log_generation_metrics("test")
        rows = gather_rows(self._test_rows)  # on every rank: all of them take part in the gather
        self._test_rows = []
        if not self.trainer.is_global_zero:
            return
        ids = getattr(self.trainer.datamodule, "example_ids", lambda split: None)("test")
        if ids is not None:
            for row in rows:
                row["id"] = ids[row["index"]]
        self.test_predictions = score_rows(rows, self.task.is_translation)
        self.log_prediction_table(self.test_predictions)

    def teacher_predictions(self) -> list[dict[str, Any]] | None:
        """The teacher's rows on the same test examples, to show beside this model's; None here."""
        return None

    def log_prediction_table(self, rows: list[dict[str, Any]]) -> None:
        """The first `prediction_table_rows` test examples as a W&B table (the teacher's output beside this
        model's where its test wrote them), so outputs can be read in the dashboard."""
        from lightning.pytorch.loggers import WandbLogger

        loggers = [logger for logger in self.loggers if isinstance(logger, WandbLogger)]
        count = self.prediction_table_rows
        if not loggers or not count or not rows:
            return
        metric = self.task.metric
        columns = ["index", "id", "source", "reference", "prediction", metric]
        teacher = {row["index"]: row for row in self.teacher_predictions() or []}
        if teacher:
            columns += ["teacher_prediction", f"teacher_{metric}"]
        data = []
        for row in rows[:count]:
            cells = [row["index"], row.get("id", ""), row["source"], row["reference"], row["prediction"], row[metric]]
            if teacher:
                theirs = teacher.get(row["index"], {})
                cells += [theirs.get("prediction", ""), theirs.get(metric)]
            data.append(cells)
        for logger in loggers:
            logger.log_table(key="test/predictions", columns=columns, data=data)

    def predict_step(self, batch, batch_idx):
        return self.decode(self.generate(batch))

    # -- optimization ---------------------------------------------------------------------------------
    def trainable_named_parameters(self):
        return [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, parameter in self.trainable_named_parameters():
            (no_decay if any(marker in name for marker in NO_DECAY) else decay).append(parameter)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}], lr=self.lr)
        total_steps = max(1, int(planned_optimizer_steps(self.trainer)))
        scheduler = get_linear_schedule_with_warmup(optimizer, int(self.warmup_ratio * total_steps),
                                                    total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        # A resumed run restores its optimizer and schedule at the lr it was started with; a different
        # `--model.lr` given on resume (e.g. lower after a NaN) rescales both, keeping the schedule's shape.
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            started_with = scheduler.base_lrs[0]
            if started_with > 0 and abs(self.lr / started_with - 1) > 1e-9:
                ratio = self.lr / started_with
                scheduler.base_lrs = [lr * ratio for lr in scheduler.base_lrs]
                for group in scheduler.optimizer.param_groups:
                    group["lr"] *= ratio
                    if "initial_lr" in group:
                        group["initial_lr"] *= ratio

    # -- export -----------------------------------------------------------------------------------------
    def save_hf(self, out_dir: str | Path, info: dict[str, Any] | None = None) -> Path:
        trainer = self._trainer  # None outside a Trainer (self.trainer would raise)
        datamodule = getattr(trainer, "datamodule", None)
        # the truncation it was trained with, which `predict` and `robustness` then apply to its sources
        length = {"max_source_length": datamodule.max_source_length} \
            if isinstance(getattr(datamodule, "max_source_length", None), int) else {}
        return save_hf_directory(self.model, self.tokenizer, out_dir,
                                 {"task": self.task.name, **length, "global_step": self.global_step, **(info or {})})


def planned_optimizer_steps(trainer) -> float:
    """The optimizer steps the LR schedule spans: the run's epochs when `max_epochs` bounds it, else
    `max_steps` (pre-training, search-map). A `--trainer.max_steps` below the epochs is then a stop, like
    `max_time`: it ends the fit early without reshaping the schedule, so the same command without it (and
    `--ckpt_path=last`) continues exactly as if the fit had never stopped. Lightning's
    `estimated_stepping_batches` would make the schedule as short as the stop."""
    estimated = trainer.estimated_stepping_batches  # also sets up the training data, counted below
    batches, epochs = trainer.num_training_batches, trainer.max_epochs
    if trainer.max_steps == -1 or epochs is None or epochs < 1 or batches == float("inf"):
        return estimated
    return math.ceil(batches / trainer.accumulate_grad_batches) * epochs


def rng_states() -> dict[str, Any]:
    """The global generators' states, as plain tensors and lists so the checkpoint loads with weights_only."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [kind, keys.tolist(), position, has_gauss, cached],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    # CUDA states only onto as many devices as were saved (a resume may see fewer or none).
    for device, state in enumerate(states.get("cuda", [])[:torch.cuda.device_count()]):
        torch.cuda.set_rng_state(state, device)
