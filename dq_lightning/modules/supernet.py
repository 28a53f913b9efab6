"""`DQSupernetModule`: the whole trade-off curve in one training (an elastic DQ supernet).

One latent full-precision student of the teacher's depth and width (`self.model`) is shared by every point of
a grid of sub-networks (W-E-A bits x depth x width, `dq_lightning.supernet`). Each step trains the sub-networks
the sampler draws (the sandwich rule by default), each exactly as a separately trained `DQStudentModule` of
its point would be trained: its quantizers, layer map and kept units, and the recipe's DQ loss against the
frozen teacher, whose forward is computed once per batch for all of them. Their losses are summed, so one
optimizer step updates the shared latent weights with every drawn sub-network's gradient.

Validation scores every grid point (loss, loyalty, and with generation its task metric) and logs them as
`val/<point>/<metric>` plus their mean as `val/<metric>`; whenever a point beats its own best, its student is
written as an ordinary DQ student checkpoint, `<run>/subnets/<point>.ckpt`, which `test`, `export`, `predict`
and `robustness` take as they take any student's (`python -m dq_lightning extract` writes one for any point
from a supernet checkpoint).
"""

from __future__ import annotations

from dataclasses import asdict, astuple
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedModel

from dq_lightning.distill.loyalty import Loyalty
from dq_lightning.distill.objective import DQObjective
from dq_lightning.distill.recipe import (EvaluationSettings, ObjectiveSettings, OptimizerSettings, QuantSettings,
                                         Recipe, ShapeSettings, resolve)
from dq_lightning.distill.student import TeacherAndStudent
from dq_lightning.distill.width import Units, Widths
from dq_lightning.errors import UserError
from dq_lightning.files import write_json_atomic
from dq_lightning.metrics import GenerationMetrics
from dq_lightning.modules.seq2seq import Seq2SeqModule
from dq_lightning.modules.student import grouped_settings
from dq_lightning.quant import use_deployed_head
from dq_lightning.supernet.checkpoint import SUBNETS_DIR, save_student_checkpoint
from dq_lightning.supernet.grid import SubNet, by_size, parse_grid
from dq_lightning.supernet.sampling import Sampler, SamplingSettings
from dq_lightning.supernet.subnetwork import SubNetwork

SelectBy = Literal["task", "label_loyalty"]


