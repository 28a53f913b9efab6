"""`DQStudentModule`: distillation-aware quantization of a layer-copied student (DQ-BART).

The module wires three components: `TeacherAndStudent` (the frozen teacher and the student copied from it),
`DQObjective` (the loss) and `QuantizeOnForward` (the quantization life cycle: prepare, warm-up, convert, and
putting the student in a checkpoint's form when one is loaded).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dq_lightning.callbacks.quantize import QuantizeOnForward
from dq_lightning.data.mixing import unlabeled_batch
from dq_lightning.data.teacher_outputs import model_identity
from dq_lightning.distill.loyalty import Loyalty
from dq_lightning.distill.objective import DQObjective
from dq_lightning.distill.recipe import (MODES, EvaluationSettings, Mode, ObjectiveSettings, OptimizerSettings,
                                         QuantSettings, Recipe, ShapeSettings, UnlabeledSettings, as_group, resolve)
from dq_lightning.distill.student import TeacherAndStudent
from dq_lightning.distill.views import SourceView
from dq_lightning.distill.width import Units
from dq_lightning.errors import UserError
from dq_lightning.evaluation.bootstrap import align
from dq_lightning.evaluation.per_example import FILE_NAME as PREDICTIONS_FILE, read_predictions
from dq_lightning.metrics import GenerationMetrics
from dq_lightning.quant import use_deployed_head
from dq_lightning.quant.config import FULL_PRECISION, parse_depth
from dq_lightning.modules.seq2seq import Seq2SeqModule
from dq_lightning.size import SizeReport


def grouped_settings(**groups: Any) -> dict[str, Any]:
    """The settings groups of a student (`shape`, `objective`, ...) as their dataclasses, each checked."""
    return {name: as_group(name, value) for name, value in groups.items()}


class DQStudentModule(Seq2SeqModule):
    """A shallower, quantized student trained against a frozen teacher.

    Modes give the paper's comparison: `dq` (distillation + quantization), `quant_only` (quantized student,
    task loss only) and `distill_only` (full-precision student, distillation losses). `recipe` decides every
    grouped setting left unset (None): `dq-bart`, the official code's method, or `dq_lightning`, this
    project's choices (the table in `dq_lightning.distill.recipe`), resolved once into `self.recipe`.

    Args:
        teacher: the teacher's Hugging Face directory (what TeacherModule exports) or Hub id.
        mode: dq (distillation + quantization), quant_only (quantized, task loss only) or distill_only
            (full precision, distillation losses).
        recipe: defaults of every grouped setting left unset: dq-bart (the official DQ-BART code),
            dq_lightning (this project's choices) or tbt (TBT's code); see dq_lightning.distill.recipe.
        bits: the paper's W-E-A notation: bits of the Linear weights (1 = binary, 2 = ternary, 3, 4, 8, or 32),
            of the token embedding (the matrix tied to the LM head) and of the Linear layers' input activations
            (and of the attention operands). "32-32-32" is a full-precision student (with mode dq, the
            distill_only baseline).
        depth: student "encoder-decoder" layers ("6-3"); unset: the teacher's depth.
        width: a thinner student, extracted from the teacher's most important (or random) units after the
            layer copy (Extract Then Distill): "heads=8,ffn=1536,d_model=512" (any of the keys; heads and
            d_model follow each other at the teacher's head_dim) or one ratio in (0, 1] like "0.5". Unset:
            the teacher's widths. How the units are chosen: shape.width_method.
        lr: peak learning rate of AdamW.
        generation: overrides of the task's decoding settings.
        init_from: a student checkpoint of this point (bits, depth, width), e.g. one `extract` wrote from a
            supernet, whose weights this student starts from instead of the teacher's layers: a short fine-tune.
        shape: which teacher layers and units the student copies (layer maps, width method).
        objective: the weights and form of the DQ loss.
        quant_settings: the quantizers beyond their bits (granularity, clips, LM head, attention, warm-up).
        optimizer: AdamW's weight decay and epsilon, gradient clipping and the warm-up of the learning rate.
        evaluation: the head validated and tested, the teacher's test, generation at validation, the W&B table.
        unlabeled: how the student learns from training inputs without references (data.unlabeled_file,
            data.labeled_examples): the weights of the terms on them, the pseudo-reference, the restricted view.
    """

    def __init__(
        self, teacher: str, mode: Mode = "dq", recipe: Recipe = "dq-bart", bits: str = "2-2-8",
        depth: str | None = None, width: str | None = None, lr: float = 3e-5,
        generation: dict[str, Any] | None = None, init_from: str | None = None, shape: ShapeSettings = ShapeSettings(),
        objective: ObjectiveSettings = ObjectiveSettings(), quant_settings: QuantSettings = QuantSettings(),
        optimizer: OptimizerSettings = OptimizerSettings(), evaluation: EvaluationSettings = EvaluationSettings(),
        unlabeled: UnlabeledSettings = UnlabeledSettings(),
    ):
        groups = grouped_settings(shape=shape, objective=objective, quant_settings=quant_settings,
                                  optimizer=optimizer, evaluation=evaluation, unlabeled=unlabeled)
        self.recipe = resolve(recipe, **{name: groups[name] for name in ("shape", "objective", "quant_settings",
                                                                          "optimizer")})
        self.evaluation = groups["evaluation"]
        if mode not in MODES:
            raise UserError(f"model.mode={mode!r} is not one of {', '.join(MODES)}")
        objective_config = self.recipe.objective_config(mode)  # checked before the base class checks its copy
        super().__init__(lr=lr, weight_decay=self.recipe.optimizer.weight_decay,
                         warmup_ratio=self.recipe.optimizer.warmup_ratio,
                         label_smoothing=self.recipe.objective.label_smoothing, generation=generation,
                         generate_on_validation=self.evaluation.generate_on_validation,
                         adam_eps=self.recipe.optimizer.adam_eps, adam_eps_style=self.recipe.optimizer.adam_eps_style,
                         prediction_table_rows=self.evaluation.prediction_table_rows)
        self.save_hyperparameters()
        for name, group in groups.items():  # plain values: checkpoints load with weights_only
            self.hparams[name] = asdict(group)
        self.gradient_clip = self.recipe.optimizer.gradient_clip
        self.objective = DQObjective(objective_config)
        self.unlabeled = groups["unlabeled"]
        self.unlabeled_objective = DQObjective(self.unlabeled.objective_config(objective_config))
        self.view: SourceView | None = None  # built with the tokenizer, when unlabeled inputs train
        self.quant_config = self.recipe.quant_config(bits, mode)
        encoder_layers, decoder_layers = (None, None) if depth is None else parse_depth(depth)
        self.factory = TeacherAndStudent.for_recipe(teacher, self.recipe, mode, encoder_layers, decoder_layers, width)
        shape = self.recipe.shape
        # Outside the student (never quantized nor exported); its shape is known now, so a checkpoint loads into it.
        self.hidden_projection = torch.nn.Linear(self.factory.student_config().d_model, self.teacher.config.d_model,
                                                 bias=False) \
            if shape.width_hidden == "projection" and width is not None else None
        self._projection_started = False
        # impt needs training batches: the student is built in configure_model (build_model).
        self.model = None if self._scores_width else self.factory.new_student()
        self._provisional_width = False
        self.started_from: dict[str, Any] | None = None
        if init_from is not None:
            self._start_from(init_from)
        self.quantize = None if self.quant_config is None else QuantizeOnForward(
            self.quant_config, student_attr="model", teacher_attr="teacher",
            warmup_steps=self.recipe.quant_settings.warmup_steps)
        self.val_loyalty, self.test_loyalty = Loyalty(), Loyalty()
        self.teacher_test_metrics: GenerationMetrics | None = None

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None, **kwargs):
        """Lightning's `load_from_checkpoint`, reading the settings of a checkpoint written before they were
        grouped as today's (`dq_lightning.compat`); `kwargs` still override them."""
        from dq_lightning.compat import upgrade_student_hparams

        hparams = torch.load(checkpoint_path, map_location="cpu", weights_only=True).get("hyper_parameters", {})
        settings = {key: value for key, value in upgrade_student_hparams(hparams).items()
                    if not key.startswith("_")}
        return super().load_from_checkpoint(checkpoint_path, map_location=map_location, hparams_file=hparams_file,
                                            strict=strict, **{**settings, **kwargs})

    def _start_from(self, path: str) -> None:
        """The student built from the kept units (a thinner one) and weights of checkpoint `path` (`init_from`),
        which must hold a student of this point."""
        from dq_lightning.checkpoints import read_student_checkpoint

        from dq_lightning.compat import upgrade_student_hparams

        checkpoint = read_student_checkpoint(path, flag="--model.init_from")
        saved = upgrade_student_hparams(checkpoint["hyper_parameters"])
        depth = (len(self.encoder_map), len(self.decoder_map))
        theirs = {"bits": saved.get("bits"), "width": saved.get("width"),
                  "depth": parse_depth(saved["depth"]) if saved.get("depth") else depth}
        mine = {"bits": self.hparams.bits, "width": self.hparams.width, "depth": depth}
        for name in ("bits", "depth", "width"):
            if theirs[name] != mine[name]:
                raise UserError(f"--model.init_from {path}: it holds a student of {name} {theirs[name]}, this one "
                                f"is of {name} {mine[name]}; give the point it was trained as")
        if checkpoint.get("width_kept") is not None:
            self.use_checkpoint_width(checkpoint)
        state = {key[len("model."):]: value for key, value in checkpoint["state_dict"].items()
                 if key.startswith("model.")}
        try:
            self.model.load_state_dict(state)
        except RuntimeError as error:
            raise UserError(f"--model.init_from {path}: its weights do not fit this student "
                            f"({str(error).splitlines()[0]})") from None
        self.started_from = {"init_from": str(path), **(checkpoint.get("supernet") or {})}

    @property
    def teacher(self) -> PreTrainedModel:
        return self.factory.teacher

    @property
    def encoder_map(self) -> list[int]:
        return self.factory.encoder_map

    @property
    def decoder_map(self) -> list[int]:
        return self.factory.decoder_map

    @property
    def _scores_width(self) -> bool:
        return self.factory.width is not None and self.factory.width.method == "impt"

    def build_model(self, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
        """Only a width_method impt student is built here, in configure_model: after setup (the DataModule has
        its training split) and before a checkpoint is restored and the optimizer is built, so the optimizer
        holds the thinner student's parameters (on_fit_start comes after configure_optimizers). Outside fit
        (test, validate, predict) nothing is scored: a provisional student of the right shape waits for the
        checkpoint's stored units (`use_checkpoint_width`), whose weights it then takes."""
        if self.model is not None:
            return self.model
        if self._trainer is None or self.trainer.state.fn != "fit":
            self._provisional_width = True
            return self.factory.provisional_student()
        loader = self.trainer.datamodule.ordered_train_dataloader()
        self.factory.teacher_on(self.trainer.strategy.root_device)  # scored where it will train
        self.factory.score_width(itertools.islice(loader, self.recipe.shape.width_batches))
        return self.factory.new_student()

    def standalone_context(self):
        """The teacher directory's tokenizer (a student reads the teacher's) and the task it records."""
        from dq_lightning.data.tasks import get_task
        from dq_lightning.models.directory import hf_directory_task
        from dq_lightning.models.tokenizer import load_tokenizer

        teacher = Path(self.hparams.teacher).expanduser()
        name = hf_directory_task(teacher)
        if name is None:
            raise UserError(f"model.teacher={self.hparams.teacher}: records no task (dq_lightning.json), so "
                            "load_from_checkpoint cannot rebuild the student outside a Trainer; use "
                            "dq_lightning.export.checkpoint.load_student(path)")
        return load_tokenizer(str(teacher), flag="model.teacher"), get_task(name)

    def configure_model(self) -> None:
        super().configure_model()
        if self.hidden_projection is not None and not self._projection_started:
            self._start_projection()
        if self.quantize is not None:
            self.quantize.prepare_student(self)  # a student built just now missed QuantizeOnForward.setup
        self.factory.check_tokenizer(self.tokenizer, self.hparams.teacher)
        if self.evaluation.evaluate_teacher and self.teacher_test_metrics is None:
            self.teacher_test_metrics = GenerationMetrics(translation=self.task.is_translation)
        if self._trainer is not None and self.trainer.state.fn == "fit":
            self._prepare_unlabeled(self.trainer.datamodule)

    # -- inputs without references --------------------------------------------------------------------
    def _prepare_unlabeled(self, datamodule) -> None:
        """Before training on unlabeled inputs: the teacher's outputs for them (generated once, cached by the
        DataModule) and the student's view of their sources."""
        if getattr(datamodule, "unlabeled_sources", False) is None:  # ours, and every row has its reference
            changed = [f"model.unlabeled.{name}={value}" for name, value in asdict(self.unlabeled).items()
                       if value != getattr(UnlabeledSettings(), name)]
            if changed:
                raise UserError(f"{', '.join(changed)} changes nothing: this fit has no inputs without references "
                                "(data.unlabeled_file, data.labeled_examples or data.labeled_fraction)")
        if not getattr(datamodule, "needs_teacher_outputs", False):
            return
        if self.hparams.mode == "quant_only" and not self.unlabeled.pseudo_reference_weight > 0:
            raise UserError("model.mode=quant_only learns nothing from inputs without references unless "
                            "model.unlabeled.pseudo_reference_weight > 0 (the teacher's outputs as references)")
        self.view = SourceView(self.unlabeled.view, self.unlabeled.view_rate, self.tokenizer,
                               datamodule.max_source_length, seed=torch.initial_seed(), source_lang=self.task.source_lang,
                               target_lang=self.task.target_lang)
        generation = {key: value for key, value in self.model.generation_config.to_dict().items()
                      if not key.startswith("_") and key != "transformers_version"}
        datamodule.use_teacher_outputs(self.teacher_generate,
                                       {"teacher": model_identity(self.hparams.teacher), "generation": generation})

    @torch.no_grad()
    def teacher_generate(self, sources: list[list[int]]) -> list[list[int]]:
        """The teacher's outputs for a batch of tokenized sources, with the task's decoding settings (the
        student's generation config: the task's, with model.generation's overrides)."""
        batch = self.tokenizer.pad({"input_ids": sources}, return_tensors="pt")
        device = self.trainer.strategy.root_device if self._trainer is not None else self.device
        generated = self.factory.teacher_on(device).generate(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
            generation_config=self.model.generation_config)
        return generated.cpu().tolist()

    def training_mix(self) -> dict[str, Any]:
        """The labeled and unlabeled inputs this fit trains on ({} when every row has its reference)."""
        datamodule = getattr(self._trainer, "datamodule", None)
        mix = datamodule.unlabeled_summary() if hasattr(datamodule, "unlabeled_summary") else {}
        return {**mix, "view": self.unlabeled.view} if mix else {}

    def on_fit_start(self) -> None:
        mix = self.training_mix()
        if mix:  # the counts behind the settings, beside them in W&B's config
            for logger in self.loggers:
                logger.log_hyperparams({"training_mix": mix})

    @torch.no_grad()
    def _start_projection(self) -> None:
        """The projection as the kept dimensions' embedding: student dimension i lands on the teacher dimension
        it was extracted from, so its first loss compares what `kept` compares (plus the dropped dimensions)."""
        hidden = self.factory.kept.hidden if self.factory.kept is not None else None
        weight = self.hidden_projection.weight
        weight.zero_()
        rows = hidden if hidden is not None else torch.arange(weight.size(1))
        weight[rows.to(weight.device), torch.arange(weight.size(1), device=weight.device)] = 1.0
        self._projection_started = True

    def trainable_named_parameters(self):
        extra = [] if self.hidden_projection is None else \
            [("hidden_projection.weight", self.hidden_projection.weight)]
        return super().trainable_named_parameters() + extra

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.factory.kept is not None:
            checkpoint["width_kept"] = self.factory.kept.to_state()

    def use_checkpoint_width(self, checkpoint: dict) -> None:
        """Before a checkpoint's weights are loaded: the thinner student rebuilt from the units it stored
        (`width_kept`) unless the student already has them, so resume, test, export and reload give the same
        student without scoring again."""
        stored = checkpoint.get("width_kept")
        if self.factory.width is None:
            if stored is not None:
                raise UserError("the checkpoint holds a thinner student (width_kept); set --model.width as trained")
            return
        if stored is None:
            raise UserError(f"model.width={self.hparams.width}: the checkpoint stores no width_kept (it is not "
                            "a thinner student's checkpoint)")
        kept = Units.from_state(stored)
        if self.model is not None and not self._provisional_width and kept.equals(self.factory.kept):
            return
        self.factory.keep_width(kept)
        student, previous = self.factory.new_student(), self.model
        if previous is not None:
            student.to(next(previous.parameters()).device)
            student.generation_config = previous.generation_config
        self.model, self._provisional_width = student, False

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.use_checkpoint_width(checkpoint)
        if self.quantize is not None:
            self.quantize.restore(self, checkpoint.get("state_dict", {}), fresh_student=self.factory.new_student)

    def configure_callbacks(self):
        return [] if self.quantize is None else [self.quantize]

    # -- training -------------------------------------------------------------------------------------
    def _needs_teacher(self, stage: str) -> bool:
        return self.hparams.mode != "quant_only" or stage != "train"

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        if stage == "train" and unlabeled_batch(batch):
            return self._unlabeled_step(batch)
        labels = batch["labels"]
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      decoder_input_ids=self.model.prepare_decoder_input_ids_from_labels(labels=labels))
        objective = self.objective.config
        hidden, attentions = objective.needs_hidden_states, objective.needs_attentions
        student = self.model(**inputs, output_hidden_states=hidden, output_attentions=attentions)
        teacher = self.factory.teacher_outputs(inputs, self.device, hidden or attentions) if self._needs_teacher(stage) else None
        loss, terms = self.objective(student, teacher, labels, batch["attention_mask"], self.encoder_map,
                                     self.decoder_map, training=stage == "train", kept=self.factory.kept,
                                     project=self.hidden_projection)

        batch_size = labels.size(0)
        sync = stage != "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=sync)
        self.log_dict({f"{stage}/loss_{name}": value for name, value in terms.items()},
                      batch_size=batch_size, sync_dist=sync)
        if stage in ("val", "test"):
            (self.val_loyalty if stage == "val" else self.test_loyalty).update(student.logits, teacher.logits,
                                                                               labels != -100)
        self.last_loss_terms = {name: value.detach() for name, value in terms.items()}
        return loss

    def _unlabeled_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A batch of inputs without references: the teacher's output (the batch's labels) is both models'
        decoder input; the student reads its view of the source, the teacher all of it. Logged as
        train/loss (what is optimized), train/loss_unlabeled and train/loss_unlabeled_<term>."""
        targets = batch["labels"]
        decoder_input_ids = self.model.prepare_decoder_input_ids_from_labels(labels=targets)
        objective = self.unlabeled_objective
        hidden, attentions = objective.config.needs_hidden_states, objective.config.needs_attentions
        view = self.view
        source_ids, source_mask = (batch["input_ids"], batch["attention_mask"]) if view is None else view(
            batch["input_ids"], batch["attention_mask"], batch["example_index"], self.current_epoch)
        student = self.model(input_ids=source_ids, attention_mask=source_mask, decoder_input_ids=decoder_input_ids,
                             output_hidden_states=hidden, output_attentions=attentions)
        teacher_inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              decoder_input_ids=decoder_input_ids)
        teacher = self.factory.teacher_outputs(teacher_inputs, self.device, hidden or attentions) \
            if objective.config.distill else None
        loss, terms = objective(student, teacher, targets, batch["attention_mask"], self.encoder_map,
                                self.decoder_map, training=True, kept=self.factory.kept,
                                project=self.hidden_projection, reference=False,
                                source_aligned=view is None or view.keeps_source)
        loss = self.unlabeled.weight * loss
        size = targets.size(0)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/loss_unlabeled", loss, batch_size=size)
        self.log_dict({f"train/loss_unlabeled_{name}": value for name, value in terms.items()}, batch_size=size)
        self.last_loss_terms = {f"unlabeled_{name}": value.detach() for name, value in terms.items()}
        return loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # --trainer.gradient_clip_val, when given, wins over the module's (recipe) value.
        if gradient_clip_val is None and self.gradient_clip > 0:
            gradient_clip_val, gradient_clip_algorithm = self.gradient_clip, "norm"
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                            gradient_clip_algorithm=gradient_clip_algorithm)

    # use_deployed_head leaves alone a model that is not prepared, already converted or has a quantized head.
    def on_validation_start(self) -> None:
        self._check_width_restored()
        use_deployed_head(self.model, self.evaluation.eval_head == "deployed")

    def on_test_start(self) -> None:
        self._check_width_restored()
        use_deployed_head(self.model, self.evaluation.eval_head == "deployed")

    def on_predict_start(self) -> None:
        self._check_width_restored()

    def _check_width_restored(self) -> None:
        if self._provisional_width:
            raise UserError(f"model.width={self.hparams.width} with width_method impt: the student's units are "
                            "scored when fit starts; to validate, test or predict, pass the --ckpt_path of a fit")

    def on_validation_end(self) -> None:
        use_deployed_head(self.model, False)  # training goes on with the head it trains with

    def run_summary(self) -> dict[str, Any]:
        """What this run is, for sweep results: mode, W-E-A bits and depth as actually used."""
        quant = self.quant_config
        # dq at 32-32-32 trains exactly as distill_only does; one name keeps them one series in plots.
        mode = "distill_only" if quant is None and self.hparams.mode == "dq" else self.hparams.mode
        widths = (quant.w_bits, quant.e_bits, quant.a_bits) if quant else (FULL_PRECISION,) * 3
        return {"mode": mode, "recipe": self.hparams.recipe, "bits": quant.notation if quant else "32-32-32",
                **dict(zip(("w_bits", "e_bits", "a_bits"), widths)),
                "encoder_layers": len(self.encoder_map), "decoder_layers": len(self.decoder_map),
                "encoder_layer_map": self.encoder_map, "decoder_layer_map": self.decoder_map,
                "width": self.width_label(), "teacher": self.hparams.teacher,
                **({"training_mix": mix} if (mix := self.training_mix()) else {}),
                **({"source": "supernet+finetune" if "subnet" in self.started_from else "init_from",
                    "supernet_run": self.started_from.get("run"), "started_from": self.started_from}
                   if self.started_from else {})}

    def width_label(self) -> str:
        """`full`, or the thinner student's widths and how its units were chosen (`heads=4,ffn=512,d_model=128
        impt`)."""
        if self.factory.width is None:
            return "full"
        config = self.factory.student_config()
        return (f"heads={config.encoder_attention_heads},ffn={config.encoder_ffn_dim},d_model={config.d_model} "
                f"{self.factory.width.method}")

    # -- evaluation -----------------------------------------------------------------------------------
    def teacher_predictions(self) -> list[dict[str, Any]] | None:
        """The teacher's test rows, from the run directory it was exported from (`<run>/hf` ->
        `<run>/test_predictions.jsonl`), when they exist and cover exactly this test's examples."""
        path = Path(str(self.hparams.teacher)).parent / PREDICTIONS_FILE
        if not path.is_file() or not self.test_predictions:
            return None
        try:
            rows = read_predictions(path, self.task.metric)
            align(self.test_predictions, rows)
        except UserError:
            return None  # another test set (or an older file): no side-by-side rather than a wrong one
        return rows

    def size_metrics(self) -> dict[str, float]:
        """Size (MiB) and compression against the FP32 teacher, DQ-BART's accounting and the strict one."""
        paper, strict = self.size_report("paper"), self.size_report("strict")
        return {"size_mb": paper.size_mb, "compression": paper.compression,
                "size_mb_strict": strict.size_mb, "compression_strict": strict.compression}

    def size_report(self, convention: str) -> SizeReport:
        """The student's size under `convention` (`dq_lightning.size`), from shapes alone: its depth, and a
        thinner student's own widths, against the full-width FP32 teacher."""
        return self.factory.size_report(self.quant_config, convention)

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
            generated = self.factory.teacher_on(self.device).generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                              generation_config=self.model.generation_config)
            lengths = (generated != self.tokenizer.pad_token_id).sum(dim=1) - 1
            self.teacher_test_metrics.update(self.decode(generated), self.decode(batch["labels"]), lengths)
