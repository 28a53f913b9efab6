"""The command-line parser the sweep's point check runs every grid point through (`check.check_points`)."""

from __future__ import annotations

import lightning.pytorch as pl

from dq_lightning.cli import CLI_OPTIONS, DQLightningCLI, check_data_config
from dq_lightning.errors import UserError, first_line
from dq_lightning.sweep.check import GridWide, ParseRejected, check_gpus


class CheckCLI(DQLightningCLI):
    """A `DQLightningCLI` that builds its parser once, then parses (and with `instantiate` builds) the points
    given to it: building the parser is most of a parse's time."""

    ready = False
    build_classes = False

    @classmethod
    def build_once(cls, instantiate: bool) -> CheckCLI:
        cli = cls(pl.LightningModule, pl.LightningDataModule, **CLI_OPTIONS, args=["fit"])
        cli.build_classes, cli.ready = instantiate, True
        return cli

    def parse_arguments(self, parser, args) -> None:
        if self.ready:
            super().parse_arguments(parser, args)
        else:  # LightningCLI's __init__: the parser is built; points come through check()
            self.config = {"subcommand": "fit"}

    def _parse_ckpt_path(self) -> None:
        if self.ready:
            super()._parse_ckpt_path()

    def _set_seed(self) -> None:
        pass

    def before_instantiate_classes(self) -> None:
        pass  # the run creates its directory; the check writes nothing

    def instantiate_classes(self) -> None:
        if self.ready:
            super().instantiate_classes()

    def _run_subcommand(self, subcommand) -> None:
        pass

    def instantiate_trainer(self, **kwargs):
        # Lightning's Trainer refuses bad settings (a typo'd accelerator, devices it cannot use) with
        # ValueError or MisconfigurationException: the user's input, said in one line.
        try:
            return super().instantiate_trainer(**kwargs)
        except (ValueError, TypeError, RuntimeError) as error:  # MisconfigurationException is a ValueError
            raise UserError(f"trainer: {first_line(error)}") from None

    def build(self, argv: list[str], gpu_culprit: str, devices_culprit: str, build_classes: bool | None = None,
              splits: dict[str, str] | None = None) -> str:
        """Parse the run of `argv` (from its subcommand on), check the data splits it reads (`splits`: split ->
        what reads it; None: none checked), and with `build_classes` (default: as built) build it; return its
        model's class path."""
        try:
            self.parse_arguments(self.parser, argv)
        except UserError as error:  # a parser that words its complaints itself, rather than exiting
            raise ParseRejected(str(error)) from None
        self.subcommand = subcommand = argv[0]
        self._parse_ckpt_path()
        config = self.config[subcommand]
        if splits is not None:
            check_data_config(config.get("data"), splits)
        if not (self.build_classes if build_classes is None else build_classes):
            return str(config["model"]["class_path"])  # GPUs are the machine's business, not the file's
        trainer = config["trainer"]
        try:
            check_gpus(trainer.get("accelerator"), trainer.get("devices"), gpu_culprit, devices_culprit)
        except UserError as error:
            point_level = str(error).startswith("parameter ")
            raise (UserError if point_level else GridWide)(str(error)) from None
        try:
            self.instantiate_classes()
        finally:
            self.model = self.datamodule = self.trainer = self.config_init = None
        return str(config["model"]["class_path"])