class DQSupernetModule(Seq2SeqModule):
    """An elastic DQ supernet: every point of `grid` trained in one fit (module docstring).

    Args:
        teacher: the teacher's Hugging Face directory (what TeacherModule exports) or Hub id.
        grid: the sub-networks: points like "2-2-8 6-3" or "8-8-8 6-6 heads=3,ffn=512" (W-E-A bits,
            encoder-decoder depth, a width as --model.width of the student takes it), and sweep files whose dq
            points join the grid (sweeps/xsum-tiny.yaml).
        recipe: defaults of every grouped setting left unset, as for the DQ student: dq-bart (the official
            DQ-BART code) or dq_lightning.
        lr: peak learning rate of AdamW.
        generation: overrides of the task's decoding settings.
        sampling: which sub-networks each step trains.
        select_by: what picks each point's best checkpoint (subnets/<point>.ckpt): task (its validation task
            metric, which needs evaluation.generate_on_validation) or label_loyalty (its teacher-forced label
            loyalty, no generation needed).
        shape: layer maps and how widths keep units (width_method impt: one importance order for every width).
        objective: the weights and form of the DQ loss, for every sub-network.
        quant_settings: the quantizers beyond their bits, for every sub-network.
        optimizer: AdamW's weight decay and epsilon, gradient clipping and the warm-up of the learning rate.
        evaluation: the head validated, generation at validation.
    """

    def __init__(
        self, teacher: str, grid: list[str], recipe: Recipe = "dq-bart", lr: float = 3e-5,
        generation: dict[str, Any] | None = None, sampling: SamplingSettings = SamplingSettings(),
        select_by: SelectBy = "task", shape: ShapeSettings = ShapeSettings(),
        objective: ObjectiveSettings = ObjectiveSettings(), quant_settings: QuantSettings = QuantSettings(),
        optimizer: OptimizerSettings = OptimizerSettings(), evaluation: EvaluationSettings = EvaluationSettings(),
    ):
        groups = grouped_settings(shape=shape, objective=objective, quant_settings=quant_settings,
                                  optimizer=optimizer, evaluation=evaluation)
        self.recipe = resolve(recipe, **{name: groups[name] for name in ("shape", "objective", "quant_settings",
                                                                          "optimizer")})
        self.evaluation = groups["evaluation"]
        _refuse_unshareable(self.recipe)
        if select_by not in ("task", "label_loyalty"):
            raise UserError(f"model.select_by={select_by!r}: choose task or label_loyalty")
        if select_by == "task" and not self.evaluation.generate_on_validation:
            raise UserError("model.select_by=task needs model.evaluation.generate_on_validation=true (the task "
                            "metric is scored on generated text); or select by label_loyalty")
        objective_config = self.recipe.objective_config("dq")
        super().__init__(lr=lr, weight_decay=self.recipe.optimizer.weight_decay,
                         warmup_ratio=self.recipe.optimizer.warmup_ratio,
                         label_smoothing=self.recipe.objective.label_smoothing, generation=generation,
                         generate_on_validation=self.evaluation.generate_on_validation,
                         adam_eps=self.recipe.optimizer.adam_eps, adam_eps_style=self.recipe.optimizer.adam_eps_style,
                         prediction_table_rows=0)
        self.save_hyperparameters()
        for name, group in {**groups, "sampling": _sampling(sampling)}.items():
            self.hparams[name] = asdict(group)
        self.sampling = _sampling(sampling)
        self.gradient_clip = self.recipe.optimizer.gradient_clip
        self.objective = DQObjective(objective_config)
        self.factory = TeacherAndStudent.for_recipe(teacher, self.recipe, "dq")
        config = self.factory.teacher.config
        self.grid = parse_grid(list(grid), (config.encoder_layers, config.decoder_layers))
        self.model = self.factory.new_student()  # the latent supernet: full depth and width, full precision
        self.width_scores: Units | None = None
        self._subnetworks: dict[SubNet, SubNetwork] | None = None  # built once the width scores exist
        self.sampler: Sampler | None = None
        self.best: dict[str, dict[str, float]] = {}  # point key -> its best score, epoch and step
        self.subnet_passes = 0  # sub-network forward/backward passes trained (the cost a separate fit compares)
        self.loyalty = torch.nn.ModuleDict({subnet.key: Loyalty() for subnet in self.grid})
        self._evaluated: dict[SubNet, PreTrainedModel] | None = None
        self.subnet_metrics: torch.nn.ModuleDict | None = None

    # -- building -------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        super().configure_model()
        self.factory.check_tokenizer(self.tokenizer, self.hparams.teacher)
        if self.subnet_metrics is None:
            self.subnet_metrics = torch.nn.ModuleDict(
                {subnet.key: GenerationMetrics(translation=self.task.is_translation) for subnet in self.grid})

    def subnetworks(self) -> dict[SubNet, SubNetwork]:
        """Every grid point's sub-network, built on first use: after a checkpoint's width scores are restored,
        else (a fresh fit) once the teacher's units are scored on the first training batches."""
        if self._subnetworks is None:
            if self.width_scores is None and any(subnet.width for subnet in self.grid):
                self.width_scores = self._score_widths()
            self._subnetworks = {subnet: SubNetwork(subnet, self.hparams.teacher, self.recipe, self.width_scores)
                                 for subnet in self.grid}
            ordered = by_size(self.grid, lambda subnet: self._subnetworks[subnet].factory.size_report(
                self._subnetworks[subnet].quant_config, "strict").size_mb)
            self.sampler = Sampler(ordered, self.sampling, self._axes)
        return self._subnetworks

    def _axes(self, subnet: SubNet) -> tuple[int, ...]:
        """A point's size on every axis the grid varies: W, E, A bits, encoder and decoder depth, each width."""
        width = self._subnetworks[subnet].factory.width
        widths = width.student if width is not None else Widths.of(self.factory.teacher.config)
        return (*subnet.widths, *subnet.layers, *astuple(widths))

    def _score_widths(self) -> Units:
        """ETD-Impt scores of the teacher's units (the supernet starts as its copy), on the first
        `shape.width_batches` training batches in stored order: the same batches a separately trained thinner
        student scores, so a full-depth width keeps the same units."""
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "ordered_train_dataloader"):
            raise UserError("model.grid has thinner points: their units are scored on training batches when fit "
                            "starts; to validate or test, pass the --ckpt_path of a supernet fit")
        import itertools

        self.factory.teacher_on(trainer.strategy.root_device)
        self.factory.score_width(itertools.islice(datamodule.ordered_train_dataloader(),
                                                  self.recipe.shape.width_batches))
        return self.factory.width_scores

    def latent(self) -> dict[str, torch.Tensor]:
        """The supernet's tensors by name (tied names each), what every sub-network's slices read."""
        return {**dict(self.model.named_parameters(remove_duplicate=False)),
                **dict(self.model.named_buffers(remove_duplicate=False))}

    # -- training -------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self.subnetworks()

    def training_step(self, batch, batch_idx):
        subnetworks = self.subnetworks()
        drawn = self.sampler.sample(self.global_step)
        labels = batch["labels"]
        inputs = self._inputs(batch)
        config = self.objective.config
        details = dict(output_hidden_states=config.needs_hidden_states, output_attentions=config.needs_attentions)
        teacher = self.factory.teacher_outputs(inputs, self.device, config.needs_hidden_states or
                                               config.needs_attentions)
        latent, quantize = self.latent(), self.global_step >= self.recipe.quant_settings.warmup_steps
        total, size = 0.0, labels.size(0)
        for subnet in drawn:
            network = subnetworks[subnet]
            student = network(latent, quantize=quantize, **inputs, **details)
            loss, terms = self.objective(student, teacher, labels, batch["attention_mask"], network.encoder_map,
                                         network.decoder_map, training=True, kept=network.kept)
            total = total + loss
            self.log(f"train/{subnet.key}/loss", loss, batch_size=size)
        self.subnet_passes += len(drawn)
        self.log("train/loss", total, prog_bar=True, batch_size=size)
        self.log("train/subnet_passes", float(self.subnet_passes), batch_size=size)
        self.last_loss_terms = {"total": total.detach()}
        self.check_finite(total)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=size)
        return total

    def _inputs(self, batch) -> dict[str, torch.Tensor]:
        return dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    decoder_input_ids=self.model.prepare_decoder_input_ids_from_labels(labels=batch["labels"]))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # --trainer.gradient_clip_val, when given, wins over the module's (recipe) value.
        if gradient_clip_val is None and self.gradient_clip > 0:
            gradient_clip_val, gradient_clip_algorithm = self.gradient_clip, "norm"
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                            gradient_clip_algorithm=gradient_clip_algorithm)

    # -- evaluation: every grid point -------------------------------------------------------------------------
    def _start_evaluation(self) -> None:
        """Each point as a real model with the supernet's current weights, for the whole evaluation (generation
        needs one; functional_call cannot drive `generate`)."""
        latent = self.latent()
        self._evaluated = {}
        for subnet, network in self.subnetworks().items():
            model = network.materialized(latent, self.device)
            use_deployed_head(model, self.evaluation.eval_head == "deployed")
            model.generation_config = self.model.generation_config
            self._evaluated[subnet] = model

    def on_validation_epoch_start(self) -> None:
        self._start_evaluation()

    def on_test_epoch_start(self) -> None:
        self._start_evaluation()

    def validation_step(self, batch, batch_idx):
        self._evaluate_points(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate_points(batch, "test")

    def _evaluate_points(self, batch, stage: str) -> None:
        labels, inputs = batch["labels"], self._inputs(batch)
        config = self.objective.config
        details = dict(output_hidden_states=config.needs_hidden_states, output_attentions=config.needs_attentions)
        teacher = self.factory.teacher_outputs(inputs, self.device, True)
        references = self.decode(labels) if self.generate_on_validation or stage == "test" else None
        for subnet, model in self._evaluated.items():
            network = self._subnetworks[subnet]
            with torch.no_grad():
                student = model(**inputs, **details)
            loss, _ = self.objective(student, teacher, labels, batch["attention_mask"], network.encoder_map,
                                     network.decoder_map, training=False, kept=network.kept)
            self.log(f"{stage}/{subnet.key}/loss", loss, batch_size=labels.size(0), sync_dist=True)
            self.loyalty[subnet.key].update(student.logits, teacher.logits, labels != -100)
            if references is not None:
                with torch.no_grad():
                    generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                               generation_config=model.generation_config)
                lengths = (generated != self.tokenizer.pad_token_id).sum(dim=1) - 1
                self.subnet_metrics[subnet.key].update(self.decode(generated), references, lengths)

    def on_validation_epoch_end(self) -> None:
        scores = self._log_points("val", self.generate_on_validation)
        if not self.trainer.sanity_checking:
            self._keep_best(scores)

    def on_test_epoch_end(self) -> None:
        self._log_points("test", True)

    def _log_points(self, stage: str, generated: bool) -> dict[SubNet, dict[str, float]]:
        """Every point's metrics as `<stage>/<point>/<metric>`, their mean over the grid as `<stage>/<metric>`."""
        scores: dict[SubNet, dict[str, float]] = {}
        for subnet in self.grid:
            values = dict(self.loyalty[subnet.key].compute())
            self.loyalty[subnet.key].reset()
            if generated:
                values.update(self.subnet_metrics[subnet.key].compute())
                self.subnet_metrics[subnet.key].reset()
            scores[subnet] = {name: float(value) for name, value in values.items()}
            self.log_dict({f"{stage}/{subnet.key}/{name}": float(value) for name, value in values.items()})
        for name in scores[self.grid[0]]:
            self.log(f"{stage}/{name}", sum(point[name] for point in scores.values()) / len(scores),
                     prog_bar=stage == "val" and name == self.task.metric)
        self._evaluated = None  # the copies are freed until the next evaluation
        return scores

    def _keep_best(self, scores: dict[SubNet, dict[str, float]]) -> None:
        """Write the student of every point that beat its own best (`subnets/<point>.ckpt`), as a separately
        trained student keeps its best checkpoint."""
        metric = self.task.metric if self.hparams.select_by == "task" else "label_loyalty"
        improved = [subnet for subnet in self.grid
                    if subnet.key not in self.best or scores[subnet][metric] > self.best[subnet.key]["score"]]
        for subnet in improved:
            self.best[subnet.key] = {"score": scores[subnet][metric], "metric": metric, "subnet": subnet.name,
                                     "epoch": self.current_epoch, "step": self.global_step,
                                     "metrics": {f"val/{name}": value for name, value in scores[subnet].items()}}
        if not improved or not self.trainer.is_global_zero:
            return
        directory = Path(self.trainer.default_root_dir) / SUBNETS_DIR
        for subnet in improved:
            save_student_checkpoint(self, subnet, directory / f"{subnet.key}.ckpt")
        write_json_atomic(directory / "best.json", self.best)

    # -- checkpoints and summaries ------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["supernet"] = {"grid": [subnet.name for subnet in self.grid], "best": self.best,
                                  "subnet_passes": self.subnet_passes,
                                  "width_scores": None if self.width_scores is None else self.width_scores.to_state()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        stored = checkpoint.get("supernet") or {}
        if stored.get("grid") is not None and stored["grid"] != [subnet.name for subnet in self.grid]:
            raise UserError(f"model.grid: the checkpoint's supernet was trained on {stored['grid']}, not on "
                            f"{[subnet.name for subnet in self.grid]}; give the grid it was trained with")
        self.best = dict(stored.get("best") or {})
        self.subnet_passes = int(stored.get("subnet_passes") or 0)
        if stored.get("width_scores") is not None:
            self.width_scores = Units.from_state(stored["width_scores"])
            self._subnetworks = None  # rebuilt from the stored scores

    def run_summary(self) -> dict[str, Any]:
        """What this run is, for reports: a supernet, its grid, the passes it trained."""
        return {"mode": "supernet", "recipe": self.hparams.recipe, "teacher": self.hparams.teacher,
                "grid": [subnet.name for subnet in self.grid], "subnet_passes": self.subnet_passes,
                "sampling": asdict(self.sampling), "best": self.best}


def _sampling(value) -> SamplingSettings:
    if isinstance(value, SamplingSettings):
        return value
    known = SamplingSettings.__dataclass_fields__
    for key in value or {}:
        if key not in known:
            raise UserError(f"model.sampling.{key}: unknown setting; known: {', '.join(known)}")
    return SamplingSettings(**(value or {}))


def _refuse_unshareable(recipe) -> None:
    """Settings a supernet cannot share across its points."""
    quant = recipe.quant_settings
    for name in ("weight_method", "embedding_method", "act_method"):
        if getattr(quant, name) in ("lsq", "elastic"):
            raise UserError(f"model.quant_settings.{name}={getattr(quant, name)}: a supernet shares its latent "
                            "weights across bit widths, with each width's scale computed from them; learned step "
                            f"sizes (one per width and tensor) are not supported (recipe {recipe.name}); set "
                            f"--model.quant_settings.{name} to a statistics-based method (minmax, auto)")
    if recipe.shape.width_hidden != "kept":
        raise UserError("model.shape.width_hidden=projection: a supernet compares every width at the kept "
                        "dimensions; the learned projection is a DQ student option")
