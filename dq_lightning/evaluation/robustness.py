"""`python -m dq_lightning robustness --run PATH`: how a compressed student holds up under perturbed inputs,
beside its teacher (Xu et al. 2021, "Beyond preserved accuracy: evaluating loyalty and robustness of BERT
compression").

    python -m dq_lightning robustness --run runs/xsum/dq-tiny --data-dir ../shared/data/xsum --rate 0.1

`--run` is a run directory (its `hf/` if it has one, as a teacher run does; else its best checkpoint, from
`fit_metrics.json`, else `checkpoints/last.ckpt`, exported to a scratch directory with the export code and
loaded back), a packed export or a Hugging Face model directory. The task (columns, metric, lengths) is the
one the model records (the manifest, `dq_lightning.json`; `--task` when it records none); the examples are
the task's `--split` of `--data-dir` (or the Hub), or a `--test-file`, read by the task's DataModule.

Every source is perturbed by `dq_lightning.evaluation.perturb` at `--rate` (the share of its words) with
`--seed`, and each model decodes the clean and the perturbed sources as `predict` does. Per model:
- `clean`, `perturbed`: the task's metric (ROUGE-L F1 or corpus BLEU, percent) against the references;
- `drop`: clean - perturbed;
- `stability`: ROUGE-L F1 (percent, whatever the task) of the model's perturbed outputs against its own clean
  outputs; a pair of identical outputs counts 100 (two empty outputs agree, though ROUGE scores them 0).
For the model under test when a teacher is known (`--teacher`, else the one the student's run records, when
it is there), on the perturbed sources:
- `label_loyalty`, `prob_loyalty`: `dq_lightning.distill.loyalty` under teacher forcing (the references as
  decoder input), in [0, 1] as the test logs them;
- `output_agreement`: ROUGE-L F1 (percent) of the model's perturbed outputs against the teacher's.

`--decode-cache DIR` keeps each model's outputs for a set of sources and decoding settings, keyed by its files
(path, size, modification time), so a sweep decodes its teacher once rather than once per student.

Results go to `<out>/robustness.json`, `robustness.csv` (a row per model) and `examples.jsonl` (each
example's perturbed source and outputs), default out `<run>/robustness/rate-<rate>/`; nothing else in the
run directory is touched, and nothing is written when an argument is refused.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dq_lightning.errors import UserError, command_line
from dq_lightning.evaluation.perturb import KINDS, check_rate, parse_kinds, perturb_texts
from dq_lightning.export.predict import add_decoding_flags, check_decoding_flags

MEASURES = ("clean", "perturbed", "drop", "stability", "label_loyalty", "prob_loyalty", "output_agreement")
CSV_COLUMNS = ("role", "path", "task", "split", "n", "rate", "seed", "kinds", "words_perturbed", "metric", *MEASURES)


@dataclass
class Subject:
    """A loaded model with what decoding it needs."""

    role: str
    path: str
    model: Any
    tokenizer: Any
    task: dict  # as `predict` takes it (languages, max_source_length)
    generation: Any
    max_source: int
    identity: dict | None = None  # the model's files, for the decode cache; None: never cached
    directory: Path | None = None  # where it was loaded from


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dq_lightning robustness",
        description="Score a model on clean and perturbed sources (typos, dropped and swapped words, changed "
                    "numbers), with its output stability and, beside a teacher, its loyalty on perturbed inputs. "
                    "Writes robustness.json and robustness.csv.")
    parser.add_argument("--run", required=True, metavar="PATH", help="a run directory (checkpoints/ or hf/), a "
                        "packed export or a Hugging Face model directory")
    parser.add_argument("--teacher", metavar="DIR", help="the teacher to compare with (default: the one the "
                        "student's run records, when it is there); also rebuilds a run's student")
    parser.add_argument("--rate", type=float, default=0.1, help="share of each source's words perturbed, in "
                        "[0, 1] (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the perturbations (default 0)")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated perturbation kinds among "
                        f"{','.join(KINDS)} (default: all)")
    parser.add_argument("--task", metavar="NAME", help="the task, when the model records none")
    parser.add_argument("--data-dir", metavar="DIR", help="folder of the task's {split}.jsonl (default: the Hub)")
    parser.add_argument("--split", default="test", help="split of --data-dir scored (default test)")
    parser.add_argument("--test-file", metavar="FILE", help="a JSON Lines file with the task's columns, scored "
                        "instead of --data-dir's split")
    parser.add_argument("--max-samples", type=int, metavar="N", help="score only the first N examples")
    parser.add_argument("--int8", action="store_true", help="run a packed student's quantized Linear layers as "
                        "int8 GEMMs")
    parser.add_argument("--out", metavar="DIR", help="where to write (default <run>/robustness/rate-<rate>)")
    parser.add_argument("--cache-dir", metavar="DIR", help="datasets' cache (default: the DataModules')")
    parser.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's)")
    parser.add_argument("--decode-cache", metavar="DIR", help="keep and reuse each model's outputs here (a "
                        "sweep's teacher is then decoded once for all its students)")
    add_decoding_flags(parser)
    return parser


def check_arguments(args: argparse.Namespace) -> tuple[str, ...]:
    """Refuse every bad flag before a model is loaded or a file written; returns the kinds."""
    check_rate(args.rate)
    kinds = parse_kinds(args.kinds)
    check_decoding_flags(args)
    for flag, value in (("--max-samples", args.max_samples), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value} must be a positive integer")
    if args.decode_cache is not None and Path(args.decode_cache).expanduser().is_file():
        raise UserError(f"--decode-cache {args.decode_cache}: exists and is not a directory")
    for flag, value in (("--run", args.run), ("--teacher", args.teacher), ("--data-dir", args.data_dir)):
        if value is not None and not Path(value).expanduser().is_dir():
            raise UserError(f"{flag} {value}: no such directory")
    if args.test_file is not None and not Path(args.test_file).expanduser().is_file():
        raise UserError(f"--test-file {args.test_file}: no such file")
    if args.data_dir is not None and args.test_file is None and \
            not (Path(args.data_dir).expanduser() / f"{args.split}.jsonl").is_file():
        raise UserError(f"--data-dir {args.data_dir}: no {args.split}.jsonl in it (--split {args.split})")
    out = out_dir(args)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    return kinds


def default_out_dir(run: str | Path, rate: float) -> Path:
    """Where a run's report at `rate` goes unless --out says otherwise (the sweep reads it back from there)."""
    return Path(run) / "robustness" / f"rate-{rate:g}"


