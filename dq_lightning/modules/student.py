"""`DQStudentModule`: distillation-aware quantization of a layer-copied student (DQ-BART).

The module wires three components: `TeacherAndStudent` (the frozen teacher and the student copied from it),
`DQObjective` (the loss) and `QuantizeOnForward` (the quantization life cycle: prepare, warm-up, convert, and
putting the student in a checkpoint's form when one is loaded).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dq_lightning.callbacks.quantize import QuantizeOnForward
from dq_lightning.distill.layer_map import LayerMapStrategy
from dq_lightning.distill.loyalty import Loyalty
from dq_lightning.distill.objective import DQObjective, LogitsLoss, ObjectiveConfig
from dq_lightning.distill.recipe import recipe_settings
from dq_lightning.distill.student import TeacherAndStudent
from dq_lightning.distill.width import Units, WidthMethod
from dq_lightning.errors import UserError
from dq_lightning.evaluation.bootstrap import align
from dq_lightning.evaluation.per_example import FILE_NAME as PREDICTIONS_FILE, read_predictions
from dq_lightning.metrics import GenerationMetrics
from dq_lightning.quant import QuantConfig, use_deployed_head
from dq_lightning.quant.config import (FULL_PRECISION, AttentionQuant, Granularity, QuantSettings, Recipe, WeightMethod,
                                       parse_wea)
from dq_lightning.modules.seq2seq import Seq2SeqModule
from dq_lightning.size import SizeReport, model_size

Mode = Literal["dq", "quant_only", "distill_only"]
AttentionMaps = Literal["before_dropout", "after_dropout"]
EvalHead = Literal["trained", "deployed"]
MODES, ATTENTION_MAPS, EVAL_HEADS = get_args(Mode), get_args(AttentionMaps), get_args(EvalHead)


def parse_depth(depth: str) -> tuple[int, int]:
    """`"6-3"` -> (6 encoder layers, 3 decoder layers)."""
    try:
        encoder, decoder = (int(part) for part in str(depth).split("-"))
    except ValueError:
        raise UserError(f"model.depth={depth!r} is not 'encoder-decoder' layers like '6-3'") from None
    return encoder, decoder


def _choice(flag: str, value: Any, choices: tuple[str, ...]) -> Any:
    if value not in choices:
        raise UserError(f"model.{flag}={value!r} is not one of {', '.join(choices)}")
    return value


def _gradient_clip(value: float) -> float:
    if not value >= 0:
        raise UserError(f"model.gradient_clip={value!r} must be 0 (none) or positive")
    return value


def _objective_config(recipe: str, mode: str, final_encoder_weight: float | None, mask_padding: bool | None,
                      **settings: Any) -> ObjectiveConfig:
    """The DQ loss of `mode`; the two settings left unset (None) take the recipe's value."""
    recipe_choices = dict(final_encoder_weight=final_encoder_weight, mask_padding=mask_padding)
    return ObjectiveConfig.recipe(recipe, distill=mode != "quant_only", **settings,
                                  **{name: value for name, value in recipe_choices.items() if value is not None})


def _quant_settings(settings: QuantSettings | dict[str, Any] | None, named: tuple[str, ...]) -> QuantSettings:
    """`settings` as `QuantSettings`; a mapping (a checkpoint's hyper-parameters, a Python caller) is checked
    key by key, so a key that is a module argument of its own, or none at all, is named in the error."""
    if isinstance(settings, QuantSettings):
        return settings
    fields = QuantSettings.__dataclass_fields__
    for key in settings or {}:
        if key in named:
            raise UserError(f"model.quant_settings.{key}: {key} is a setting of its own; set it as "
                            f"--model.{key}" + (" (or --model.bits)" if key.endswith("_bits") else ""))
        if key not in fields:
            raise UserError(f"model.quant_settings.{key}: unknown key in --model.quant_settings; known: "
                            f"{', '.join(fields)}")
    return QuantSettings(**(settings or {}))


def _student_quant_config(recipe: str, mode: str, bits: str | None, wea: tuple[int, int, int],
                          settings: QuantSettings, **named: Any) -> QuantConfig | None:
    """The student's `QuantConfig`, or None for a full-precision student (distill_only, or 32-32-32). `bits`
    (W-E-A) overrides `wea`; `named` are the QuantConfig fields that are module arguments of their own."""
    w_bits, e_bits, a_bits = parse_wea(bits) if bits is not None else wea
    if mode == "distill_only" or (w_bits, e_bits, a_bits) == (FULL_PRECISION,) * 3:
        return None
    given = {name: value for name, value in named.items() if value is not None}
    if given.get("weight_clip") == float("inf"):
        given["weight_clip"] = None
    try:
        return QuantConfig.recipe(recipe, w_bits, e_bits, a_bits, **given, **settings.given())
    except UserError as error:
        raise UserError(f"model.{error} (recipe {recipe})") from None


