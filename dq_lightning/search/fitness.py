"""A candidate map's fitness: a short DQ fit of the student it gives, scored on the validation split.

The scalar is the validation **label loyalty** to the teacher (the share of target positions where the
student's top token is the teacher's, under teacher forcing); ties go to the lower validation task loss.
Why that one:

- it is how the project measures a student's faithfulness to its teacher, and at CPU scale the measure that
  separates runs (docs/results.md, "Recipes": ROUGE-L differences there are noise; loyalty differences mostly
  are not). Of the two loyalties it is the one closest to what generation does, the greedy next-token choice;
- it compares maps fairly: the distillation terms of the loss (hidden states, attention maps) measure the
  student against the teacher layers *its own map* picked, so a map of easy-to-match layers would score a
  low loss for nothing; loyalty compares final outputs only;
- it needs no generation (`generate_on_validation=False`): one teacher-forced pass of the validation rows;
- the task loss (cross-entropy against the references) is on the same footing for every map, but after a
  few dozen steps it says less about the student than its distance to the teacher does; it breaks ties.

It is a proxy of one short fit from one seed: the five-seed spread of a full 2-2-8 6-3 fit's label loyalty
is 0.013 (docs/results.md, "Recipe ablation"), so a best map that beats the best hand-made one by less than
that is worth confirming with full fits over seeds before it replaces it.

Every candidate is fitted from the same seed, so its fitness does not depend on when it is evaluated.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dq_lightning.search.genome import Genome, genome_key
from dq_lightning.search.run_config import RunConfig
from dq_lightning.search.settings import SearchSettings


@dataclass(frozen=True)
class Fitness:
    """A candidate's scores (None when its fit failed, e.g. a non-finite loss) and its fit's wall time."""

    label_loyalty: float | None
    prob_loyalty: float | None
    task_loss: float | None
    loss: float | None
    seconds: float
    error: str = ""

    @property
    def value(self) -> float | None:
        """The scalar fitness: validation label loyalty (None for a failed fit)."""
        return self.label_loyalty

    def rank(self) -> tuple[float, float]:
        """Sort key, higher is better: loyalty, then lower task loss; a failed fit ranks last."""
        def finite(value: float | None) -> float:
            return value if value is not None and math.isfinite(value) else -math.inf

        loss = self.task_loss if self.task_loss is not None and math.isfinite(self.task_loss) else math.inf
        return finite(self.label_loyalty), -loss

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fitness:
        return cls(**data)


class DQFitness:
    """Fitness of a genome by a short in-process DQ fit (`settings.steps` optimizer steps) of the config's
    `DQStudentModule`, then one validation pass; each fit is one W&B run of the search's group."""

    def __init__(self, run: RunConfig, settings: SearchSettings, out_dir: Path, group: str):
        self.run, self.settings, self.out_dir, self.group = run, settings, Path(out_dir), group
        # One DataModule for every candidate: its tokenized splits are read once, and each fit's loader is
        # seeded afresh from the candidate's seed.
        self.data = run.data_class(**run.data_args)

    def module(self, genome: Genome):
        settings, args = self.settings, self.run.model_args
        shape = {**(args.get("shape") or {}), "encoder_layer_map": list(genome[0]),
                 "decoder_layer_map": list(genome[1]), "unsorted_layer_maps": settings.allow_unsorted}
        evaluation = {**(args.get("evaluation") or {}), "generate_on_validation": False, "evaluate_teacher": False,
                      "prediction_table_rows": 0}
        return self.run.model_class(**{**args, "bits": settings.bits, "depth": settings.depth, "shape": shape,
                                       "evaluation": evaluation})

    def logger(self, genome: Genome):
        from dq_lightning.loggers import WandbLogger, resolve_wandb_mode

        if resolve_wandb_mode() == "disabled":
            return False
        return WandbLogger(name=f"{self.group} {genome_key(genome)}", save_dir=str(self.out_dir), group=self.group,
                           tags=["search-map"])

    def trainer(self, logger, **settings: Any):
        import lightning.pytorch as pl

        common = dict(accelerator="cpu", devices=1, logger=logger, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      default_root_dir=str(self.out_dir), log_every_n_steps=min(10, self.settings.steps))
        return pl.Trainer(**{**common, **self.run.trainer_args, **settings})

    def __call__(self, genome: Genome) -> Fitness:
        import lightning.pytorch as pl

        from dq_lightning.errors import first_line
        from dq_lightning.modules.seq2seq import NonFiniteLossError

        start = time.monotonic()
        pl.seed_everything(self.settings.seed, verbose=False)
        logger = None
        try:
            module = self.module(genome)
            logger = self.logger(genome)
            self.trainer(logger, max_steps=self.settings.steps, max_epochs=-1,
                         limit_val_batches=0).fit(module, datamodule=self.data)
            metrics = self.trainer(logger).validate(module, datamodule=self.data, verbose=False)[0]
        except NonFiniteLossError as error:  # a map that diverges is a bad map, not a failed search
            return Fitness(None, None, None, None, time.monotonic() - start, error=first_line(error))
        finally:
            if logger:
                logger.experiment.finish()  # the next candidate's logger would otherwise join this run
        scores = Fitness(*(float(metrics[f"val/{name}"]) for name in ("label_loyalty", "prob_loyalty", "loss_task",
                                                                     "loss")), seconds=time.monotonic() - start)
        return scores


class SupernetFitness(DQFitness):
    """Fitness of a genome read off a trained supernet (`search-map --supernet`): the student of the map is the
    supernet's sub-network with those layers (`dq_lightning.supernet`), validated as it is, without a fit. The
    maps need not be trained points: a layer is the supernet's whatever map picks it, so this scores a map by how
    well the layers the supernet trained serve in it (one validation pass instead of a short fit)."""

    def __init__(self, run: RunConfig, settings: SearchSettings, out_dir: Path, group: str, supernet_path: str):
        super().__init__(run, settings, out_dir, group)
        from dq_lightning.supernet.extract import load_supernet

        self.supernet, _ = load_supernet(supernet_path)
        if self.supernet.hparams.recipe != run.model_args.get("recipe", "dq-bart"):
            from dq_lightning.errors import UserError

            raise UserError(f"--supernet {supernet_path}: trained with recipe {self.supernet.hparams.recipe}, the "
                            f"config's students use {run.model_args.get('recipe')}; give a config of the same recipe")
        self.latent = self.supernet.latent()

    def __call__(self, genome: Genome) -> Fitness:
        from dataclasses import replace

        from dq_lightning.quant import prepare
        from dq_lightning.supernet.grid import SubNet
        from dq_lightning.supernet.subnetwork import SubNetwork

        start = time.monotonic()
        recipe = self.supernet.recipe
        shape = replace(recipe.shape, encoder_layer_map=list(genome[0]), decoder_layer_map=list(genome[1]),
                        unsorted_layer_maps=self.settings.allow_unsorted)
        network = SubNetwork(SubNet(self.settings.bits, self.settings.depth), self.supernet.hparams.teacher,
                             replace(recipe, shape=shape), self.supernet.width_scores)
        module = self.module(genome)
        if module.quant_config is not None:
            prepare(module.model, module.quant_config)
        module.model.load_state_dict(network.state(self.latent))
        metrics = self.trainer(False).validate(module, datamodule=self.data, verbose=False)[0]
        return Fitness(*(float(metrics[f"val/{name}"]) for name in ("label_loyalty", "prob_loyalty", "loss_task",
                                                                    "loss")), seconds=time.monotonic() - start)

