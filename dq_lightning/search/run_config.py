"""The task's DQ run, read from its config file as `fit` would read it, without building or running anything.

The config goes through the project's own LightningCLI parser (`CheckCLI`, the sweep's point check), so
interpolations (`tokenizer: "${...model.init_args.teacher}"`), overrides and type checks are `fit`'s, and a
mistake is `fit`'s one error line. The search then builds each candidate's module and one DataModule from the
parsed arguments itself: the config's trainer (epochs, checkpoints, the logger of one run) is not the search's.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass, field
from typing import Any

from dq_lightning.errors import UserError

# Trainer settings of the config that change what a candidate's fit computes, and so are kept.
KEPT_TRAINER_SETTINGS = ("accelerator", "precision", "accumulate_grad_batches", "gradient_clip_val")


@dataclass(frozen=True)
class RunConfig:
    """The parts of a DQ config a candidate is built from."""

    config: str
    model_class: type
    model_args: dict[str, Any]
    data_class: type
    data_args: dict[str, Any]
    trainer_args: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> str:
        return getattr(self.data_class, "task_name", "") or "task"

    @property
    def teacher(self) -> str:
        return str(self.model_args.get("teacher"))


def _class(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _parsed(config: str, overrides: list[str]) -> Any:
    """The `fit` namespace of `--config config` with `overrides`, or the parser's complaint as a UserError."""
    import lightning.pytorch as pl

    from dq_lightning.cli import CLI_OPTIONS
    from dq_lightning.sweep.check_cli import CheckCLI

    # As `python -m dq_lightning fit` does: the parser raises instead of printing its usage, and
    # DQLightningCLI turns that into one line naming the flag.
    options = {**CLI_OPTIONS, "parser_kwargs": {**CLI_OPTIONS["parser_kwargs"], "exit_on_error": False}}
    with warnings.catch_warnings():  # "args and command line arguments": the command line is search-map's own
        warnings.filterwarnings("ignore", message=".*args parameter is intended")
        cli = CheckCLI(pl.LightningModule, pl.LightningDataModule, **options, args=["fit"])
    cli.ready = True
    cli.build(["fit", "--config", config, *overrides], "--config", "--config")
    return cli.config["fit"]


def read_run_config(config: str, data_dir: str | None = None) -> RunConfig:
    """The model, data and kept trainer settings of `config` (a DQ student config such as
    experiments/xsum/dq-tiny.yaml), with `data_dir` as `--data.data_dir`."""
    from dq_lightning.cli import check_data_config, splits_read
    from dq_lightning.modules.student import DQStudentModule

    fit = _parsed(config, [f"--data.data_dir={data_dir}"] if data_dir else [])
    model, data = fit["model"].as_dict(), fit["data"].as_dict()
    model_class, data_class = _class(model["class_path"]), _class(data["class_path"])
    if not (isinstance(model_class, type) and issubclass(model_class, DQStudentModule)):
        raise UserError(f"--config {config}: its model is {model['class_path']}, not a DQ student "
                        "(use a dq-<scale>.yaml config, e.g. experiments/xsum/dq-tiny.yaml)")
    try:  # a missing data folder is one line now, not after the teacher is read
        check_data_config(fit["data"], splits_read("fit"))
    except UserError as error:
        raise UserError(str(error).replace("--data.data_dir=", "--data-dir ", 1)) from None
    trainer = fit["trainer"].as_dict() if hasattr(fit["trainer"], "as_dict") else dict(fit["trainer"])
    kept = {name: trainer[name] for name in KEPT_TRAINER_SETTINGS if trainer.get(name) is not None}
    return RunConfig(config, model_class, model.get("init_args") or {}, data_class, data.get("init_args") or {},
                     kept)
