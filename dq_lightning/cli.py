"""The Lightning command line: `python -m dq_lightning fit|validate|test|predict --config <yaml>`.

Model and data are chosen in the config by `class_path` (any dq_lightning module and DataModule); configs are
parsed in OmegaConf mode, resolved after command-line overrides, so `${trainer.default_root_dir}` in a
callback follows `--trainer.default_root_dir`. Mistakes in user input
(`UserError`) end in one line on stderr and exit code 2, not a traceback. Checkpoints are saved atomically on every
filesystem, and a `--ckpt_path` is checked (readable, saved by the configured module class) before anything is
built (`dq_lightning.checkpoints`). The parser's own errors are one line naming the flag
(`dq_lightning.parser_errors`); GPUs the machine lacks, a data folder that is not there and a run folder that
cannot be written or already holds another run are refused before anything is built (`dq_lightning.run_folder`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import torch
import yaml
from jsonargparse import set_parsing_settings
from jsonargparse._actions import _ActionPrintConfig  # jsonargparse prints --print_config inside parse_args
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from dq_lightning.callbacks.global_batch import GlobalBatchSize
from dq_lightning.callbacks.metrics_file import last_checkpoint
from dq_lightning.checkpoints import check_ckpt_path, use_atomic_checkpoint_io
from dq_lightning.cluster import rendezvous_error, resume_path, with_agent_args
from dq_lightning.compat import upgrade_student_hparams
from dq_lightning.errors import UserError, command_line, first_line, make_variables
from dq_lightning.parser_errors import config_paths, typed_flag
from dq_lightning.parser_errors import explain as explain_parser_error
from dq_lightning.run_folder import (REPLACE_FLAG, check_run_folder, check_writable, claim_run_folder,
                                     is_other_rank, move_aside, output_dirs, replace_own_files)
from dq_lightning.config_files import (BASE_KEY, TASK_MONITOR_KEY, data_class, data_task, expand_bases,
                                         resolve_task_monitors, setting_origin)
from dq_lightning.devices import check_gpu_request
from dq_lightning.distill.recipe import GROUPS as SETTINGS_GROUPS

# Settings dataclasses (QuantSettings, ...) document each field in the docstring below it, as litgpt does:
# this makes those docstrings the `--help` of `--model.quant_settings.*`.
set_parsing_settings(docstring_parse_attribute_docstrings=True)


class SaveRunConfig(SaveConfigCallback):
    """Write the config once the run has produced something, so that it always describes the files beside it.

    A fit writes `config.yaml` with its first checkpoint (or at its end, if it saves none): a run that fails
    while setting up or before its first checkpoint (bad data, a NaN at the first resumed step, ...) leaves the
    `config.yaml` of the run that wrote the folder's checkpoints as it was. `validate`, `test` and `predict`
    write `<command>-config.yaml` when they finish, never the fit's `config.yaml`: `make teacher` tests the
    teacher in its run folder, and the fit's config must survive that.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._stage = stage

    def _save(self, trainer, pl_module) -> None:
        stage = getattr(self, "_stage", "fit")
        name = str(getattr(stage, "value", stage))  # Lightning passes a TrainerFn
        if name != "fit" and not self.already_saved:
            self.config_filename = f"{name}-config.yaml"
        was_saved = self.already_saved
        super().setup(trainer, pl_module, stage)
        if not was_saved and self.save_to_log_dir:
            log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask, or rank 0 waits forever
            if trainer.is_global_zero:
                keep_paths_relative_to_root(Path(log_dir) / self.config_filename)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._save(trainer, pl_module)  # every rank saves checkpoints together, as `setup`'s broadcasts need

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":  # not the validation inside a fit
            self._save(trainer, pl_module)

    def on_test_end(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module)

    def on_predict_end(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module)


# Where, relative to a path setting, `trainer.default_root_dir` is, in omegaconf's relative interpolation.
_ROOT_FROM = {("logger",): "${...default_root_dir}", ("logger", "list"): "${....default_root_dir}",
              ("callbacks", "list"): "${....default_root_dir}"}


