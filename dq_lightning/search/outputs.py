"""What a search leaves in its folder: search.csv (every candidate), best.json (the map to use) and
fitness.png (best and mean fitness per generation), each written atomically."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from dq_lightning.files import write_json_atomic, write_text_atomic
from dq_lightning.search.fitness import Fitness
from dq_lightning.search.genome import Genome

COLUMNS = ["generation", "slot", "encoder_map", "decoder_map", "fitness", "label_loyalty", "prob_loyalty",
           "task_loss", "loss", "seconds", "trained", "hand_made", "error"]


def record(generation: int, slot: int, genome: Genome, fitness: Fitness, trained: bool,
           hand_made: list[str]) -> dict[str, Any]:
    """A row of search.csv; `seconds` is this row's training time (0 when the fitness came from the cache)."""
    return {"generation": generation, "slot": slot, "encoder_map": list(genome[0]), "decoder_map": list(genome[1]),
            "fitness": fitness.value, "label_loyalty": fitness.label_loyalty, "prob_loyalty": fitness.prob_loyalty,
            "task_loss": fitness.task_loss, "loss": fitness.loss, "seconds": round(fitness.seconds, 2) if trained
            else 0.0, "trained": trained, "hand_made": "+".join(hand_made), "error": fitness.error}


def _fitness(row: dict[str, Any]) -> Fitness:
    return Fitness(row["label_loyalty"], row["prob_loyalty"], row["task_loss"], row["loss"], row["seconds"],
                   row["error"])


def _genome(row: dict[str, Any]) -> Genome:
    return tuple(row["encoder_map"]), tuple(row["decoder_map"])


def write_csv(out_dir: Path, records: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    for row in records:
        writer.writerow({name: json.dumps(value) if isinstance(value, list) else "" if value is None else value
                         for name, value in row.items()})
    write_text_atomic(Path(out_dir) / "search.csv", buffer.getvalue())


def per_generation(records: list[dict[str, Any]]) -> list[tuple[int, float | None, float | None]]:
    """(generation, best fitness, mean fitness) of each generation with rows; failed fits are left out."""
    summary = []
    for generation in sorted({row["generation"] for row in records}):
        values = [row["fitness"] for row in records if row["generation"] == generation and row["fitness"] is not None]
        summary.append((generation, max(values) if values else None,
                        sum(values) / len(values) if values else None))
    return summary


def best_row(records: list[dict[str, Any]], only_hand_made: bool = False) -> dict[str, Any] | None:
    """The best candidate so far (the first of equals, in search order)."""
    rows = [row for row in records if row["hand_made"] or not only_hand_made]
    return max(rows, key=lambda row: _fitness(row).rank()) if rows else None


def _maps(row: dict[str, Any]) -> dict[str, Any]:
    return {"encoder_layer_map": row["encoder_map"], "decoder_layer_map": row["decoder_map"],
            "fitness": row["fitness"], "task_loss": row["task_loss"], "hand_made": row["hand_made"]}


def write_best(out_dir: Path, records: list[dict[str, Any]], settings: dict[str, Any], config: str) -> dict:
    """best.json: the best maps, the flags that train them, and the best hand-made map beside it."""
    best, hand_made = best_row(records), best_row(records, only_hand_made=True)
    flags = " ".join(f"--model.shape.{name}={json.dumps(best[key], separators=(',', ':'))}"
                     for name, key in (("encoder_layer_map", "encoder_map"), ("decoder_layer_map", "decoder_map")))
    unsorted = {"model.shape.unsorted_layer_maps": {"value": True}} if settings.get("allow_unsorted") else {}
    if unsorted:
        flags += " --model.shape.unsorted_layer_maps=true"
    result = {**_maps(best), "label_loyalty": best["label_loyalty"], "prob_loyalty": best["prob_loyalty"],
              "fit_flags": flags,
              "fit_command": f"python -m dq_lightning fit --config {config} --model.bits={settings['bits']} "
                             f"--model.depth={settings['depth']} {flags}",
              "sweep_parameters": {"model.shape.encoder_layer_map": {"value": best["encoder_map"]},
                                   "model.shape.decoder_layer_map": {"value": best["decoder_map"]}, **unsorted},
              "best_hand_made": _maps(hand_made) if hand_made else None,
              "generations_done": len({row["generation"] for row in records}),
              "candidates_trained": sum(1 for row in records if row["trained"]), "settings": settings}
    write_json_atomic(Path(out_dir) / "best.json", result)
    return result


def plot_fitness(out_dir: Path, records: list[dict[str, Any]], title: str) -> Path:
    """fitness.png in the style of the sweep's trade-off plot (dq_lightning.sweep.report)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = [line for line in per_generation(records) if line[1] is not None]
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    generations = [line[0] for line in summary]
    ax.plot(generations, [line[1] for line in summary], "o-", color="tab:blue", label="best", zorder=3)
    ax.plot(generations, [line[2] for line in summary], "s--", color="tab:orange", label="mean", zorder=2)
    hand_made = best_row(records, only_hand_made=True)
    if hand_made is not None and hand_made["fitness"] is not None:
        ax.axhline(hand_made["fitness"], color="tab:green", alpha=0.7, linestyle=":",
                   label=f"best hand-made map ({hand_made['hand_made']})")
    ax.set_xlabel("generation (0: the hand-made maps and random ones)")
    ax.set_ylabel("fitness: validation label loyalty to the teacher")
    ax.set_xticks(generations)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = Path(out_dir) / "fitness.png"
    staging = path.with_name(f".{path.stem}.{os.getpid()}.png")  # renamed over the plot: never half a file
    try:
        fig.savefig(staging, format="png")
        os.replace(staging, path)
    finally:
        plt.close(fig)
        staging.unlink(missing_ok=True)
    return path