def out_dir(args: argparse.Namespace) -> Path:
    return Path(args.out or default_out_dir(args.run, args.rate)).expanduser()


def run_checkpoint(run: Path) -> Path | None:
    """A run's best checkpoint (its `fit_metrics.json` names it), else `last.ckpt`, else its newest one."""
    from dq_lightning.files import read_json

    best = read_json(run / "fit_metrics.json").get("best_model_path")
    candidates = [Path(best), run / "checkpoints" / Path(best).name] if best else []
    candidates.append(run / "checkpoints" / "last.ckpt")
    found = next((path for path in candidates if path.is_file()), None)
    others = sorted((run / "checkpoints").glob("*.ckpt"), key=lambda path: path.stat().st_mtime)
    return found or (others[-1] if others else None)


def model_directory(run: Path, teacher: str | None, scratch: Path) -> tuple[Path, str]:
    """The directory `load_model` reads for `--run` (itself, its `hf/`, or its checkpoint exported to
    `scratch`) and what it holds, for the report."""
    from dq_lightning.export.checkpoint import NotQuantized
    from dq_lightning.export.export import export_full_precision_student, export_student
    from dq_lightning.export.manifest import MANIFEST

    if (run / MANIFEST).is_file() or (run / "config.json").is_file():
        return run, str(run)
    if (run / "hf" / "config.json").is_file():
        return run / "hf", str(run / "hf")
    checkpoint = run_checkpoint(run)
    if checkpoint is None:
        raise UserError(f"--run {run}: no model in it (no {MANIFEST}, no config.json, no hf/config.json, no "
                        "checkpoints/*.ckpt)")
    try:
        export_student(checkpoint, scratch / "packed", teacher=teacher)
    except NotQuantized:  # a full-precision (32-32-32) student: scored as a Hugging Face directory
        return export_full_precision_student(checkpoint, scratch / "hf", teacher=teacher), str(checkpoint)
    return scratch / "packed", str(checkpoint)


