"""Robustness report: seeded input perturbations at a stated share of words, and the `robustness` command
(scores on clean and perturbed sources, output stability, loyalty to the teacher) on tiny models."""

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from dq_lightning.errors import UserError
from dq_lightning.evaluation.perturb import KINDS, budget, check_rate, parse_kinds, perturb, perturb_texts
from tests.conftest import run_cli, write_jsonl

GENERATION = {"num_beams": 1, "max_length": 10, "min_length": 5}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def documents(shared_data):
    """Real XSum documents (the stand-in corpus on a clone without ../shared)."""
    lines = (shared_data / "xsum" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["document"] for line in lines[:40]]


def words_of(text):
    return text.split()


def _one_letter_edit(old, new):
    """Whether `new` is `old` with one letter inserted, dropped or replaced, or two adjacent letters swapped."""
    if len(new) == len(old) + 1:
        return any(new[:i] + new[i + 1:] == old and new[i].isalpha() for i in range(len(new)))
    if len(new) == len(old) - 1:
        return any(old[:i] + old[i + 1:] == new and old[i].isalpha() for i in range(len(old)))
    at = [i for i in range(len(old)) if old[i] != new[i]] if len(old) == len(new) else []
    if len(at) == 1:
        return old[at[0]].isalpha() and new[at[0]].isalpha()
    return len(at) == 2 and at[1] == at[0] + 1 and (old[at[0]], old[at[1]]) == (new[at[1]], new[at[0]])


def _cores(word):
    return re.match(r"^(\W*)(.*?)(\W*)$", word, re.DOTALL).groups()


# -- perturbations ----------------------------------------------------------------------------------------
def test_perturbations_are_seeded(documents):
    for index, text in enumerate(documents[:10]):
        first = perturb(text, 0.2, seed=3, index=index)
        assert first == perturb(text, 0.2, seed=3, index=index)
        assert first.text != text
        assert perturb(text, 0.2, seed=4, index=index).text != first.text
        assert perturb(text, 0.2, seed=3, index=index + 1).text != first.text
    # Each example has its own generator: a batch's order or split does not change what an example gets.
    batch = perturb_texts(documents[:10], 0.2, seed=3)
    assert [p.text for p in batch] == [perturb(t, 0.2, seed=3, index=i).text for i, t in enumerate(documents[:10])]
    assert perturb_texts(documents[5:10], 0.2, seed=3, start=5) == batch[5:]
    assert perturb(documents[0], 0.3, kinds=("swap", "typo")) == perturb(documents[0], 0.3, kinds=("typo", "swap"))


def test_rate_zero_changes_nothing(documents):
    texts = [*documents, "  leading and trailing  \n\n", "tabs\tand\r\nbreaks\u2028here 12,000", "", "a"]
    for index, text in enumerate(texts):
        result = perturb(text, 0.0, seed=1, index=index)
        assert result.text == text and result.changed == 0 and result.edits == ()
    assert perturb("one two three four", 0.1).text == "one two three four"  # 0.4 of a word rounds to none


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_changes_what_it_says(kind, documents):
    rate = 0.5 if kind == "number" else 0.2
    for index, text in enumerate(documents[:20]):
        result = perturb(text, rate, seed=0, index=index, kinds=(kind,))
        before, after = words_of(text), words_of(result.text)
        assert {edit_kind for _, edit_kind in result.edits} <= {kind}
        assert len({number for number, _ in result.edits}) == result.changed
        if kind == "drop":
            assert len(after) == len(before) - result.changed
            kept = iter(before)
            assert all(word in kept for word in after)  # what is left is the text in order, minus words
            continue
        assert len(after) == len(before)
        differing = [(old, new) for old, new in zip(before, after) if old != new]
        assert len(differing) == result.changed, (kind, differing)
        for old, new in differing:
            if kind == "number":
                assert len(old) == len(new)
                changes = [(a, b) for a, b in zip(old, new) if a != b]
                assert len(changes) == 1 and changes[0][0].isdigit() and changes[0][1].isdigit()
            elif kind == "typo":
                assert _one_letter_edit(old, new), (old, new)
        if kind == "swap":
            assert sorted(_cores(w)[1] for w in before) == sorted(_cores(w)[1] for w in after)
            # punctuation stays where it was: "small heads." becomes "heads small."
            assert [(_cores(w)[0], _cores(w)[2]) for w in before] == [(_cores(w)[0], _cores(w)[2]) for w in after]
    numbers = perturb("There were 2015 cats, not 31.", 1.0, kinds=("number",))
    assert numbers.changed == 2 and numbers.words == 6 and "cats, not" in numbers.text
    assert perturb("No numbers here at all.", 1.0, kinds=("number",)).changed == 0


