"""`python -m dq_lightning <command>`.

`fit`, `validate`, `test` and `predict` are the LightningCLI subcommands; the other commands are small
tools, each a module with a `main(argv) -> int`. Tools are imported lazily so that `size --help` does not
pay for importing Lightning and transformers.

`predict` is shared: with `--model DIR` (an exported or Hugging Face model directory) or the flags `--input`
/ `--int8`, and no `--config`, it runs the packed-model tool `dq_lightning.export.predict` (texts from a file
or stdin, one output line each); otherwise it is LightningCLI's `predict`. See `routes_here` there.
"""

from __future__ import annotations

import importlib
import sys

TOOLS = {
    "size": ("dq_lightning.size", "model size and compression ratio for a W-E-A setting and depth"),
    "baseline": ("dq_lightning.baselines", "trivial baselines (lead-1, ...) scored like the models, next to a teacher"),
    "sweep": ("dq_lightning.sweep.runner", "run a task's grid of DQ students and report the trade-off curve"),
    "export": ("dq_lightning.export.cli", "write a DQ student as a packed low-bit directory, an ONNX Runtime or a CTranslate2 model"),
    "search-map": ("dq_lightning.search.cli", "genetic search of the teacher layers a shallow DQ student copies"),
    "extract": ("dq_lightning.supernet.extract", "one point of a supernet as an ordinary DQ student checkpoint"),
    "report": ("dq_lightning.sweep.compare", "several sweeps' trade-off fronts on one chart (e.g. two recipes)"),
    "robustness": ("dq_lightning.evaluation.robustness", "score and stability on perturbed inputs, beside the teacher"),
    "memory": ("dq_lightning.memory", "estimated memory per GPU of the paper configs' fits (A100 40 / 80 GB)"),
}
PREDICT_TOOL = "dq_lightning.export.predict"
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def usage() -> str:
    lines = ["usage: python -m dq_lightning <command> [args]", "", "Lightning commands:"]
    lines += [f"  {name:<10} (LightningCLI; --help for its options)" for name in LIGHTNING_COMMANDS]
    lines += ["", "Tools:"]
    lines += [f"  {name:<10} {summary}" for name, (_, summary) in TOOLS.items()]
    lines += [f"  {'predict':<10} --model DIR: summarize/translate texts with an exported model "
              "(see predict --model DIR --help)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in TOOLS:
        module = importlib.import_module(TOOLS[command][0])
        return module.main(rest)
    if command == "predict":
        predict_tool = importlib.import_module(PREDICT_TOOL)
        if predict_tool.routes_here(rest):
            return predict_tool.main(rest)
    if command in LIGHTNING_COMMANDS or command.startswith("-"):
        from dq_lightning.cli import main as cli_main

        return cli_main(argv)
    print(f"error: unknown command {command!r}; choose from {', '.join([*LIGHTNING_COMMANDS, *TOOLS])}",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