def task_of(model, directory: Path, override: str | None, flag: str):
    """The TaskSpec the model records (a packed export's manifest, a Hugging Face directory's
    `dq_lightning.json`), or `--task`'s."""
    from dq_lightning.data.tasks import TASKS
    from dq_lightning.models.directory import hf_directory_task

    if override is not None:
        if override not in TASKS:
            raise UserError(f"--task {override}: unknown task; choose from {', '.join(TASKS)}")
        return TASKS[override]
    manifest = getattr(model, "dq_export", None)
    name = (manifest.get("task") or {}).get("name") if manifest is not None else hf_directory_task(directory)
    if name not in TASKS:
        raise UserError(f"{flag} {directory}: the model records no task{f' ({name!r} is none)' if name else ''}; "
                        f"pass --task NAME ({', '.join(TASKS)})")
    return TASKS[name]


def open_subject(role: str, directory: Path, flag: str, args: argparse.Namespace, spec=None, generation=None,
                 label: str | None = None, cacheable: bool = True):
    """A `Subject` of a packed export or Hugging Face directory, and its task (`spec`, or what it records).
    It decodes with `generation` when given (a teacher with its student's settings, so that the two differ
    only by their weights), else with its directory's settings and the decoding flags."""
    from dq_lightning.export.predict import generation_settings, load_model, source_length

    model, tokenizer, task = load_model(str(directory), args.int8 and role == "model", None, flag=flag)
    spec = spec or task_of(model, directory, args.task, flag)
    task = {"source_lang": spec.source_lang, "target_lang": spec.target_lang,
            "max_source_length": spec.max_source_length, **task}
    max_source = source_length(model, task, args.max_source_length)
    generation = generation or generation_settings(model, args)
    identity = model_identity(directory, args.int8 and role == "model") if cacheable else None
    return Subject(role, label or str(directory), model, tokenizer, task, generation, max_source, identity,
                   directory), spec


def model_identity(directory: Path, int8: bool) -> dict:
    """What a model's outputs depend on besides the decoding settings: its files as they are now."""
    files = {path.name: [stat.st_size, stat.st_mtime_ns] for path in sorted(directory.iterdir())
             if path.is_file() for stat in (path.stat(),)}
    return {"directory": str(directory.resolve()), "files": files, "int8": int8}


def teacher_directory(args: argparse.Namespace, subject: Subject) -> Path | None:
    """`--teacher`, else the teacher the student's export records when that directory is there."""
    from dq_lightning.models.directory import hf_directory_info

    if args.teacher is not None:
        return Path(args.teacher).expanduser()
    recorded = ((getattr(subject.model, "dq_export", None) or {}).get("student") or {}).get("teacher") \
        or hf_directory_info(subject.directory).get("teacher")
    if not recorded:
        return None
    if not (Path(recorded).expanduser() / "config.json").is_file():
        print(f"note: the student's teacher {recorded} is not there; no teacher comparison (pass --teacher DIR)",
              file=sys.stderr)
        return None
    return Path(recorded).expanduser()