@pytest.mark.parametrize("rate", [0.05, 0.1, 0.25, 0.5, 1.0])
def test_the_stated_share_of_words_is_perturbed(rate, documents):
    total_words = total_changed = 0
    for index, text in enumerate(documents):
        result = perturb(text, rate, seed=7, index=index)
        words = [word for word in text.split() if any(char.isalnum() for char in word)]
        assert result.words == len(words)
        assert result.changed == budget(len(words), rate) == int(rate * len(words) + 0.5)
        assert abs(result.changed - rate * len(words)) <= 0.5
        total_words, total_changed = total_words + len(words), total_changed + result.changed
    assert abs(total_changed / total_words - rate) <= 0.5 * len(documents) / total_words


def test_bad_rates_and_kinds_are_refused():
    for rate in (-0.1, 1.01, float("nan")):
        with pytest.raises(UserError, match="--rate"):
            check_rate(rate)
    assert parse_kinds("number, typo") == ("typo", "number")
    for value in ("typo,foo", "", " , "):
        with pytest.raises(UserError, match="--kinds"):
            parse_kinds(value)


# -- models -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sensitive_model(teacher_dir, tmp_path_factory):
    """A 2+2-layer xsum model whose greedy outputs change with its input (random weights at a large init_std;
    at the usual 0.02 a random model says the same thing for every input, and stability would be 100 for
    anything), saved with its tokenizer, task and decoding settings."""
    from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    torch.manual_seed(0)
    config = BartConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, max_position_embeddings=128, init_std=0.5,
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id,
                        forced_eos_token_id=tokenizer.eos_token_id)
    model = BartForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(**{**model.generation_config.to_dict(), **GENERATION})
    out = tmp_path_factory.mktemp("sensitive") / "hf"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "dq_lightning.json").write_text(json.dumps({"task": "xsum"}))
    return out


def _subjects(directory, *argv):
    from dq_lightning.evaluation.robustness import build_parser, open_subject

    args = build_parser().parse_args(["--run", str(directory), *argv])
    model, spec = open_subject("model", directory, "--run", args)
    return model, open_subject("teacher", directory, "--teacher", args, spec, model.generation)[0], spec


def test_a_model_against_itself_at_rate_zero_keeps_everything(sensitive_model, shared_data):
    from dq_lightning.evaluation.robustness import measure

    model, itself, spec = _subjects(sensitive_model)
    rows = [json.loads(line) for line in (shared_data / "xsum" / "test.jsonl").read_text().splitlines()[:6]]
    sources, references = [row["document"] for row in rows], [row["summary"] for row in rows]
    clean, outputs = measure([model, itself], spec, sources, [p.text for p in perturb_texts(sources, 0.0)],
                             references, batch_size=3)
    assert len(set(outputs["model"]["clean"])) > 1 and all(outputs["model"]["clean"])  # the model reads its input
    for row in clean:
        assert row["drop"] == 0 and row["clean"] == row["perturbed"] and row["stability"] == 100
    assert clean[0]["label_loyalty"] == 1 and clean[0]["prob_loyalty"] == pytest.approx(1, abs=1e-3)
    assert clean[0]["output_agreement"] == 100
    # The same measures see a perturbation: every word of every source mistyped moves the outputs.
    typos = [p.text for p in perturb_texts(sources, 1.0, kinds=("typo",))]
    noisy, outputs = measure([model], spec, sources, typos, references, batch_size=3)
    assert noisy[0]["stability"] < 100 and outputs["model"]["perturbed"] != outputs["model"]["clean"]
    assert noisy[0]["drop"] == pytest.approx(noisy[0]["clean"] - noisy[0]["perturbed"])


