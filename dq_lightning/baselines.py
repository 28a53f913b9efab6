"""`python -m dq_lightning baseline`: trivial baselines scored like the models, next to a trained teacher.

A teacher that does not beat copying the first sentence of its input has not learned the task; this tool
puts the two side by side (what `make teacher` prints at the end).

- lead-1 (summarization: xsum, cnn_dailymail, demo): the first sentence of the source. For `demo` the source
  starts with the object's qualified name, which is not a sentence of the docstring, so the name is dropped.
- lead-3 (cnn_dailymail, whose highlights are several sentences).
- copy (translation, eli5): the source itself.
- constant (eli5): one answer for every question, no retrieval: of the first 50 training answers, the one with
  the best mean ROUGE-L against the next 100 (the training split's most typical answer; it never sees the
  split it is scored on).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dq_lightning.data.jsonl import check_jsonl, get_field, read_records
from dq_lightning.data.tasks import get_task
from dq_lightning.errors import UserError, command_line
from dq_lightning.metrics import GenerationMetrics, split_sentences


CONSTANT_CANDIDATES, CONSTANT_JUDGES = 50, 100


def constant_output(train_targets: list[str]) -> str:
    """The training target with the best mean ROUGE-L against later training targets (see the module doc)."""
    from torchmetrics.functional.text import rouge_score

    candidates = train_targets[:CONSTANT_CANDIDATES]
    judges = train_targets[CONSTANT_CANDIDATES:CONSTANT_CANDIDATES + CONSTANT_JUDGES] or candidates
    scores = [float(rouge_score([candidate] * len(judges), judges, rouge_keys="rougeL")["rougeL_fmeasure"])
              for candidate in candidates]
    return candidates[max(range(len(candidates)), key=scores.__getitem__)]


def baseline_outputs(task_name: str, sources: list[str], kind: str, constant: str | None = None) -> list[str]:
    if kind == "constant":
        return [constant or ""] * len(sources)
    if task_name == "demo":
        sources = [source.split(". ", 1)[1] if ". " in source else source for source in sources]
    if kind == "copy":
        return sources
    count = {"lead-1": 1, "lead-3": 3}[kind]
    return [" ".join(split_sentences(source)[:count]) for source in sources]


def default_baselines(task_name: str) -> list[str]:
    return {"cnn_dailymail": ["lead-1", "lead-3"], "wmt16_en_ro": ["copy"], "eli5": ["lead-1", "copy", "constant"]}.get(
        task_name, ["lead-1"])


def score(task_name: str, predictions: list[str], references: list[str]) -> dict[str, float]:
    metrics = GenerationMetrics(translation=get_task(task_name).is_translation)
    metrics.update(predictions, references, torch.tensor([len(p.split()) for p in predictions]))
    return {key: float(value) for key, value in metrics.compute().items()}


def read_split(task_name: str, data_dir: Path, split: str) -> tuple[list[str], list[str]]:
    task = get_task(task_name)
    path = data_dir / f"{split}.jsonl"
    if not path.exists():
        raise UserError(f"--data-dir {data_dir}: missing {split}.jsonl")
    check_jsonl(path, (task.source_column, task.target_column))  # file and line for any unreadable row
    # read_records splits at "\n" only: str.splitlines would also split rows inside their U+2028 or U+0085.
    rows = [row for _, row in read_records(path)]
    return ([get_field(row, task.source_column) for row in rows], [get_field(row, task.target_column) for row in rows])


def _metrics_file(run: Path, stage: str) -> Path:
    return run / ("fit_metrics.json" if stage == "val" else "test_metrics.json")


def _check_run(run: Path, stage: str) -> None:
    """`--run` must be a run folder holding the metrics of `stage`: a typo'd path or an unfinished run would
    print the baselines alone, as if no teacher had been asked for."""
    if not run.is_dir():
        raise UserError(f"--run {run}: no such directory")
    path = _metrics_file(run, stage)
    what = "a finished fit" if stage == "val" else "a test (python -m dq_lightning test)"
    if not path.is_file():
        raise UserError(f"--run {run}: no {path.name} ({what} writes it), so there are no {stage} metrics to "
                        "compare with the baselines")
    if not _teacher_scores(run, stage):
        raise UserError(f"--run {run}: {path.name} holds no {stage}/ metrics")


def _teacher_scores(run: Path, stage: str) -> dict[str, float]:
    """The teacher run's `stage` metrics without their prefix (`val/rougeL` -> `rougeL`); {} if none."""
    try:
        metrics = json.loads(_metrics_file(run, stage).read_text()).get("metrics", {})
    except (OSError, ValueError, AttributeError) as error:
        raise UserError(f"--run {run}: {_metrics_file(run, stage).name} is unreadable ({error})") from None
    return {key.split("/", 1)[1]: value for key, value in metrics.items() if key.startswith(f"{stage}/")}


@command_line
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m dq_lightning baseline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True)
    parser.add_argument("--data-dir", help="local jsonl splits (default for demo: the generated corpus)")
    parser.add_argument("--split", default="validation", choices=["validation", "test"])
    parser.add_argument("--run", help="a teacher run directory (fit_metrics.json / test_metrics.json) to compare")
    parser.add_argument("--max-samples", type=int, help="score only the first N rows (as data.max_eval_samples)")
    args = parser.parse_args(argv)
    task = get_task(args.task)
    if args.max_samples is not None and args.max_samples < 1:
        raise UserError(f"--max-samples {args.max_samples}: must be a positive number of rows; leave it out for all")
    run = Path(args.run) if args.run is not None else None
    stage = "val" if args.split == "validation" else "test"
    if run is not None:
        _check_run(run, stage)
    if args.data_dir:
        data_dir = Path(args.data_dir)
    elif args.task == "demo":
        from dq_lightning.data.datamodule import DemoDataModule

        data_dir = DemoDataModule().local_data_dir()
    else:
        raise UserError("--data-dir is required for this task (local {train,validation,test}.jsonl)")
    sources, references = read_split(args.task, data_dir, args.split)
    if args.max_samples is not None:
        sources, references = sources[:args.max_samples], references[:args.max_samples]
    metric = task.metric
    kinds = default_baselines(args.task)
    constant = constant_output(read_split(args.task, data_dir, "train")[1]) if "constant" in kinds else None
    rows = [(kind, score(args.task, baseline_outputs(args.task, sources, kind, constant), references))
            for kind in kinds]
    if run is not None:
        rows.insert(0, ("teacher", _teacher_scores(run, stage)))
    keys = ["bleu"] if task.is_translation else ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    keys += ["gen_len", "distinct"]
    print(f"{args.task} {args.split} split ({len(references)} rows)")
    print(f"{'':<10}" + "".join(f"{k:>11}" for k in keys))
    for name, scores in rows:
        print(f"{name:<10}" + "".join(f"{scores.get(k, float('nan')):>11.2f}" for k in keys))
    if run is not None:
        best_baseline = max(scores.get(metric, 0.0) for name, scores in rows[1:])
        teacher = rows[0][1].get(metric, 0.0)
        verdict = "beats" if teacher >= best_baseline else "does NOT beat"
        print(f"teacher {metric} {teacher:.2f} {verdict} the best trivial baseline ({best_baseline:.2f}); "
              f"distinct outputs {rows[0][1].get('distinct', float('nan')):.0f}%")
    return 0
