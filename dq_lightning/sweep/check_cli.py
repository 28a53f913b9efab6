"""The sweep's check of every grid point: parsed with the LightningCLI its run uses, with the flags its run gets,
and its model, data and trainer built (never fitted), writing nothing. It sits above the command line
(`dq_lightning.cli`), which it reuses; the checks that need neither Lightning nor a teacher are in
`dq_lightning.sweep.check`."""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence

import lightning.pytorch as pl

from dq_lightning.cli import CLI_OPTIONS, DQLightningCLI, check_data_config
from dq_lightning.errors import UserError, first_line
from dq_lightning.sweep.check import check_gpus, flag_value
from dq_lightning.sweep.spec import SweepPoint, command_for


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

    command = command_for(sweep, [])
    if "fit" not in command:
        raise UserError(f"{path}: the sweep command must run `python -m dq_lightning fit` (it has no fit)")
    start = command.index("fit") + 1
    fixed = command[start:]
    config = flag_value(fixed, "--config") or "the sweep command"
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
            gpus = flag_value(list(extra), "--trainer.devices")
            return f"--gpus {gpus} (make: GPUS={gpus})"
        return f"the sweep command's {flag}"

    return source("accelerator"), source("devices")


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
