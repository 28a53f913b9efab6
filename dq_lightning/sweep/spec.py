"""W&B sweep files: reading, validating, expanding the grid locally, and building each run's command.

The files are in W&B's own format, so `wandb sweep sweeps/<task>.yaml` works as it is. Offline, the same
file is expanded here: a grid is the Cartesian product of the parameters' values in file order (what
W&B's grid search enumerates; W&B's local `sweeps` package is not used because it pins numpy<2), and
each point's flags are formatted by W&B's own agent code, so an offline run gets exactly the command line
an agent would give it.
"""

from __future__ import annotations

import itertools
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dq_lightning.errors import UserError

SUPPORTED_LOCAL_METHODS = ("grid",)
# A sweep parameter that repeats every grid point over seeds (LightningCLI's own flag); the report
# aggregates a point's seeds, and their W&B runs share a group.
SEED_PARAMETER = "seed_everything"
_ENVVAR = re.compile(r"\$\{envvar:([A-Z0-9_]*)\}")


@dataclass(frozen=True)
class SweepPoint:
    """One run of the grid: its parameter values, a readable id, and its command-line flags."""

    params: dict[str, Any]
    run_id: str
    flags: list[str]


def load_sweep(path: str | Path) -> dict:
    """Read and validate a sweep file; every mistake is one `UserError` naming the file (and line, for YAML)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such sweep file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a sweep file (give a .yaml file such as sweeps/demo-tiny.yaml)")
    try:
        sweep = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as error:
        mark, context = error.problem_mark or error.context_mark, error.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = error.problem or error.context or "syntax error"
        if error.context and error.problem:  # e.g. an unclosed [ : say where it was opened
            problem += f"; {error.context}" + (f" started on line {context.line + 1}" if context else "")
        raise UserError(f"{where}: not valid YAML ({problem})") from None
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise UserError(f"{path}: cannot read it ({error.strerror or error})") from None
    if not isinstance(sweep, dict):
        raise UserError(f"{path}: a sweep file is a mapping with method, metric, parameters and command")
    for key in ("method", "metric", "parameters", "command"):
        if key not in sweep:
            raise UserError(f"{path}: missing key {key!r}")
    if not isinstance(sweep["metric"], dict) or "name" not in sweep["metric"]:
        raise UserError(f"{path}: metric needs a name (the validation metric key as logged, e.g. val/rougeL)")
    parameters = sweep["parameters"]
    if not isinstance(parameters, dict) or not parameters:
        got = "empty" if isinstance(parameters, dict) or parameters is None else f"a {type(parameters).__name__}"
        raise UserError(f"{path}: parameters must be a mapping of names to {{values: [...]}} or {{value: ...}}, "
                        f"e.g. 'model.bits: {{values: [8-8-8, 2-2-8]}}' (it is {got})")
    for name, spec in parameters.items():
        if not isinstance(spec, dict) or not ("values" in spec or "value" in spec):
            raise UserError(f"{path}: parameter {name!r} needs 'values' (a list) or 'value'")
        if "values" in spec and (not isinstance(spec["values"], list) or not spec["values"]):
            raise UserError(f"{path}: parameter {name!r}: 'values' must be a non-empty list")
    seeds = parameters.get(SEED_PARAMETER)
    if seeds is not None:
        values = seeds["values"] if "values" in seeds else [seeds["value"]]
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"{path}: parameter {SEED_PARAMETER!r}: seeds must be integers, got {value!r}")
    if not isinstance(sweep["command"], list):
        raise UserError(f"{path}: command must be a list (one item per argument, as in sweeps/demo-tiny.yaml)")
    if "${args}" not in sweep["command"]:
        raise UserError(f"{path}: command must contain ${{args}} (where the parameters go)")
    return sweep


def format_flags(params: dict[str, Any]) -> list[str]:
    """`--key=value` flags exactly as a W&B agent formats them."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    return create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})["args"]


def run_id_of(params: dict[str, Any]) -> str:
    """A readable, filesystem-safe id: the parameter values in file order ("dq_2-2-8_6-3")."""
    text = "_".join(str(value) for value in params.values())
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text.replace(" ", "")).strip("-") or "run"


def expand_grid(sweep: dict, path: str | Path = "sweep") -> list[SweepPoint]:
    if sweep["method"] not in SUPPORTED_LOCAL_METHODS:
        raise UserError(f"{path}: method {sweep['method']!r} cannot run offline; local sweeps support "
                        f"{', '.join(SUPPORTED_LOCAL_METHODS)} (W&B online supports all)")
    names = list(sweep["parameters"])
    choices = [spec["values"] if "values" in spec else [spec["value"]] for spec in sweep["parameters"].values()]
    points, seen = [], {}
    for values in itertools.product(*choices):
        params = dict(zip(names, values))
        run_id = run_id_of(params)
        if run_id in seen:
            raise UserError(f"{path}: grid points {seen[run_id]} and {params} have the same run id {run_id!r}")
        seen[run_id] = params
        points.append(SweepPoint(params, run_id, format_flags(params)))
    return points


def command_for(sweep: dict, flags: list[str], python: str = sys.executable) -> list[str]:
    """The sweep's `command` with W&B's macros filled in for a local run (`python` is this interpreter)."""
    command = []
    for item in sweep["command"]:
        item = str(item)
        if item == "${env}":
            continue
        if item in ("${interpreter}", "python", "python3"):
            command.append(python)
        elif item == "${args}":
            command.extend(flags)
        elif item == "${program}":
            command.append(str(sweep.get("program", "")))
        elif item.startswith("${") and item.endswith("}") and not _ENVVAR.search(item):
            raise UserError(f"sweep command macro {item} is not supported offline")
        else:
            command.append(_ENVVAR.sub(lambda m: __import__("os").environ.get(m.group(1), ""), item))
    return command


SCALES = ("tiny", "paper")  # tiny: the CPU grids (sweeps/<task>-tiny.yaml); paper: sweeps/<task>.yaml


def sweep_file(task: str, scale: str) -> Path:
    return Path("sweeps") / (f"{task}.yaml" if scale == "paper" else f"{task}-{scale}.yaml")


def sweep_dir_of(runs: Path, task: str, scale: str) -> Path:
    return runs / task / ("sweep" if scale == "tiny" else f"sweep-{scale}")
