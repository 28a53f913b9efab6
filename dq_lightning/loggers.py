"""Weights & Biases logging that never prompts and never needs a network.

With `mode="auto"` the run is online only when the user is logged in (WANDB_API_KEY or a netrc entry for
the W&B host); otherwise it is written offline under `save_dir/wandb` and `wandb sync` uploads it later.
"""

from __future__ import annotations

import netrc
import os
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger

from dq_lightning.errors import UserError

MODES = ("auto", "online", "offline", "disabled")


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(mode: str = "auto") -> str:
    """The W&B mode to run in; WANDB_MODE in the environment wins over `mode`."""
    requested = os.environ.get("WANDB_MODE") or mode
    if requested == "dryrun":
        requested = "offline"
    if requested not in MODES:
        raise UserError(f"W&B mode {requested!r} (trainer.logger mode or WANDB_MODE) is not one of "
                        f"{', '.join(MODES)}")
    if requested == "auto":
        return "online" if wandb_logged_in() else "offline"
    if requested == "online" and not wandb_logged_in():
        raise UserError("WANDB_MODE=online but no W&B login was found; run `wandb login`, set WANDB_API_KEY, "
                        "or unset WANDB_MODE to log offline")
    return requested


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger, online when logged in and offline otherwise (never a login prompt)."""

    def __init__(self, project: str = "dq-lightning", name: str | None = None, save_dir: str = "runs",
                 group: str | None = None, tags: list[str] | None = None, mode: str = "auto",
                 log_model: bool = False, id: str | None = None):
        """
        Args:
            project: W&B project.
            name: run name shown in the dashboard.
            save_dir: directory for the local run files (`<save_dir>/wandb`).
            group: W&B group (a sweep groups its runs).
            tags: W&B tags.
            mode: auto (online if logged in, else offline), online, offline or disabled; WANDB_MODE wins.
            log_model: upload checkpoints as W&B artifacts.
            id: W&B run id; a second process with the same id (test after fit, a resumed fit) continues
                that run instead of starting another.
        """
        resolved = resolve_wandb_mode(mode)
        os.makedirs(save_dir, exist_ok=True)
        super().__init__(project=project, name=name, save_dir=save_dir, group=group, tags=tags, id=id,
                         offline=resolved == "offline", mode=resolved,
                         log_model=log_model and resolved == "online")