def _snapshot(directory):
    """Every file's digest and every directory under `directory`: what a command must leave as it was."""
    return {path.relative_to(directory).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            if path.is_file() else "directory" for path in sorted(directory.rglob("*"))}


@pytest.fixture(scope="module")
def student_run(sensitive_model, tmp_path_factory):
    """A run directory as a fit leaves it: an untrained 8-8-8 2-1 student's checkpoints/last.ckpt, whose
    hyper-parameters name the teacher."""
    from dq_lightning.modules.student import DQStudentModule
    from dq_lightning.quant import prepare

    module = DQStudentModule(teacher=str(sensitive_model), bits="8-8-8", depth="2-1", generation=GENERATION)
    prepare(module.model, module.quant_config)
    run = tmp_path_factory.mktemp("student_run")
    (run / "checkpoints").mkdir()
    torch.save({"state_dict": {f"model.{k}": v for k, v in module.model.state_dict().items()},
                "hyper_parameters": dict(module.hparams), "global_step": 0}, run / "checkpoints" / "last.ckpt")
    (run / "config.yaml").write_text("model: {}\n")
    return run


def test_cli_scores_a_student_run_beside_its_teacher(student_run, sensitive_model, shared_data, cache_dir):
    before, teacher_before = _snapshot(student_run), _snapshot(sensitive_model)
    result = run_cli("robustness", "--run", str(student_run), "--data-dir", str(shared_data / "xsum"),
                     "--max-samples", "4", "--rate", "0.3", "--seed", "2", "--threads", "1",
                     "--cache-dir", str(cache_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    out = student_run / "robustness" / "rate-0.3"
    report = json.loads((out / "robustness.json").read_text())
    assert (report["rate"], report["seed"], report["kinds"], report["n"]) == (0.3, 2, list(KINDS), 4)
    assert report["task"] == "xsum" and report["metric"] == "rougeL"
    assert abs(report["words_perturbed"] - 0.3) < 0.01
    model, teacher = report["models"]
    assert (model["role"], teacher["role"]) == ("model", "teacher")
    assert model["path"] == str(student_run / "checkpoints" / "last.ckpt") and teacher["path"] == str(sensitive_model)
    for row in (model, teacher):
        assert row["drop"] == pytest.approx(row["clean"] - row["perturbed"]) and 0 <= row["stability"] <= 100
    assert 0 <= model["label_loyalty"] <= 1 and 0 <= model["output_agreement"] <= 100
    assert "label_loyalty" not in teacher
    csv_lines = (out / "robustness.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("role,path,task")
    assert len((out / "examples.jsonl").read_text().splitlines()) == 4
    assert "teacher" in result.stdout and "stability" in result.stdout
    after = _snapshot(student_run)
    assert {name: digest for name, digest in after.items() if name.split("/")[0] != "robustness"} == before
    assert _snapshot(sensitive_model) == teacher_before


def test_cli_scores_a_full_precision_student_run_beside_its_teacher(sensitive_model, shared_data, cache_dir,
                                                                    tmp_path):
    """A 32-32-32 student (distill_only) has nothing to pack: it is scored as a Hugging Face directory, with
    the teacher its checkpoint names."""
    from dq_lightning.modules.student import DQStudentModule

    module = DQStudentModule(teacher=str(sensitive_model), bits="32-32-32", depth="2-1", generation=GENERATION)
    run = tmp_path / "fp_run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in module.model.state_dict().items()},
                "hyper_parameters": dict(module.hparams), "global_step": 0}, run / "checkpoints" / "last.ckpt")
    result = run_cli("robustness", "--run", str(run), "--data-dir", str(shared_data / "xsum"), "--max-samples",
                     "3", "--rate", "0.2", "--threads", "1", "--cache-dir", str(cache_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    model, teacher = json.loads((run / "robustness" / "rate-0.2" / "robustness.json").read_text())["models"]
    assert model["path"] == str(run / "checkpoints" / "last.ckpt") and teacher["path"] == str(sensitive_model)
    assert 0 <= model["label_loyalty"] <= 1 and 0 <= model["stability"] <= 100


def test_cli_scores_a_model_directory_and_a_test_file(sensitive_model, shared_data, cache_dir, tmp_path):
    rows = [json.loads(line) for line in (shared_data / "xsum" / "test.jsonl").read_text().splitlines()[:3]]
    test_file = write_jsonl(tmp_path / "mine.jsonl", rows)
    result = run_cli("robustness", "--run", str(sensitive_model), "--test-file", str(test_file), "--rate", "0",
                     "--kinds", "typo", "--threads", "1", "--out", str(tmp_path / "out"),
                     "--cache-dir", str(cache_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "robustness.json").read_text())
    assert report["n"] == 3 and report["kinds"] == ["typo"] and len(report["models"]) == 1
    assert report["models"][0]["drop"] == 0 and report["models"][0]["stability"] == 100
    assert not (sensitive_model / "robustness").exists()


@pytest.mark.parametrize("case", ["rate above 1", "negative rate", "unknown kind", "run without model",
                                  "missing data dir", "missing split", "missing test file"])
def test_bad_input_is_one_error_line_naming_the_flag(case, student_run, shared_data, tmp_path, capsys):
    from dq_lightning.evaluation.robustness import main

    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "config.yaml").write_text("model: {}\n")
    run, data = str(student_run), str(shared_data / "xsum")
    argv, flag = {
        "rate above 1": (["--run", run, "--data-dir", data, "--rate", "1.5"], "--rate 1.5"),
        "negative rate": (["--run", run, "--data-dir", data, "--rate", "-0.1"], "--rate -0.1"),
        "unknown kind": (["--run", run, "--data-dir", data, "--kinds", "typo,shout"], "--kinds typo,shout"),
        "run without model": (["--run", str(empty), "--data-dir", data], f"--run {empty}"),
        "missing data dir": (["--run", run, "--data-dir", str(tmp_path / "nope")], f"--data-dir {tmp_path / 'nope'}"),
        "missing split": (["--run", run, "--data-dir", data, "--split", "dev"], "--split dev"),
        "missing test file": (["--run", run, "--test-file", str(tmp_path / "no.jsonl")], "--test-file"),
    }[case]
    runs = {student_run: _snapshot(student_run), empty: _snapshot(empty)}
    assert main(argv) == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert len(stderr) == 1 and stderr[0].startswith("error: ") and flag in stderr[0], stderr
    for directory, snapshot in runs.items():
        assert _snapshot(directory) == snapshot  # no file, not even an empty robustness/ directory


def test_sweep_robustness_scores_each_run_once_and_reports_its_columns(student_run, shared_data, cache_dir):
    """`sweep --robustness RATE`: every finished run is scored by the robustness command once (a run already
    scored at that rate is skipped) and results.csv's row gains robust<rate>/... columns from its report."""
    from dq_lightning.sweep import robustness as sweep_robustness
    from dq_lightning.sweep.report import columns_of, run_row
    from dq_lightning.sweep.runner import _run_logged

    commands = []

    def run_small(command, log, env=None, stopping=None):  # the sweep's command, on 4 examples
        commands.append(command)
        return _run_logged([*command, "--max-samples", "4", "--threads", "1", "--cache-dir", str(cache_dir)], log,
                           env, stopping)

    failed = sweep_robustness.measure_all([student_run], 0.5, str(shared_data / "xsum"), None, run_small)
    assert failed == [] and len(commands) == 1
    assert commands[0][-6:] == ["--run", str(student_run), "--rate", "0.5", "--data-dir", str(shared_data / "xsum")]
    assert sweep_robustness.measure_all([student_run], 0.5, None, None, run_small) == [] and len(commands) == 1

    report = json.loads((student_run / "robustness" / "rate-0.5" / "robustness.json").read_text())
    row = run_row(student_run)
    for measure in ("clean", "perturbed", "drop", "stability", "label_loyalty", "output_agreement"):
        assert row[f"robust0.5/{measure}"] == report["models"][0][measure]
        assert f"robust0.5/{measure}" in columns_of([row])


def test_sweep_robustness_scores_the_teacher_first_then_the_runs_in_parallel(tmp_path):
    """With workers, the first directory (the teacher, whose decodes the students' reports read from the decode
    cache) is scored alone; the rest run that many at a time, each once, and a failure is reported, not raised."""
    import threading
    import time

    from dq_lightning.sweep import robustness as sweep_robustness

    runs = [tmp_path / name for name in ("teacher", "a", "b", "c", "d")]
    for run in runs:
        run.mkdir()
    lock, running, log = threading.Lock(), [], []

    def fake(command, log_path, env=None, stopping=None):
        run = Path(command[command.index("--run") + 1])
        assert command[command.index("--decode-cache") + 1] == str(tmp_path / "cache")
        assert env == {"OMP_NUM_THREADS": "1"}
        with lock:
            running.append(run.name)
            log.append((run.name, tuple(running)))
        time.sleep(0.3)
        with lock:
            running.remove(run.name)
        if run.name == "c":
            log_path.write_text("error: c broke\n")
            return 1
        sweep_robustness.report_path(run, 0.1).parent.mkdir(parents=True)
        sweep_robustness.report_path(run, 0.1).write_text("{}")
        return 0

    failed = sweep_robustness.measure_all(runs, 0.1, None, None, fake, workers=2, env={"OMP_NUM_THREADS": "1"},
                                          decode_cache=tmp_path / "cache")
    assert log[0] == ("teacher", ("teacher",))  # alone
    assert sorted(name for name, _ in log) == ["a", "b", "c", "d", "teacher"]  # each once
    assert max(len(together) for _, together in log) == 2  # two at a time
    assert failed == [("c", "robustness", "error: c broke")]


def test_decode_cache_serves_the_same_outputs_until_the_model_changes(sensitive_model, shared_data, tmp_path,
                                                                   monkeypatch):
    from dq_lightning.evaluation import robustness

    rows = [json.loads(line) for line in (shared_data / "xsum" / "test.jsonl").read_text().splitlines()[:3]]
    sources = [row["document"] for row in rows]
    generated = []
    real_generate = robustness._generate
    monkeypatch.setattr(robustness, "_generate",
                        lambda subject, texts, size: generated.append(texts) or real_generate(subject, texts, size))
    model, _, _ = _subjects(sensitive_model)
    first = robustness.decode(model, sources, 3, tmp_path / "cache")
    assert robustness.decode(model, sources, 3, tmp_path / "cache") == first and len(generated) == 1
    robustness.decode(model, sources[:2], 3, tmp_path / "cache")  # other sources: decoded
    assert len(generated) == 2
    copy = tmp_path / "copy"
    shutil.copytree(sensitive_model, copy)
    moved, _, _ = _subjects(copy)  # the same weights elsewhere are another model to the cache
    assert robustness.decode(moved, sources, 3, tmp_path / "cache") == first and len(generated) == 3
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")  # its files changed
    robustness.decode(_subjects(copy)[0], sources, 3, tmp_path / "cache")
    assert len(generated) == 4
    robustness.decode(model, sources, 3, None)  # no cache: always decoded
    assert len(generated) == 5


def test_sweep_refuses_a_robustness_rate_outside_0_1(tmp_path):
    result = run_cli("sweep", "--task", "demo", "--runs", str(tmp_path), "--robustness", "1.5", "--preflight")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: --robustness 1.5 (make: ROBUSTNESS): a perturbation rate is a share of words, in [0, 1]"]
    assert not any(tmp_path.iterdir())
