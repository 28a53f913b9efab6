"""The Lightning command line: `python -m dq_lightning fit|validate|test|predict --config <yaml>`.

Model and data are chosen in the config by `class_path` (any dq_lightning module and DataModule); configs are
parsed in OmegaConf mode, resolved after command-line overrides, so `${trainer.default_root_dir}` in a
callback follows `--trainer.default_root_dir`. Mistakes in user input
(`UserError`) end in one line on stderr and exit code 2, not a traceback.
"""

from __future__ import annotations

import os
import sys

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

from dq_lightning.errors import UserError


class DQLightningCLI(LightningCLI):
    def before_instantiate_classes(self) -> None:
        # A run directory may not exist yet for the logger and the saved config.
        trainer_config = self.config.get(self.subcommand, self.config).get("trainer", {})
        root = trainer_config.get("default_root_dir")
        if root:
            os.makedirs(root, exist_ok=True)


def main(argv: list[str]) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        DQLightningCLI(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"parser_mode": "omegaconf+"},
            # Passing sys.argv again would make LightningCLI warn about "args and command line arguments".
            args=None if argv == sys.argv[1:] else argv,
        )
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
