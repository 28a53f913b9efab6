"""Does a supernet rank layer maps as full fits do? Kendall tau between maps' supernet scores and full-fit scores.

    .venv/bin/python benchmarks/supernet_map_ranking.py --supernet runs/xsum/supernet-tiny --bits 2-2-8 --depth 3-1 \
        --data-dir ../shared/data/xsum --map "0,2,5/1=0.387" --map "0,2,5/5=0.324" --map "1,3,5/5=0.355" \
        --map "0,1,2/0=0.334" --map "3,4,5/5=0.315"

Each `--map ENCODER/DECODER=SCORE` is a map and the score a full fit of it reached (e.g. test label loyalty from
the README's search table); the supernet scores each map with `search-map --supernet`'s fitness (the map's
sub-network, one validation pass, validation label loyalty) and the script prints both and Kendall's tau-b.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def kendall_tau_b(xs: list[float], ys: list[float]) -> float:
    """Kendall's tau-b (ties in either ranking counted as neither agreeing nor disagreeing)."""
    concordant = discordant = ties_x = ties_y = 0
    for (x1, y1), (x2, y2) in itertools.combinations(zip(xs, ys), 2):
        dx, dy = x1 - x2, y1 - y2
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            ties_x += 1
        elif dy == 0:
            ties_y += 1
        elif dx * dy > 0:
            concordant += 1
        else:
            discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denominator if denominator else float("nan")


def parse_map(text: str) -> tuple[tuple[int, ...], tuple[int, ...], float]:
    maps, _, score = text.partition("=")
    encoder, _, decoder = maps.partition("/")
    return (tuple(int(i) for i in encoder.split(",")), tuple(int(i) for i in decoder.split(",")), float(score))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--supernet", required=True, help="a supernet run folder or checkpoint")
    parser.add_argument("--config", default="experiments/xsum/dq-tiny.yaml")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--bits", default="2-2-8")
    parser.add_argument("--depth", default="3-1")
    parser.add_argument("--map", action="append", required=True, help="ENCODER/DECODER=FULL_FIT_SCORE, e.g. 0,2,5/1=0.387")
    args = parser.parse_args()

    import logging

    import lightning.pytorch  # noqa: F401

    from dq_lightning.distill.student import load_teacher
    from dq_lightning.search.cli import supernet_checkpoint
    from dq_lightning.search.fitness import SupernetFitness
    from dq_lightning.search.run_config import read_run_config
    from dq_lightning.search.settings import SearchSettings

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    run = read_run_config(args.config, args.data_dir)
    maps = [parse_map(text) for text in args.map]
    teacher = load_teacher(run.teacher).config
    settings = SearchSettings(depth=args.depth, bits=args.bits,
                              teacher_layers=(teacher.encoder_layers, teacher.decoder_layers))
    fitness = SupernetFitness(run, settings, Path("/tmp/supernet_map_ranking"), "map-ranking",
                              supernet_checkpoint(args.supernet))
    supernet_scores, full_scores = [], []
    print("| encoder / decoder map | supernet score (val label loyalty) | full-fit score |")
    print("|---|---|---|")
    for encoder, decoder, full in maps:
        scored = fitness((encoder, decoder))
        supernet_scores.append(scored.value)
        full_scores.append(full)
        print(f"| {list(encoder)} / {list(decoder)} | {scored.value:.4f} | {full} |")
    print(f"\nKendall tau-b over {len(maps)} maps: {kendall_tau_b(supernet_scores, full_scores):+.3f}")


if __name__ == "__main__":
    main()
