"""`python -m dq_lightning search-map`: search which teacher layers a shallow DQ student copies.

    python -m dq_lightning search-map --config experiments/xsum/dq-tiny.yaml --depth 6-3 --bits 2-2-8 \
        --data-dir ../shared/data/xsum

Results go to `runs/<task>/search-map/<bits>_<depth>/` (or `--out`): search.csv, best.json, fitness.png and
the resumable `search_state.json`. The same command again continues a killed search where it stopped; with
other settings it is refused unless `--restart` is given.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from dq_lightning.errors import command_line
from dq_lightning.search.settings import SearchSettings
from dq_lightning.search.state import RESTART_FLAG

DEFAULTS = SearchSettings.__dataclass_fields__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dq_lightning search-map",
        description="Genetic search of the teacher layers a shallow DQ student copies (Jiao et al. 2020): each "
                    "candidate map is scored by a short DQ fit (validation label loyalty to the teacher).")
    parser.add_argument("--config", required=True, help="the task's DQ config, e.g. experiments/xsum/dq-tiny.yaml")
    parser.add_argument("--depth", required=True, help="student encoder-decoder layers, e.g. 6-3")
    parser.add_argument("--bits", required=True, help="student W-E-A bits, e.g. 2-2-8")
    parser.add_argument("--data-dir", help="local {train,validation,test}.jsonl (as --data.data_dir)")
    for name in ("population", "generations", "steps", "tournament", "elite", "seed"):
        parser.add_argument(f"--{name}", type=int, default=DEFAULTS[name].default,
                            help=f"default {DEFAULTS[name].default}")
    for name in ("crossover_rate", "mutation_rate"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=DEFAULTS[name].default,
                            help=f"default {DEFAULTS[name].default}")
    parser.add_argument("--allow-unsorted", action="store_true",
                        help="maps may list distinct teacher layers in any order (default: strictly increasing)")
    parser.add_argument("--supernet", metavar="RUN_OR_CKPT",
                        help="score each map from this trained supernet (its run folder or a checkpoint: one "
                             "validation pass of the map's sub-network) instead of a short fit; --steps is unused")
    parser.add_argument("--out", help="output folder (default: runs/<task>/search-map/<bits>_<depth>)")
    parser.add_argument("--preflight", action="store_true",
                        help="only check the flags, then exit (the depth against the teacher only once it exists); "
                             "make search-map runs it before training a missing teacher")
    parser.add_argument(RESTART_FLAG, action="store_true",
                        help="start over in a folder holding another search's state (default: continue it, or "
                             "refuse when its settings differ)")
    return parser


def settings_of(args: argparse.Namespace, teacher_layers: tuple[int, int]) -> SearchSettings:
    return SearchSettings(depth=args.depth, bits=args.bits, teacher_layers=teacher_layers,
                          population=args.population, generations=args.generations, steps=args.steps,
                          tournament=args.tournament, crossover_rate=args.crossover_rate,
                          mutation_rate=args.mutation_rate, elite=args.elite, seed=args.seed,
                          allow_unsorted=args.allow_unsorted)


_ANY_DEPTH = 1_000


def supernet_checkpoint(path: str) -> str:
    """`--supernet`: a supernet run folder's last checkpoint, or the checkpoint given."""
    from dq_lightning.errors import UserError

    given = Path(path).expanduser()
    checkpoint = given / "checkpoints" / "last.ckpt" if given.is_dir() else given
    if not checkpoint.is_file():
        raise UserError(f"--supernet {path}: {'no checkpoints/last.ckpt in that folder' if given.is_dir() else 'no such file'}")
    return str(checkpoint)


@command_line
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.preflight:
        # Any depth fits this stand-in teacher: what can be told without one (format, bits, GA settings).
        settings_of(args, (_ANY_DEPTH, _ANY_DEPTH))
        print("search-map: flags checked", flush=True)
        return 0
    from dq_lightning.distill.student import each_teacher_loaded_once, load_teacher
    from dq_lightning.search.fitness import DQFitness, SupernetFitness
    from dq_lightning.search.run_config import read_run_config
    from dq_lightning.search.search import prepare, run_search

    import lightning.pytorch  # noqa: F401 - sets its loggers' level when imported; quietened after that

    # Each candidate's two Trainers would print their device and tip lines: the search reports its own progress.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    run = read_run_config(args.config, args.data_dir)
    with each_teacher_loaded_once():  # read once here, shared by every candidate
        teacher = load_teacher(run.teacher).config
        settings = settings_of(args, (teacher.encoder_layers, teacher.decoder_layers))
        name = f"{settings.bits}_{settings.depth}"
        out_dir = Path(args.out or Path("runs") / run.task / "search-map" / name)
        identity = {**settings.as_dict(), "config": args.config, "data_dir": args.data_dir, "teacher": run.teacher,
                    **({"supernet": args.supernet} if args.supernet else {})}
        prepare(out_dir, settings, identity, args.restart)  # a state of another search: refused before any write
        group = f"search-map-{run.task}-{name}"
        fitness = DQFitness(run, settings, out_dir, group) if not args.supernet else \
            SupernetFitness(run, settings, out_dir, group, supernet_checkpoint(args.supernet))
        print(f"search-map: {settings.space.size()} valid maps, at most {settings.max_candidates} candidates "
              f"trained ({settings.steps} steps each); results in {out_dir}", flush=True)
        run_search(settings, fitness, out_dir, identity, restart=args.restart,
                   title=f"{run.task} {settings.bits} {settings.depth}: layer-map search",
                   say=lambda text: print(text, flush=True))
    best = json.loads((out_dir / "best.json").read_text())
    print(f"best map (fitness {best['fitness']}, {out_dir / 'best.json'}): {best['fit_flags']}")
    return 0
