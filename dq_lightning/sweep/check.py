"""What a sweep checks before it trains anything: the data, the GPUs, and every point of its grid.

A sweep that meets a typo'd value at its 30th point has spent the 29 runs before it, and one that asks for GPUs
the machine lacks fails every run; so both are found before the first run starts. `preflight_*` needs no
Lightning and no teacher (`make sweep` runs it before training the teacher); `check_points` parses every grid
point with the LightningCLI its run uses, with the flags its run gets, and builds (never fits) its model, data
and trainer, writing nothing.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from urllib.parse import urlparse

import yaml

from dq_lightning.config_files import read_composed
from dq_lightning.errors import UserError
from dq_lightning.sweep.spec import SweepPoint, command_for
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


def _flag_value(args: Sequence[str], *names: str) -> str | None:
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
    config = _flag_value(command, "--config")
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
    given = (_flag_value(command, "--data.data_dir", "--data.init_args.data_dir")
             or _config_setting(config, "data", "data_dir")
             or any(name in ("data.data_dir", "data.init_args.data_dir") for name in sweep["parameters"]))
    cache_dir = (_flag_value(command, "--data.cache_dir", "--data.init_args.cache_dir")
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
    accelerator = _flag_value(command, "--trainer.accelerator")
    devices = _flag_value(command, "--trainer.devices") or _config_setting(config, "trainer", "devices")
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


# -- every grid point ---------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """Capture what building a point prints, at the file-descriptor level too: Lightning's log handlers hold
    the original streams, and 50 points' "GPU available" lines would bury the one line that matters. The
    Python-level text (the parser's error) is the StringIO yielded."""
    text = io.StringIO()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                yield text
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


class GridWide(UserError):
    """A mistake that every point shares (a flag the config lacks, GPUs from the command): reported at once."""


class ParseRejected(UserError):
    """The parser refused a point's command line, in one line of its own."""


def _worded_parse_failure(message: str, point: SweepPoint, config: str) -> UserError:
    """A parser's own one-line complaint: a parameter it names as an unknown option is the grid's mistake."""
    unknown = re.search(r"has no option|[Uu]nrecognized|not accepted|no such option", message)
    culprit = next((name for name in point.params if re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", message)),
                   None)
    if unknown and culprit:
        return GridWide(f"unknown parameter {culprit!r}: {config} has no such option ({message})")
    if unknown:
        return GridWide(f"the sweep command is not accepted by {config}: {message}")
    return UserError(message)


def _parse_failure(text: str, point: SweepPoint, fixed: list[str], config: str) -> UserError:
    """The parser's complaint about a point (pages of usage and union subtypes), as one line naming the
    parameter or flag at fault."""
    names = list(point.params)
    rejected = (re.search(r"Option '([^']+)' is not accepted", text)
                or re.search(r"[Uu]nrecognized arguments:\s*(\S+)", text))
    if rejected:
        option = rejected.group(1).lstrip("-").split("=")[0]
        culprit = next((name for name in names if name == option or name.split(".")[-1] == option), None)
        if culprit:
            return GridWide(f"unknown parameter {culprit!r}: {config} has no such option")
        flag = next((token for token in fixed if str(token).lstrip("-").split("=")[0].endswith(option)), option)
        return GridWide(f"the sweep command's flag {flag} is not accepted: {config} has no such option")
    # `Parser key "model": ... Parser key "lr": Expected a <class 'float'>. Got value: abc` -> model.lr
    keys = re.findall(r'Parser key "([^"]+)"', text)
    key = ".".join(keys[:1] + [k for k in keys[1:] if k != keys[0]]) if keys else ""
    expected = re.search(r"Expected a <class '([^']+)'>", text)
    culprit = next((name for name in names if key and name.replace(".init_args.", ".") == key), None)
    if culprit is None and key:
        culprit = next((name for name in names if name.split(".")[-1] == key.split(".")[-1]), None)
    error_line = next((line.strip() for line in text.splitlines() if line.startswith("error:")), "")
    reason = f"expected a {expected.group(1)}" if expected else error_line.removeprefix("error: ")
    if culprit:
        return UserError(f"parameter {culprit}={point.params[culprit]!r} is not accepted by {config} ({reason})")
    setting = key or "a setting"
    return UserError(f"{setting} is not accepted by {config} ({reason})")


def _params_text(point: SweepPoint) -> str:
    return ", ".join(f"{name}={value}" for name, value in point.params.items())


def check_points(sweep: dict, path, points: list[SweepPoint], extra: Sequence[str] = (), instantiate: bool = True,
                 run_commands: Callable[[SweepPoint], dict] | None = None, splits: dict[str, str] | None = None
                 ) -> dict[str, str]:
    """Check every point of the grid as its runs will meet it; return each run id's module class path.

    `run_commands(point)` gives each command the sweep runs for the point ({stage: its arguments after
    `python -m dq_lightning`, from the stage on}), exactly as it will run them, with the flags the sweep adds
    itself (run folder, W&B names) and `extra` (--data-dir, --gpus); by default the fit of the sweep command
    with `extra`. Each is parsed, the data splits it reads (`splits`: split -> what reads it) are checked,
    and with `instantiate` the fit's model, data and trainer are built: a typo'd
    value, an unknown flag or parameter, a value of the wrong type, a flag that makes every run fail, a
    missing split, a teacher that cannot be read or GPUs this machine lacks stop the sweep here, naming the
    point and the parameter. The teacher is read once for all points. Without `instantiate`, points are
    only parsed.
    """
    from dq_lightning.distill.student import each_teacher_loaded_once  # one read of the teacher for every point
    from dq_lightning.sweep.check_cli import CheckCLI  # imports Lightning, which reading the sweep file does not need

    command = command_for(sweep, [])
    if "fit" not in command:
        raise UserError(f"{path}: the sweep command must run `python -m dq_lightning fit` (it has no fit)")
    start = command.index("fit") + 1
    fixed = command[start:]
    config = _flag_value(fixed, "--config") or "the sweep command"
    if config != "the sweep command" and not os.path.isfile(config):
        raise UserError(f"{path}: the sweep command's --config {config}: no such file")
    if run_commands is None:
        def run_commands(point: SweepPoint) -> dict[str, list[str]]:
            return {"fit": ["fit", *command_for(sweep, point.flags)[start:], *extra]}
    failures: dict[str, tuple[SweepPoint, UserError]] = {}  # by reason: a typo fails many points alike
    classes, rejected = {}, 0
    with tempfile.TemporaryDirectory(prefix="dq-sweep-check-") as scratch, each_teacher_loaded_once():
        # The run's logger would create the run's own directory; the check builds it in a scratch root.
        root = [f"--trainer.default_root_dir={scratch}"]
        with _quiet():
            cli = CheckCLI.build_once(instantiate)
        for point in points:
            failure = None
            for stage, argv in run_commands(point).items():
                bare = [stage, *command_for(sweep, point.flags)[start:], *extra]
                failure = _check_run(cli, argv, root, bare, point, fixed, config, extra, splits,
                                     build=instantiate and stage == "fit", classes=classes)
                if failure is not None:
                    break
            if failure is None:
                continue
            if isinstance(failure, GridWide):
                raise UserError(f"{path}: {failure}")
            rejected += 1
            failures.setdefault(str(failure), (point, failure))
    if rejected == len(points) > 1 and len(failures) == 1:  # e.g. a teacher that is not there yet
        raise UserError(f"{path}: every grid point is rejected: {next(iter(failures))}")
    if rejected:
        named = [f"grid point {point.run_id} ({_params_text(point)}): {failure}"
                 for point, failure in list(failures.values())[:3]]
        more = f"; and {len(failures) - 3} more reasons" if len(failures) > 3 else ""
        count = "" if rejected == 1 else f"{rejected} of {len(points)} grid points are rejected before any run starts: "
        raise UserError(f"{path}: {count}{'; '.join(named)}{more}")
    return classes


def _check_run(cli, argv: list[str], root: list[str], bare: list[str], point: SweepPoint, fixed: list[str],
               config: str, extra: Sequence[str], splits: dict[str, str] | None, build: bool,
               classes: dict[str, str]) -> UserError | None:
    """The one-line complaint about one run of a point (None when it passes); `root` puts what the check
    builds in a scratch folder. A run refused only for the flags the sweep adds itself (`argv` minus `bare`)
    is refused for a flag of the sweep command that they conflict with, at every point alike."""
    from dq_lightning.errors import find_user_error

    stage = argv[0]
    with _quiet() as text:
        try:
            model_class = cli.build([*argv, *root], *_gpu_culprits(argv, point, extra, config), build_classes=build,
                                    splits=splits)
            if stage == "fit":
                classes[point.run_id] = model_class
            return None
        except SystemExit:
            failure = _parse_failure(text.getvalue(), point, fixed, config)
        except ParseRejected as error:
            failure = _worded_parse_failure(str(error), point, config)
        except Exception as error:  # noqa: BLE001 - user errors are reported, bugs re-raised
            failure = find_user_error(error)
            if failure is None:
                raise  # a bug, not the user's input: it keeps its traceback
            return failure  # parsed, then refused while built: the point's own settings
    added = [token for token in argv[len(bare):] if not token.startswith("--trainer.default_root_dir=")]
    if added and argv[:len(bare)] == bare and _parses(cli, [*bare, *root]):
        return GridWide(f"every run's {stage} command gets {' '.join(added)} from the sweep (its run folder and "
                        f"W&B names), which {config} with the sweep command's flags refuses ({failure}): a flag of "
                        f"the sweep command conflicts with them (e.g. --trainer.logger=false: drop it; without a "
                        f"W&B login the runs log offline)")
    return failure


def _parses(cli, argv: list[str]) -> bool:
    with _quiet():
        try:
            cli.build(argv, "", "", build_classes=False, splits={})
            return True
        except (SystemExit, Exception):  # noqa: BLE001 - only whether it parses is asked
            return False


def _gpu_culprits(argv: list[str], point: SweepPoint, extra: Sequence[str], config: str) -> tuple[str, str]:
    """Which settings ask for this point's accelerator and its devices: the last flag wins, as in the CLI."""

    def source(name: str) -> str:
        flag = next((token for token in reversed(argv) if str(token).startswith(f"--trainer.{name}")), None)
        if flag is None:
            return f"{config} (trainer.{name})"
        if flag in point.flags:
            return f"parameter {flag.lstrip('-')}"
        if flag in extra:
            gpus = _flag_value(list(extra), "--trainer.devices")
            return f"--gpus {gpus} (make: GPUS={gpus})"
        return f"the sweep command's {flag}"

    return source("accelerator"), source("devices")
