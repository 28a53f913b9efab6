"""What a sweep checks before it trains anything: the data, the GPUs, and every point of its grid.

A sweep that meets a typo'd value at its 30th point has spent the 29 runs before it, and one that asks for GPUs
the machine lacks fails every run; so both are found before the first run starts. `preflight_*` needs no
Lightning and no teacher (`make sweep` runs it before training the teacher). Every grid point is then parsed,
and built, by `dq_lightning.sweep.check_cli.check_points`, which needs the command line.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from urllib.parse import urlparse

import yaml

from dq_lightning.config_files import read_composed
from dq_lightning.errors import UserError
from dq_lightning.sweep.spec import command_for
from dq_lightning.devices import check_gpu_request


# -- data ---------------------------------------------------------------------------------------------
def hub_offline() -> str | None:
    """Why the Hugging Face Hub cannot be reached from here, or None when it may be: the DataModule's offline
    settings, then (a sweep is about to spend hours) a connection attempt."""
    from dq_lightning.data.datamodule import hub_offline as offline_setting  # not at import: datasets is slow

    setting = offline_setting()
    if setting:
        return setting
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # only the proxy knows; datasets will say if it cannot get through
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return f"{host} is unreachable"
    return None


def flag_value(args: Sequence[str], *names: str) -> str | None:
    """The last value given to any of `names` in `args` (`--name=value` or `--name value`)."""
    found = None
    for index, token in enumerate(args):
        for name in names:
            if token == name and index + 1 < len(args):
                found = str(args[index + 1])
            elif str(token).startswith(name + "="):
                found = str(token)[len(name) + 1:]
    return found


def _config_setting(config: dict, section: str, key: str):
    """`section.key` of a LightningCLI config file, plain or under init_args."""
    part = config.get(section) if isinstance(config, dict) else None
    if not isinstance(part, dict):
        return None
    if key in part:
        return part[key]
    init_args = part.get("init_args")
    return init_args.get(key) if isinstance(init_args, dict) else None


def _read_config(command: list[str]) -> tuple[str | None, dict]:
    config = flag_value(command, "--config")
    if not config:
        return None, {}
    try:
        return config, read_composed(config)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return config, {}  # the full check reports it with the parser's own words


def preflight_data(task, sweep: dict, data_dir: str | None) -> None:
    """No data folder while the Hub is unreachable: every run would fail loading its data, so stop now."""
    if task.hub_path is None or data_dir:
        return
    command = command_for(sweep, [])
    config_file, config = _read_config(command)
    given = (flag_value(command, "--data.data_dir", "--data.init_args.data_dir")
             or _config_setting(config, "data", "data_dir")
             or any(name in ("data.data_dir", "data.init_args.data_dir") for name in sweep["parameters"]))
    cache_dir = (flag_value(command, "--data.cache_dir", "--data.init_args.cache_dir")
                 or _config_setting(config, "data", "cache_dir") or _default_cache_dir())
    from dq_lightning.data.datamodule import hub_cached  # not at import: datasets is slow to import

    if given or hub_cached(task.hub_path, cache_dir):
        return
    reason = hub_offline()
    if reason:
        raise UserError(f"no data folder for {task.name}, and its Hub dataset {task.hub_path} cannot be downloaded "
                        f"({reason}): give the folder of train/validation/test.jsonl with --data-dir DIR "
                        f"(make sweep: DATA_DIR=DIR)")


def _default_cache_dir() -> str:
    from dq_lightning.data.datamodule import DEFAULT_CACHE_DIR

    return str(DEFAULT_CACHE_DIR)


# -- GPUs ---------------------------------------------------------------------------------------------
def check_gpus(accelerator, devices, culprit: str, devices_culprit: str | None = None) -> None:
    """`check_gpu_request` with the sweep's hint: the tiny scale trains on CPU."""
    tiny_hint = ("; on CPU use the tiny scale (--scale tiny, make: SCALE=tiny)"
                 if culprit.startswith(("experiments/", "the sweep command")) or "paper" in culprit else "")
    check_gpu_request(accelerator, devices, culprit, devices_culprit=devices_culprit, no_gpu_hint=tiny_hint)


def preflight_gpus(sweep: dict, gpus: int | None) -> None:
    """The GPUs asked for by --gpus or, failing that, by the sweep's command and its config file."""
    if gpus is not None:
        if gpus < 1:
            raise UserError(f"--gpus {gpus} (make: GPUS={gpus}) must be a positive number of GPUs per run")
        check_gpus("gpu", gpus, f"--gpus {gpus} (make: GPUS={gpus})")
        return
    command = command_for(sweep, [])
    config_file, config = _read_config(command)
    accelerator = flag_value(command, "--trainer.accelerator")
    devices = flag_value(command, "--trainer.devices") or _config_setting(config, "trainer", "devices")
    if accelerator is not None:
        check_gpus(accelerator, devices, f"the sweep command's --trainer.accelerator={accelerator}")
    else:
        accelerator = _config_setting(config, "trainer", "accelerator")
        check_gpus(accelerator, devices, f"{config_file} (trainer.accelerator: {accelerator})")


# -- the teacher, before it is trained ----------------------------------------------------------------
def teacher_stand_in(task: str, scale: str, teacher_dir) -> dict:
    """{<teacher_dir>/hf: the transformers config of the teacher `make teacher` trains there}, while that
    directory does not exist yet: the model `experiments/<task>/teacher-<scale>.yaml` names, or the pre-training
    stage's when the task has one (the teacher starts from it). Students are checked against its shape (depth,
    heads, widths) before it is trained. {} when it exists, or when its shape cannot be told offline."""
    from pathlib import Path

    hf = Path(teacher_dir) / "hf"
    if hf.exists():
        return {}
    stages = [Path("experiments") / task / f"{stage}-{scale}.yaml" for stage in ("pretrain", "teacher")]
    stage = next((path for path in stages if path.is_file()), None)
    try:
        model = _config_setting(read_composed(stage), "model", "model") if stage else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError, UserError):
        model = None
    config = _model_config(str(model)) if model else None
    return {hf: config} if config is not None else {}


def _model_config(name: str):
    """The transformers config of a preset, of a Hub id that is one's shape (facebook/bart-base), or of a local
    model directory; None otherwise."""
    from pathlib import Path

    from dq_lightning.models.presets import PRESETS, build_config

    preset = name if name in PRESETS else name.rpartition("/")[2]
    if preset in PRESETS:
        return build_config(preset)
    if (Path(name).expanduser() / "config.json").is_file():
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(Path(name).expanduser()), local_files_only=True)
    return None
