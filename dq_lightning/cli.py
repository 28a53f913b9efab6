"""The Lightning command line: `python -m dq_lightning fit|validate|test|predict --config <yaml>`.

Model and data are chosen in the config by `class_path` (any dq_lightning module and DataModule); configs are
parsed in OmegaConf mode, resolved after command-line overrides, so `${trainer.default_root_dir}` in a
callback follows `--trainer.default_root_dir`. Mistakes in user input
(`UserError`) end in one line on stderr and exit code 2, not a traceback. Checkpoints are saved atomically on every
filesystem, and a `--ckpt_path` is checked (readable, saved by the configured module class) before anything is
built (`dq_lightning.checkpoints`).
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from dq_lightning.callbacks.global_batch import GlobalBatchSize
from dq_lightning.callbacks.metrics_file import last_checkpoint
from dq_lightning.checkpoints import check_ckpt_path, use_atomic_checkpoint_io
from dq_lightning.cluster import resume_path, with_agent_args
from dq_lightning.errors import UserError


class SaveConfigOnStart(SaveConfigCallback):
    """Write `config.yaml` once the run has really started, not at setup.

    A run that fails while setting up (bad data, unreadable teacher, ...) then leaves the `config.yaml` of
    the run that produced the directory's checkpoints as it was.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._stage = stage

    def _save(self, trainer, pl_module) -> None:
        super().setup(trainer, pl_module, self._stage)

    on_train_start = on_validation_start = on_test_start = on_predict_start = _save


def best_checkpoint(trainer: pl.Trainer) -> str | None:
    """The best checkpoint of the callback that ranks by a metric, else the newest `last.ckpt`, else None.

    `ckpt_path="best"` would ask `trainer.checkpoint_callback`, the first ModelCheckpoint, which in the shipped
    configs is the periodic `last.ckpt` saver that ranks nothing.
    """
    callbacks = trainer.checkpoint_callbacks
    best = next((c.best_model_path for c in callbacks if getattr(c, "monitor", None) and c.best_model_path), "")
    return best or last_checkpoint(trainer)


class DQLightningCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="fit only: then test the best checkpoint in the same process (one W&B run "
                                 "holds validation and test metrics; a sweep run starts one process, not two)")
        parser.add_argument("--global_batch_size", type=Optional[int], default=None,
                            help="fit only: sequences per optimizer step over all devices and nodes; "
                                 "trainer.accumulate_grad_batches is derived as global_batch_size / (trainer.devices "
                                 "x trainer.num_nodes x data.batch_size) and recorded in config.yaml (the paper "
                                 "configs: 16, the DQ-BART recipe)")

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        self._keep_global_batch()

    def _keep_global_batch(self) -> None:
        # Derived here, in the launching process before any DDP process starts, so an indivisible global batch
        # is one error line; the config.yaml the run saves then holds the derived accumulation.
        if self.subcommand not in (None, "fit"):
            return
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        global_batch = config.get("global_batch_size") if config is not None else None
        if not global_batch:
            return
        callback = GlobalBatchSize(global_batch)
        record = callback.apply(self.trainer, self.datamodule, given=config.trainer.accumulate_grad_batches)
        config.trainer.accumulate_grad_batches = record["accumulate_grad_batches"]
        self.trainer.callbacks.append(callback)

    def before_fit(self) -> None:
        # `--ckpt_path last` after a SLURM requeue: the checkpoint Lightning saved on the warning signal, when newer.
        config = self.config_init[self.subcommand]
        config.ckpt_path = resume_path(self.trainer, config.get("ckpt_path"))


    def after_fit(self) -> None:
        if self.config.fit.get("test_after_fit") and not self.trainer.interrupted:
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best_checkpoint(self.trainer))

    def instantiate_trainer(self, **kwargs) -> pl.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoint_io(trainer)
        return trainer

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        argv = sys.argv[1:] if args is None else args if isinstance(args, list) else []
        self._model_flags = model_settings_given(argv)
        # Checked here, before LightningCLI replaces the configured model by the class and hyper-parameters saved
        # in the checkpoint (`_parse_ckpt_path`): a student fit given a teacher checkpoint would train a teacher.
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand, self.config)
        ckpt_path, model_class = config.get("ckpt_path"), (config.get("model") or {}).get("class_path")
        if ckpt_path and model_class:
            check_ckpt_path(ckpt_path, model_class, "trains" if subcommand == "fit" else "evaluates")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI replaces the whole model config by the checkpoint's hyper-parameters, command-line flags
        # included: `test --model.eval_head=deployed --ckpt_path ...` would test the trained head, and a lower
        # `--model.lr` on resume would be dropped. The model settings given on the command line win; the saved
        # config.yaml then says what really ran.
        subcommand = self.config.get("subcommand")
        model = self.config.get(subcommand, {}).get("model") if subcommand else None
        init_args = model.get("init_args") if model is not None else None
        given = {name: init_args[name] for name in getattr(self, "_model_flags", ())
                 if init_args is not None and name in init_args}
        super()._parse_ckpt_path()
        for name, value in given.items():
            self.config[f"{subcommand}.model.init_args.{name}"] = value

    def before_instantiate_classes(self) -> None:
        trainer_config = self.config.get(self.subcommand, self.config).get("trainer", {})
        sweep_dir, run_id = os.environ.get("DQ_SWEEP_DIR"), os.environ.get("WANDB_RUN_ID")
        if sweep_dir and run_id and os.environ.get("WANDB_SWEEP_ID"):
            # Launched by `wandb agent`: each run gets its own directory and logs into the agent's run.
            old_root, new_root = str(trainer_config.get("default_root_dir") or ""), os.path.join(sweep_dir, run_id)
            trainer_config["default_root_dir"] = new_root
            for callback in trainer_config.get("callbacks") or []:
                dirpath = str(callback.get("init_args", {}).get("dirpath") or "")
                if old_root and dirpath.startswith(old_root):
                    callback["init_args"]["dirpath"] = new_root + dirpath[len(old_root):]
            logger = trainer_config.get("logger")
            if logger and "init_args" in logger:
                logger["init_args"]["id"] = run_id
                logger["init_args"]["save_dir"] = trainer_config["default_root_dir"]
        # A run directory may not exist yet for the logger and the saved config.
        root = trainer_config.get("default_root_dir")
        if root:
            os.makedirs(root, exist_ok=True)


def model_settings_given(argv: list[str]) -> list[str]:
    """The model settings named on the command line: `--model.lr=1e-5`, `--model.init_args.lr 1e-5` and
    `--model.generation.num_beams=1` give lr, lr and generation."""
    names = []
    for token in argv:
        if isinstance(token, str) and token.startswith("--model."):
            key = token[len("--model."):].split("=", 1)[0].removeprefix("init_args.").split(".")[0]
            if key and key not in ("class_path", "init_args", "dict_kwargs"):
                names.append(key)
    return names


CLI_OPTIONS = dict(subclass_mode_model=True, subclass_mode_data=True, auto_configure_optimizers=False,
                   save_config_callback=SaveConfigOnStart, save_config_kwargs={"overwrite": True},
                   parser_kwargs={"parser_mode": "omegaconf+"})


def main(argv: list[str]) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = with_agent_args(argv)  # a W&B agent's DQ_SWEEP_ARGS (GPUs, data folder of this machine)
    try:
        # Passing sys.argv again would make LightningCLI warn about "args and command line arguments".
        DQLightningCLI(pl.LightningModule, pl.LightningDataModule, **CLI_OPTIONS,
                       args=None if argv == sys.argv[1:] else argv)
    except Exception as error:  # noqa: BLE001 - only user errors are caught; the rest is re-raised
        user_error = find_user_error(error)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        return 2
    return 0


def find_user_error(error: BaseException | None) -> UserError | None:
    """The `UserError` behind `error`: jsonargparse re-raises errors from a class's __init__ as its own."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