def keep_paths_relative_to_root(config_path: Path) -> None:
    """Write the logger's `save_dir` and the callbacks' `dirpath` of a saved config back as interpolations of
    `trainer.default_root_dir` when they lie inside it, as the shipped configs spell them.

    The parser resolves `${...default_root_dir}` when it reads a config, so the saved file held the old run's
    folder literally: `test --config <run>/config.yaml --trainer.default_root_dir=<new>` then wrote its W&B run
    and checkpoints into the old folder, and a fit that way was refused for the wrong folder."""
    try:
        config = yaml.safe_load(config_path.read_text())
    except (OSError, yaml.YAMLError):
        return
    trainer = config.get("trainer") if isinstance(config, dict) else None
    root = trainer.get("default_root_dir") if isinstance(trainer, dict) else None
    if not isinstance(root, str) or not root:
        return
    root = root.rstrip("/")

    def relative(init_args: dict, key: str, interpolation: str) -> bool:
        value = init_args.get(key)
        if not isinstance(value, str) or not (value == root or value.startswith(root + "/")):
            return False
        init_args[key] = interpolation + value[len(root):]
        return True

    changed = False
    loggers = trainer.get("logger")
    for section, items, kind, key in (("logger", loggers, "dict", "save_dir"),
                                      ("logger", loggers, "list", "save_dir"),
                                      ("callbacks", trainer.get("callbacks"), "list", "dirpath")):
        entries = [items] if kind == "dict" and isinstance(items, dict) else (
            items if kind == "list" and isinstance(items, list) else [])
        interpolation = _ROOT_FROM[(section,) if kind == "dict" else (section, "list")]
        for entry in entries:
            init_args = entry.get("init_args") if isinstance(entry, dict) else None
            if isinstance(init_args, dict):
                changed |= relative(init_args, key, interpolation)
    if changed:
        staging = config_path.with_name(f".{config_path.name}.{os.getpid()}")
        staging.write_text(yaml.safe_dump(config, sort_keys=False))
        os.replace(staging, config_path)


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
        parser.add_argument("--replace_run", type=bool, default=False,
                            help="fit only: start over in a run folder that holds an earlier run; that run is "
                                 "first moved to <folder>.replaced-<time> (nothing is deleted). Without it such "
                                 "a fit is refused unless it continues the run (--ckpt_path=last)")
        parser.add_argument("--global_batch_size", type=Optional[int], default=None,
                            help="fit only: sequences per optimizer step over all devices and nodes; "
                                 "trainer.accumulate_grad_batches is derived as global_batch_size / (trainer.devices "
                                 "x trainer.num_nodes x data.batch_size) and recorded in config.yaml (the paper "
                                 "configs: 16, the DQ-BART recipe)")
        parser.add_argument(f"--{TASK_MONITOR_KEY}", type=Optional[str], default=None,
                            help="the validation metric a callback's `monitor: task` stands for (model selection: "
                                 "the best checkpoint, the metrics file's best); unset: the task's metric "
                                 "(val/rougeL, val/bleu). The paper DQ configs of xsum and cnn_dailymail: "
                                 "val/rougeLsum, the official script's choice")
        parser.add_argument(f"--{BASE_KEY}", type=Optional[list[str]], default=None,
                            help="in a config file only: the config files it builds on (paths relative to it), "
                                 "applied before it (dq_lightning.config_files)")

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
        if global_batch is None:
            return
        if isinstance(global_batch, bool) or global_batch < 1:  # 0 is no unset: config.yaml would record it
            raise UserError(f"--global_batch_size={global_batch} must be a positive number of sequences per "
                            "optimizer step; leave it unset (null) to use trainer.accumulate_grad_batches as given")
        callback = GlobalBatchSize(global_batch)
        record = callback.apply(self.trainer, self.datamodule, given=config.trainer.accumulate_grad_batches)
        config.trainer.accumulate_grad_batches = record["accumulate_grad_batches"]
        self.trainer.callbacks.append(callback)

    def after_fit(self) -> None:
        if self.config.fit.get("test_after_fit") and not self.trainer.interrupted:
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best_checkpoint(self.trainer))

    def instantiate_trainer(self, **kwargs) -> pl.Trainer:
        try:
            trainer = super().instantiate_trainer(**kwargs)
        # An accelerator, strategy or precision it cannot use, or whose package is not installed (tpu: torch_xla).
        except (MisconfigurationException, ModuleNotFoundError) as error:
            raise UserError(f"trainer settings: {first_line(error)}") from None
        use_atomic_checkpoint_io(trainer)
        return trainer

    def parse_arguments(self, parser, args) -> None:
        argv = sys.argv[1:] if args is None else args if isinstance(args, list) else []
        self._typed_argv = [str(token) for token in argv]
        self._argv = expand_bases(self._typed_argv)  # each --config preceded by its bases
        # `--print_config` is printed below, once the config is complete; jsonargparse would print it mid-parse.
        print_flags = [token.partition("=")[2] for token in self._argv if token.partition("=")[0] == PRINT_CONFIG]
        try:
            # Not LightningCLI's parse_arguments: given the expanded list while sys.argv holds the typed one,
            # it warns that both were given.
            self.config = parser.parse_args([token for token in self._argv
                                             if token.partition("=")[0] != PRINT_CONFIG])
        except argparse.ArgumentError as error:  # raised, not printed, when main() sets exit_on_error=False
            subparsers = getattr(self, "_subcommand_parsers", {})
            subparser = subparsers.get(self._argv[0]) if self._argv else None
            options = list((subparser or parser)._option_string_actions)
            raise UserError(explain_parser_error(str(error), self._argv, options)) from None
        self._model_flags = model_settings_given(argv)
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand, self.config)
        # A saved or printed config is complete: its bases are merged in, and their paths (relative to the
        # file that named them) would not hold where it is read again.
        config[BASE_KEY] = None
        resolve_task_monitors(config)
        if print_flags:
            print_config(self._subcommand_parsers[subcommand] if subcommand else parser, parser, self.config,
                         print_flags[-1])
        # Checked here, before LightningCLI replaces the configured model by the class and hyper-parameters saved
        # in the checkpoint (`_parse_ckpt_path`): a student fit given a teacher checkpoint would train a teacher.
        # `last` is resolved to its file here, so that it is checked as one given by path (a damaged last.ckpt is
        # one error line, not a traceback) and LightningCLI reads the same file's hyper-parameters.
        given = config.get("ckpt_path")
        ckpt_path = resume_path(config.get("trainer") or {}, given)
        if "ckpt_path" in config:  # a subcommand's; a CLI built without one (run=False) has no such option
            config["ckpt_path"] = ckpt_path
        model_class = (config.get("model") or {}).get("class_path")
        if ckpt_path and model_class:
            check_ckpt_path(ckpt_path, model_class, "trains" if subcommand == "fit" else "evaluates", given)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI's `_parse_ckpt_path` (the model config becomes the checkpoint's hyper-parameters), with
        two differences. A DQ student checkpoint written before the settings were grouped is read as today's
        arguments (`dq_lightning.compat`). And the model settings given on the command line win: LightningCLI
        would replace them too, so `test --model.evaluation.eval_head=deployed --ckpt_path ...` would test the
        trained head, and a lower `--model.lr` on resume would be dropped; the saved config.yaml then says what
        really ran. A setting inside a group is overridden alone (`--model.objective.hidden_weight=3` keeps the
        checkpoint's other objective settings)."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        model = self.config[subcommand].get("model")
        given = {}
        for name in getattr(self, "_model_flags", ()):
            with contextlib.suppress(KeyError):
                given[name] = model.init_args[name] if "." not in name else model[f"init_args.{name}"]
        hparams = torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters", {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        class_path = hparams.pop("_class_path", None)
        if class_path is not None and class_path.endswith("DQStudentModule"):
            hparams = upgrade_student_hparams(hparams)
        model_hparams = {"class_path": class_path, "init_args": hparams} if class_path else hparams
        try:
            self.config = self.parser.parse_object({subcommand: {"model": model_hparams}}, self.config)
        except (SystemExit, argparse.ArgumentError) as error:
            raise UserError(f"--ckpt_path={ckpt_path}: its hyper-parameters do not parse as today's "
                            f"{str(class_path).rpartition('.')[2]} settings ({first_line(error)})") from None
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
        # Everything that can be told from the config alone is checked here, before the teacher is loaded,
        # the data read or anything written: one error line instead of a traceback minutes later.
        argv = getattr(self, "_argv", [])
        config = self.config.get(self.subcommand, self.config)
        check_gpus(trainer_config, getattr(self, "_typed_argv", argv))  # names the config the user typed
        check_data_config(config.get("data"), splits_read(self.subcommand, bool(config.get("test_after_fit"))))
        root = trainer_config.get("default_root_dir")
        self._move_aside = []
        replace_own_files(trainer_config)  # on every rank: their checkpoint callbacks must agree on names
        if not is_other_rank():
            for path, setting in output_dirs(trainer_config).items():  # every folder the run will write
                check_writable(path, setting)
            if self.subcommand == "fit":
                # Claimed before the folder is judged: of two fits started together, the second is refused here
                # instead of both finding it empty and training into it.
                self._claim = claim_run_folder(root)
                self._move_aside = check_run_folder(trainer_config, config.get("ckpt_path"),
                                                    bool(config.get("replace_run")))
        # A run directory may not exist yet for the logger and the saved config.
        if root:
            try:
                os.makedirs(root, exist_ok=True)
            except OSError as error:
                raise UserError(f"--trainer.default_root_dir={root}: cannot create it "
                                f"({error.strerror or error})") from None

    def _run_subcommand(self, subcommand: str) -> None:
        # The earlier run is moved away only now that the new one is fully built: a mistake found while
        # building it (a missing teacher, bad bits) leaves the folder as it was.
        for old, new in move_aside(getattr(self, "_move_aside", [])):
            print(f"{REPLACE_FLAG}: moved the earlier run {old} to {new}", file=sys.stderr, flush=True)
            if old == Path(self.trainer.default_root_dir):
                os.makedirs(old, exist_ok=True)  # the loggers built above write here
        try:
            super()._run_subcommand(subcommand)
        finally:
            if getattr(self, "_claim", None) is not None:
                self._claim.release()


PRINT_CONFIG = "--print_config"


def print_config(subparser, parser, config, flags: str) -> None:
    """Print `config` as jsonargparse's `--print_config[=flags]` does (its own action and dump), and exit."""
    action = next(action for action in subparser._actions if isinstance(action, _ActionPrintConfig))
    try:
        action(subparser, None, [flags], PRINT_CONFIG)
    except argparse.ArgumentError as error:
        raise UserError(f"{PRINT_CONFIG}={flags}: {error}") from None
    _ActionPrintConfig.print_config_if_requested(parser, config)


def model_settings_given(argv: list[str]) -> list[str]:
    """The model settings named on the command line, as keys of the model's init args: `--model.lr=1e-5` and
    `--model.init_args.lr 1e-5` give lr, `--model.objective.hidden_weight=3` gives objective.hidden_weight, and
    `--model.generation.num_beams=1` gives generation (a mapping, not settings of its own)."""
    names = []
    for token in argv:
        if isinstance(token, str) and token.startswith("--model."):
            key = token[len("--model."):].split("=", 1)[0].removeprefix("init_args.")
            first = key.split(".")[0]
            if first and first not in ("class_path", "init_args", "dict_kwargs", "help"):
                names.append(key if first in SETTINGS_GROUPS else first)
    return names


def splits_read(subcommand: str | None, test_after_fit: bool = False) -> dict[str, str]:
    """The data splits a command reads, each with what reads it (for the error line when one is missing)."""
    from dq_lightning.data.datamodule import STAGE_SPLITS

    command = subcommand or "fit"
    splits = {split: f"`{command}`" for split in STAGE_SPLITS.get(command, ())}
    if command == "fit" and test_after_fit:
        splits["test"] = "the test after the fit (test_after_fit: true)"
    return splits


def check_data_config(data: dict | None, splits: dict[str, str] | None = None) -> None:
    """`check_data_source` for the configured DataModule, when it is one of ours: the splits it will read."""
    task = data_task(data)
    if not task:
        return
    from dq_lightning.data.datamodule import DEFAULT_CACHE_DIR, Seq2SeqDataModule, check_data_source

    if issubclass(data_class(data), Seq2SeqDataModule):
        init_args = data.get("init_args") or {}
        check_data_source(task, init_args.get("data_dir"), init_args.get("cache_dir") or DEFAULT_CACHE_DIR,
                          splits, init_args.get("test_file"), init_args.get("unlabeled_file"))


def check_gpus(trainer_config: dict, argv: list[str]) -> None:
    """`check_gpu_request` for a fit/test: the culprit is the flag as typed, else the config file, and the make
    variable (GPUS=, SCALE=paper) behind it when make ran the command."""
    accelerator, devices = trainer_config.get("accelerator"), trainer_config.get("devices")
    if str(accelerator).lower() not in ("gpu", "cuda"):
        return
    make = make_variables()
    culprits, hints = {}, {}
    for name, value in (("accelerator", accelerator), ("devices", devices)):
        culprit, from_flag = setting_source(f"trainer.{name}", value, argv)
        hint = "; on CPU use --trainer.accelerator=cpu (or a -tiny config)" if name == "accelerator" else ""
        if from_flag and make.get("GPUS"):
            culprit, hint = f"{culprit} (make: GPUS={make['GPUS']})", "; leave GPUS unset to train on the CPU"
        elif not from_flag and make.get("SCALE") == "paper":
            culprit, hint = (f"{culprit} (make: SCALE=paper)",
                             "; SCALE=paper is for GPU machines, SCALE=tiny trains on CPU")
        culprits[name], hints[name] = culprit, hint
    check_gpu_request(accelerator, devices, culprits["accelerator"], devices_culprit=culprits["devices"],
                      no_gpu_hint=hints["accelerator"], too_few_hint=hints["devices"])


def setting_source(key: str, value, argv: list[str]) -> tuple[str, bool]:
    """Who set `key` (e.g. trainer.accelerator): the flag as typed, else the last --config file that sets it;
    and whether it was a flag."""
    typed = typed_flag(key, argv)
    if typed:
        return typed, True
    section, _, name = key.partition(".")
    for path in reversed(config_paths(argv)):
        try:
            origin = setting_origin(path, section, name)
        except (OSError, UnicodeDecodeError, yaml.YAMLError, UserError):
            continue
        if origin is not None:
            via = "" if origin == Path(path) else f", from {origin}"
            return f"{path} ({key}: {value}{via})", False
    return f"{key}={value}", False


CLI_OPTIONS = dict(subclass_mode_model=True, subclass_mode_data=True, auto_configure_optimizers=False,
                   save_config_callback=SaveRunConfig, save_config_kwargs={"overwrite": True},
                   parser_kwargs={"parser_mode": "omegaconf+"})


@command_line
def main(argv: list[str]) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = with_agent_args(argv)  # a W&B agent's DQ_SWEEP_ARGS (GPUs, data folder of this machine)
    # The parser raises instead of printing its usage and a page of union subtypes; parse_arguments turns the
    # error into one line. Only here: the sweep's point check reads the printed text of CLI_OPTIONS' parser.
    options = {**CLI_OPTIONS, "parser_kwargs": {**CLI_OPTIONS["parser_kwargs"], "exit_on_error": False}}
    # Passing sys.argv again would make LightningCLI warn about "args and command line arguments".
    try:
        DQLightningCLI(pl.LightningModule, pl.LightningDataModule, **options,
                       args=None if argv == sys.argv[1:] else argv)
    except Exception as error:  # noqa: BLE001 - re-raised unless it is a DDP rendezvous that timed out
        waited = rendezvous_error(error)
        if waited is None:
            raise
        raise UserError(waited) from None
    return 0