def read_examples(spec, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(sources, references) of the split, as the task's DataModule reads them."""
    from dq_lightning.data.datamodule import DATAMODULES, DEFAULT_CACHE_DIR, column_values, hub_cached, hub_offline
    from dq_lightning.data.jsonl import check_jsonl

    cache_dir = args.cache_dir or DEFAULT_CACHE_DIR
    split = "test" if args.test_file else args.split
    columns = (spec.source_column, spec.target_column)
    if args.data_dir is None and args.test_file is None and spec.hub_path is not None \
            and not hub_cached(spec.hub_path, cache_dir) and hub_offline():
        raise UserError(f"--data-dir is not set, and {spec.name}'s Hub dataset {spec.hub_path} cannot be "
                        f"downloaded ({hub_offline()}): give the folder of {split}.jsonl with --data-dir DIR")
    if args.data_dir is not None and args.test_file is None:
        check_jsonl(Path(args.data_dir).expanduser() / f"{split}.jsonl", columns, required_text=columns)
    datamodule = DATAMODULES[spec.name](data_dir=args.data_dir, test_file=args.test_file, cache_dir=cache_dir)
    rows = datamodule.load_raw((split,))[split]
    if args.max_samples:
        rows = rows.select(range(min(args.max_samples, len(rows))))
    return column_values(rows[:], spec.source_column), column_values(rows[:], spec.target_column)


def decode(subject: Subject, texts: list[str], batch_size: int, cache: Path | None = None) -> list[str]:
    """The subject's outputs, one per text, generated by `predict` (or read back from `cache`)."""
    import hashlib
    import json

    from dq_lightning.files import write_json_atomic

    path = None
    if cache is not None and subject.identity is not None:
        key = json.dumps([subject.identity, subject.generation.to_dict(), subject.max_source, subject.task, texts],
                         sort_keys=True, default=str)
        path = cache / f"{hashlib.sha256(key.encode()).hexdigest()}.json"
        try:
            outputs = json.loads(path.read_text())
            if isinstance(outputs, list) and len(outputs) == len(texts) and all(isinstance(o, str) for o in outputs):
                return outputs
        except (OSError, ValueError):
            pass  # not there yet, or unreadable: decoded again and rewritten
    outputs = _generate(subject, texts, batch_size)
    if path is not None:
        write_json_atomic(path, outputs)
    return outputs


def _generate(subject: Subject, texts: list[str], batch_size: int) -> list[str]:
    from dq_lightning.export.predict import predict

    buffer = io.StringIO()
    predict(subject.model, subject.tokenizer, texts, subject.generation, batch_size, subject.max_source,
            progress=False, out=buffer, task=subject.task)
    return buffer.getvalue().split("\n")[:len(texts)]


def corpus(predictions: list[str], references: list[str], metric: str) -> float:
    """The task's score, as the test computes it (`dq_lightning.evaluation.per_example`)."""
    from dq_lightning.evaluation.per_example import corpus_score, score_rows

    rows = [{"prediction": p, "reference": r} for p, r in zip(predictions, references)]
    return corpus_score(score_rows(rows, translation=metric == "bleu"), metric)


def agreement(outputs: list[str], anchors: list[str]) -> float:
    """Mean ROUGE-L F1 (percent) of `outputs` against `anchors`; identical pairs count 100."""
    from dq_lightning.evaluation.per_example import score_rows

    rows = score_rows([{"prediction": o, "reference": a} for o, a in zip(outputs, anchors)], translation=False)
    scores = [100.0 if o == a else row["rougeL"] for o, a, row in zip(outputs, anchors, rows)]
    return sum(scores) / max(len(scores), 1)


def teacher_forced_loyalty(student: Subject, teacher: Subject, sources: list[str], references: list[str],
                           spec, batch_size: int) -> dict[str, float]:
    """Label and probability loyalty of the student to the teacher on `sources`, the references as decoder
    input (both models read the student's encoding of the sources)."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    from dq_lightning.distill.loyalty import Loyalty
    from dq_lightning.export.predict import encode_sources
    from dq_lightning.models.tokenizer import encode_texts, language_ids

    sizes = (student.model.config.vocab_size, teacher.model.config.vocab_size)
    if sizes[0] != sizes[1]:
        raise UserError(f"--teacher {teacher.path}: its vocabulary ({sizes[1]} tokens) is not the student's "
                        f"({sizes[0]}); pass the teacher the student was distilled from")
    tokenizer, loyalty = student.tokenizer, Loyalty()
    target_id = (language_ids(tokenizer, spec.source_lang, spec.target_lang) or (None, None))[1]
    max_target = min(spec.max_target_length, student.model.config.max_position_embeddings)
    for start in range(0, len(sources), batch_size):
        batch = encode_sources(tokenizer, sources[start:start + batch_size], student.max_source, student.task)
        ids = encode_texts(tokenizer, references[start:start + batch_size], max_target, target_id, as_target=True)
        labels = pad_sequence([torch.tensor(row) for row in ids], batch_first=True, padding_value=-100)
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      decoder_input_ids=student.model.prepare_decoder_input_ids_from_labels(labels=labels))
        with torch.inference_mode():
            loyalty.update(student.model(**inputs).logits, teacher.model(**inputs).logits, labels != -100)
    return {key: float(value) for key, value in loyalty.compute().items()}


def measure(subjects: list[Subject], spec, sources: list[str], perturbed: list[str], references: list[str],
            batch_size: int, cache: Path | None = None) -> tuple[list[dict], dict[str, dict[str, list[str]]]]:
    """A result row per subject (the first is the model under test, a second its teacher), and every
    subject's clean and perturbed outputs."""
    rows, outputs = [], {}
    for subject in subjects:
        clean, noisy = decode(subject, sources, batch_size, cache), decode(subject, perturbed, batch_size, cache)
        outputs[subject.role] = {"clean": clean, "perturbed": noisy}
        scores = (corpus(clean, references, spec.metric), corpus(noisy, references, spec.metric))
        rows.append({"role": subject.role, "path": subject.path, "metric": spec.metric, "clean": scores[0],
                     "perturbed": scores[1], "drop": scores[0] - scores[1],
                     "stability": agreement(noisy, clean)})
    if len(subjects) > 1:
        model, teacher = subjects[0], subjects[1]
        rows[0].update(teacher_forced_loyalty(model, teacher, perturbed, references, spec, batch_size))
        rows[0]["output_agreement"] = agreement(outputs["model"]["perturbed"], outputs["teacher"]["perturbed"])
    return rows, outputs


def write_report(out: Path, report: dict, examples: list[dict]) -> None:
    import json

    from dq_lightning.files import write_json_atomic, write_text_atomic

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    common = {key: report[key] for key in CSV_COLUMNS if key in report}
    for row in report["models"]:
        writer.writerow({**common, "kinds": ",".join(report["kinds"]), **row})
    write_text_atomic(out / "examples.jsonl", "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples))
    write_text_atomic(out / "robustness.csv", buffer.getvalue())
    write_json_atomic(out / "robustness.json", report)


def table(report: dict) -> str:
    metric = report["metric"]
    lines = [f"robustness on {report['task']} {report['split']} (n={report['n']}): rate {report['rate']:g}, seed "
             f"{report['seed']}, kinds {','.join(report['kinds'])}; {report['words_perturbed']:.1%} of words "
             "perturbed",
             f"{'role':<8} {metric + ' clean':>13} {'perturbed':>10} {'drop':>7} {'stability':>10} "
             f"{'label_loyalty':>14} {'agreement':>10}"]
    for row in report["models"]:
        loyalty, agree = row.get("label_loyalty"), row.get("output_agreement")
        lines.append(f"{row['role']:<8} {row['clean']:>13.2f} {row['perturbed']:>10.2f} {row['drop']:>7.2f} "
                     f"{row['stability']:>10.2f} {'' if loyalty is None else f'{loyalty:.3f}':>14} "
                     f"{'' if agree is None else f'{agree:.2f}':>10}")
    return "\n".join(lines)


def evaluate(args: argparse.Namespace, kinds: tuple[str, ...], scratch: Path) -> tuple[dict, list[dict]]:
    """Load the model (and its teacher), read and perturb the examples, measure; the report and examples."""
    run = Path(args.run).expanduser()
    directory, label = model_directory(run, args.teacher, scratch)
    # a checkpoint exported to the scratch directory is new each time: not worth caching
    subject, spec = open_subject("model", directory, "--run", args, label=label, cacheable=directory.is_relative_to(run))
    sources, references = read_examples(spec, args)
    teacher_dir = teacher_directory(args, subject)
    subjects = [subject] + ([open_subject("teacher", teacher_dir, "--teacher", args, spec, subject.generation)[0]]
                            if teacher_dir is not None else [])
    perturbations = perturb_texts(sources, args.rate, args.seed, kinds)
    perturbed = [p.text for p in perturbations]
    cache = Path(args.decode_cache).expanduser() if args.decode_cache else None
    rows, outputs = measure(subjects, spec, sources, perturbed, references, args.batch_size, cache)
    words = sum(p.words for p in perturbations)
    report = {"run": str(args.run), "task": spec.name, "split": "test" if args.test_file else args.split,
              "data": args.test_file or args.data_dir or spec.hub_path, "n": len(sources), "rate": args.rate,
              "seed": args.seed, "kinds": list(kinds), "metric": spec.metric, "stability_metric": "rougeL",
              "words_perturbed": sum(p.changed for p in perturbations) / max(words, 1), "models": rows}
    examples = [{"index": i, "source": source[:500], "perturbed_source": p.text[:500], "words_changed": p.changed,
                 **{f"{role}_{which}": texts[which][i] for role, texts in outputs.items() for which in texts}}
                for i, (source, p) in enumerate(zip(sources, perturbations))]
    return report, examples


@command_line
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    kinds = check_arguments(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="dq_robustness.") as scratch:
        report, examples = evaluate(args, kinds, Path(scratch))
    out = out_dir(args)
    write_report(out, report, examples)
    print(table(report))
    print(f"wrote {out / 'robustness.json'}, robustness.csv, examples.jsonl")
    return 0