_NAMED_QUANT_FIELDS = ("w_bits", "e_bits", "a_bits", "weight_method", "weight_granularity", "weight_clip",
                       "quantize_lm_head", "attention_quant")


class DQStudentModule(Seq2SeqModule):
    """A shallower, quantized student trained against a frozen teacher.

    Modes give the paper's comparison: `dq` (distillation + quantization), `quant_only` (quantized student,
    task loss only) and `distill_only` (full-precision student, distillation losses). `recipe` chooses the
    defaults of every setting left unset (None): `dq-bart`, the official code's method, or `dq_lightning`,
    this project's choices (table in `dq_lightning.distill.recipe`).

    Args:
        teacher: the teacher's Hugging Face directory (what TeacherModule exports) or Hub id.
        mode: dq (distillation + quantization), quant_only (quantized, task loss only) or distill_only
            (full precision, distillation losses).
        recipe: defaults of every setting below left unset: dq-bart (the official DQ-BART code) or
            dq_lightning (this project's choices); see dq_lightning.distill.recipe.
        w_bits: bits of the Linear weights (2 = ternary by default, 3, 4, 8, or 32 = full precision).
        e_bits: bits of the token embedding (the matrix tied to the LM head).
        a_bits: bits of the Linear layers' input activations (and of the attention operands).
        bits: the paper's W-E-A notation ("2-2-8"); overrides w_bits, e_bits and a_bits. "32-32-32" is a
            full-precision student (with mode dq, the distill_only baseline).
        depth: student "encoder-decoder" layers ("6-3"); overrides student_encoder_layers and
            student_decoder_layers.
        student_encoder_layers: encoder depth of the student (default: the teacher's).
        student_decoder_layers: decoder depth of the student (default: the teacher's).
        layer_map: which teacher layers the student copies: dq-bart (the official table for 6-layer
            teachers, max_spacing's formula for other depths), max_spacing (first to last, evenly),
            uniform, first, last. Unset: the recipe's (dq-bart; dq_lightning: max_spacing).
        encoder_layer_map: explicit teacher encoder layers to copy (overrides layer_map for the encoder).
        decoder_layer_map: explicit teacher decoder layers to copy (overrides layer_map for the decoder).
        unsorted_layer_maps: explicit maps may list distinct teacher layers in any order (a map searched with
            search-map --allow-unsorted); false: strictly increasing.
        width: a thinner student, extracted from the teacher's most important (or random) units after the
            layer copy (Extract Then Distill): "heads=8,ffn=1536,d_model=512" (any of the keys; heads and
            d_model follow each other at the teacher's head_dim) or one ratio in (0, 1] like "0.5". Unset:
            the teacher's widths.
        width_method: which units a thinner student keeps: impt (the most important, scored on the first
            width_batches training batches when fit starts) or rand (a random choice seeded by width_seed).
        width_batches: training batches (in stored order, unshuffled) scored for width_method impt.
        width_seed: the seed of width_method rand.
        width_hidden: how a thinner student's hidden states meet the teacher's in the hidden-state and
            final-encoder losses: kept (at the teacher dimensions it kept) or projection (through a learned
            linear map to the teacher's width, TinyBERT's W_h, trained with the student and not exported; it
            starts as the kept dimensions' embedding).
        task_weight: weight of the task cross-entropy.
        logits_weight: weight of the logits distillation loss.
        hidden_weight: weight of the hidden-state MSE (encoder + decoder, summed over layers).
        attention_weight: weight of the attention-map MSE (encoder self, decoder self, cross).
        final_encoder_weight: weight of the official extra final-encoder-state term (one MSE per example,
            summed over the batch). Unset: the recipe's (dq-bart 1; dq_lightning 0).
        logits_loss: mse (the paper's) or kl (with `temperature`).
        temperature: softening temperature of the KL logits loss.
        mask_padding: distillation means over real tokens only (true) or over every position, padding
            included (false). Unset: the recipe's (dq-bart false; dq_lightning true).
        attention_maps: which attention map is distilled: before_dropout (the softmax, as the official code)
            or after_dropout (what transformers returns). Unset: the recipe's (dq-bart before_dropout;
            dq_lightning after_dropout).
        weight_method: weight quantizer: auto (ternary at 2 bits, min-max otherwise), minmax, ternary, lsq.
        weight_granularity: Linear weights: tensor (one scale per matrix) or row (one per output row). The
            token embedding is per row in both recipes (quant_settings.embedding_granularity). Unset: the
            recipe's (dq-bart tensor; dq_lightning row).
        weight_clip: Linear weights and the embedding are clipped to +-weight_clip before quantization; inf
            for no clip. Unset: the recipe's (dq-bart 2.5; dq_lightning inf).
        quantize_lm_head: quantize the LM head (the tied embedding at e_bits, its input at a_bits), or train
            it in full precision (false; export still ships the E-bit matrix, see eval_head). Unset: the
            recipe's (dq-bart false; dq_lightning true).
        attention_quant: attention operands at a_bits: dq-bart (q after scaling, k, v, probabilities after
            dropout, symmetric per tensor), asym_probs (q before scaling, k, v with the activation quantizer,
            probabilities asymmetric before dropout) or off. Unset: the recipe's (dq-bart; dq_lightning off).
        quant_settings: the other `QuantConfig` fields (`--model.quant_settings.act_clip=inf`, ...).
        quant_warmup_steps: optimizer steps in full precision before quantization starts.
        eval_head: with a full-precision-trained LM head (quantize_lm_head false), which head validation and
            test use: trained (the latent full-precision head, the official evaluation) or deployed (the
            E-bit tied matrix that export writes and the size accounting counts).
        evaluate_teacher: at test time also generate with the teacher and log test/teacher_<metric>.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not applied to biases and LayerNorms). Unset: the recipe's
            (dq-bart 0; dq_lightning 0.01).
        gradient_clip: clip the gradient norm at this value; 0 for none. --trainer.gradient_clip_val, when
            set, takes precedence. Unset: the recipe's (dq-bart 0; dq_lightning 1.0).
        warmup_ratio: share of the steps spent warming the learning rate up linearly.
        label_smoothing: label smoothing of the task cross-entropy.
        generation: overrides of the task's decoding settings.
        generate_on_validation: generate and score ROUGE/BLEU at every validation.
        prediction_table_rows: test examples shown as a W&B table beside the teacher's outputs (from the
            teacher's own test_predictions.jsonl, when it has one); 0 logs none. Every example's output and
            score is written to test_predictions.jsonl regardless.
    """

    def __init__(
        self, teacher: str, mode: Mode = "dq", recipe: Recipe = "dq-bart",
        # what the student is: bits and depth
        w_bits: int = 2, e_bits: int = 2, a_bits: int = 8, bits: str | None = None, depth: str | None = None,
        student_encoder_layers: int | None = None, student_decoder_layers: int | None = None,
        layer_map: LayerMapStrategy | None = None, encoder_layer_map: list[int] | None = None,
        decoder_layer_map: list[int] | None = None, unsorted_layer_maps: bool = False,
        width: str | None = None, width_method: WidthMethod = "impt", width_batches: int = 8, width_seed: int = 0,
        width_hidden: Literal["kept", "projection"] = "kept",
        # the objective
        task_weight: float = 1.0, logits_weight: float = 1.0, hidden_weight: float = 1.0,
        attention_weight: float = 1.0, final_encoder_weight: float | None = None, logits_loss: LogitsLoss = "mse",
        temperature: float = 1.0, mask_padding: bool | None = None, attention_maps: AttentionMaps | None = None,
        # the quantizers
        weight_method: WeightMethod = "auto", weight_granularity: Granularity | None = None,
        weight_clip: float | None = None, quantize_lm_head: bool | None = None,
        attention_quant: AttentionQuant | None = None, quant_settings: QuantSettings = QuantSettings(),
        quant_warmup_steps: int = 0,
        # evaluation and optimization
        eval_head: EvalHead = "trained", evaluate_teacher: bool = False, lr: float = 3e-5,
        weight_decay: float | None = None, gradient_clip: float | None = None, warmup_ratio: float = 0.05,
        label_smoothing: float = 0.0, generation: dict[str, Any] | None = None,
        generate_on_validation: bool = True, prediction_table_rows: int = 100,
    ):
        defaults = recipe_settings(recipe)
        weight_decay = defaults["weight_decay"] if weight_decay is None else weight_decay
        super().__init__(lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio,
                         label_smoothing=label_smoothing, generation=generation,
                         generate_on_validation=generate_on_validation,
                         prediction_table_rows=prediction_table_rows)
        self.save_hyperparameters()
        quant_settings = _quant_settings(quant_settings, _NAMED_QUANT_FIELDS)
        self.hparams["quant_settings"] = asdict(quant_settings)  # plain values: checkpoints load weights_only
        _choice("mode", mode, MODES)
        _choice("eval_head", eval_head, EVAL_HEADS)
        self.attention_maps = _choice("attention_maps", attention_maps or defaults["attention_maps"],
                                      ATTENTION_MAPS)
        self.gradient_clip = _gradient_clip(defaults["gradient_clip"] if gradient_clip is None else gradient_clip)
        if weight_decay < 0:
            raise UserError(f"model.weight_decay={weight_decay} must not be negative")
        self.objective = DQObjective(_objective_config(
            recipe, mode, task_weight=task_weight, logits_weight=logits_weight, hidden_weight=hidden_weight,
            attention_weight=attention_weight, logits_loss=logits_loss, temperature=temperature,
            label_smoothing=label_smoothing, final_encoder_weight=final_encoder_weight, mask_padding=mask_padding))
        self.quant_config = _student_quant_config(
            recipe, mode, bits, (w_bits, e_bits, a_bits), quant_settings, weight_method=weight_method,
            weight_granularity=weight_granularity, weight_clip=weight_clip, quantize_lm_head=quantize_lm_head,
            attention_quant=attention_quant)
        if depth is not None:
            student_encoder_layers, student_decoder_layers = parse_depth(depth)
        self.factory = TeacherAndStudent(
            teacher, student_encoder_layers, student_decoder_layers, layer_map or defaults["layer_map"],
            encoder_layer_map, decoder_layer_map, unsorted_layer_maps=unsorted_layer_maps,
            maps_before_dropout=self.attention_maps == "before_dropout" and self.objective.config.needs_attentions,
            width=None if width is None else str(width), width_method=width_method, width_seed=width_seed)
        if isinstance(width_batches, bool) or not isinstance(width_batches, int) or width_batches < 1:
            raise UserError(f"model.width_batches={width_batches!r} must be a positive integer")
        if width_hidden not in ("kept", "projection"):
            raise UserError(f"model.width_hidden={width_hidden!r}: choose kept or projection")
        # Outside the student (never quantized nor exported); its shape is known now, so a checkpoint loads into it.
        self.hidden_projection = torch.nn.Linear(self.factory.student_config().d_model, self.teacher.config.d_model,
                                           bias=False) if width_hidden == "projection" and width is not None else None
        self._projection_started = False
        # impt needs training batches: the student is built in configure_model (build_model).
        self.model = None if self._scores_width else self.factory.new_student()
        self._provisional_width = False
        self.quantize = None if self.quant_config is None else QuantizeOnForward(
            self.quant_config, student_attr="model", teacher_attr="teacher", warmup_steps=quant_warmup_steps)
        self.val_loyalty, self.test_loyalty = Loyalty(), Loyalty()
        self.teacher_test_metrics: GenerationMetrics | None = None

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
        self.factory.score_width(itertools.islice(loader, self.hparams.width_batches))
        return self.factory.new_student()

    def standalone_context(self):
        """The teacher directory's tokenizer (a student reads the teacher's) and the task it records."""
        from dq_lightning.data.tasks import get_task
        from dq_lightning.export.checkpoint import hf_directory_task
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
        vocabulary = self.teacher.get_input_embeddings().num_embeddings
        if len(self.tokenizer) > vocabulary or self.tokenizer.pad_token_id != self.teacher.config.pad_token_id:
            raise UserError(f"model.teacher={self.hparams.teacher}: its vocabulary ({vocabulary} tokens) is not the "
                            f"data tokenizer's ({len(self.tokenizer)}); set data.tokenizer to the teacher's directory")
        if self.hparams.evaluate_teacher and self.teacher_test_metrics is None:
            self.teacher_test_metrics = GenerationMetrics(translation=self.task.is_translation)

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

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # --trainer.gradient_clip_val, when given, wins over the module's (recipe) value.
        if gradient_clip_val is None and self.gradient_clip > 0:
            gradient_clip_val, gradient_clip_algorithm = self.gradient_clip, "norm"
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                            gradient_clip_algorithm=gradient_clip_algorithm)

    # use_deployed_head leaves alone a model that is not prepared, already converted or has a quantized head.
    def on_validation_start(self) -> None:
        self._check_width_restored()
        use_deployed_head(self.model, self.hparams.eval_head == "deployed")

    def on_test_start(self) -> None:
        self._check_width_restored()
        use_deployed_head(self.model, self.hparams.eval_head == "deployed")

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
                "width": self.width_label(), "teacher": self.hparams.teacher}

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
        quant = self.quant_config or QuantConfig(w_bits=32, e_bits=32, a_bits=32)
        source, teacher = (self.teacher.config, None) if self.factory.width is None else (
            self.factory.student_config(), self.teacher.config)
        return model_size(source, quant, encoder_layers=len(self.encoder_map), decoder_layers=len(self.decoder_map),
                          convention=convention, teacher=teacher)

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
