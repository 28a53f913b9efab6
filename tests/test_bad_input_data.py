"""Bad input to data, `predict`, `export` and dict-valued settings, each run as the user would run it: a
non-zero exit with exactly one `error:` line naming the culprit, no traceback, and existing files
byte-identical; or, for `predict`, exactly one output line per input line whatever the lines hold."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import PROJECT_ROOT, run_cli, write_jsonl

GOOD = {"id": "1", "document": "A document. It has text.", "summary": "A summary."}
QUICK = ["--data.max_train_samples=8", "--data.max_eval_samples=2", "--data.max_source_length=64",
         "--data.max_target_length=16", "--data.batch_size=4", "--trainer.max_steps=1", "--trainer.logger=false",
         "--model.generation={num_beams: 1, max_length: 6}"]
ENV = {"OMP_NUM_THREADS": "1"}


def digest(*roots):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


def one_error(result, *fragments):
    """The failed command's single `error:` line, checked to name every fragment."""
    stderr = result.stderr if isinstance(result.stderr, str) else result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], stderr[-3000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.split("\n") if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def lines_of(stdout: bytes) -> list[bytes]:
    """stdout split as a reader of one line per input would split it: at b"\\n"."""
    assert stdout.endswith(b"\n") or stdout == b""
    return stdout.split(b"\n")[:-1]


@pytest.fixture(scope="module")
def protected(tmp_path_factory):
    """A run directory holding a checkpoint and a config that no failed command may touch."""
    run_dir = tmp_path_factory.mktemp("protected") / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"checkpoint bytes")
    (run_dir / "config.yaml").write_text("seed_everything: 0\n")
    return run_dir


# -- data files ----------------------------------------------------------------------------------------------
def _data_dirs(root):
    """{case: (data directory, fragments the error must name)}."""
    good = json.dumps(GOOD) + "\n"
    # Valid JSON Lines that text-mode reading or str.splitlines would cut in two: a "\r" between tokens and raw
    # U+2028 / U+0085 inside strings. The malformed row after them must still be reported as line 3.
    tricky = ('{"id": "1",\r "document": "One\u2028two\x85three.", "summary": "One."}\n'.encode()
              + good.encode() + b'{"id": "3", "document": "unterminated\n')
    cases = {
        "invalid UTF-8 in train": ({"train": good.encode() * 2 + b'{"id": "3", "document": "caf\xe9", '
                                    b'"summary": "x"}\n'}, ["train.jsonl:3", "not UTF-8", "0xe9"]),
        "invalid UTF-8 in validation": ({"validation": good.encode() + b'{"id": "2", "document": "\xff\xfe", '
                                         b'"summary": "x"}\n'}, ["validation.jsonl:2", "not UTF-8"]),
        "malformed JSON after line breaks inside lines": ({"train": tricky}, ["train.jsonl:3", "malformed JSON"]),
        "missing text field": ({"train": (good + json.dumps({"id": "2", "summary": "S."}) + "\n").encode()},
                               ["train.jsonl:2", "missing column 'document'"]),
        "text empty on every row": ({"train": "".join(json.dumps({**GOOD, "document": text}) + "\n"
                                                      for text in ("", " ", "\t\n")).encode()},
                                    ["train.jsonl", "column 'document'", "empty on every row"]),
        "target empty on every row": ({"train": "".join(json.dumps({**GOOD, "summary": ""}) + "\n"
                                                        for _ in range(3)).encode()},
                                      ["train.jsonl", "column 'summary'", "empty on every row"]),
        "validation target empty on every row": ({"validation": (json.dumps({**GOOD, "summary": "  "}) + "\n"
                                                                 ).encode()},
                                                 ["validation.jsonl", "column 'summary'", "empty on every row"]),
    }
    dirs = {}
    for index, (case, (files, fragments)) in enumerate(cases.items()):
        folder = root / f"case{index}"
        write_jsonl(folder / "train.jsonl", [GOOD] * 3)
        write_jsonl(folder / "validation.jsonl", [GOOD] * 2)
        for split, data in files.items():
            (folder / f"{split}.jsonl").write_bytes(data)
        dirs[case] = (folder, fragments)
    return dirs


DATA_CASES = ["invalid UTF-8 in train", "invalid UTF-8 in validation", "malformed JSON after line breaks inside lines",
              "missing text field", "text empty on every row", "target empty on every row",
              "validation target empty on every row"]


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    return _data_dirs(tmp_path_factory.mktemp("bad_data"))


def new_run(protected):
    # Beside the protected run: a fit into the run folder itself is refused before its data or settings are
    # looked at (it holds an earlier run; tests/test_bad_input_cli.py).
    return protected.parent / "new-run"


def teacher_fit(run_dir, cache_dir, *extra):
    return ["fit", "--config", "experiments/xsum/teacher-tiny.yaml", f"--data.cache_dir={cache_dir}",
            f"--trainer.default_root_dir={run_dir}", "--model.model=micro", "--data.vocab_size=300", *QUICK, *extra]


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data_file_is_one_error_naming_file_line_and_field(case, data_dirs, protected, cache_dir):
    folder, fragments = data_dirs[case]
    before = digest(protected, folder)
    result = run_cli(*teacher_fit(new_run(protected), cache_dir, f"--data.data_dir={folder}"), env=ENV)
    one_error(result, str(folder), *fragments)
    assert digest(protected, folder) == before


def test_jsonl_lines_are_split_at_newlines_only(data_dirs, cache_dir):
    """The rows with "\\r", U+2028 and U+0085 in them are read whole, as `datasets` reads them."""
    from dq_lightning.data.jsonl import check_jsonl

    folder, _ = data_dirs["malformed JSON after line breaks inside lines"]
    fixed = folder.parent / "fixed"
    fixed.mkdir(exist_ok=True)
    (fixed / "train.jsonl").write_bytes((folder / "train.jsonl").read_bytes().rsplit(b"\n", 2)[0] + b"\n")
    assert check_jsonl(fixed / "train.jsonl", ("document", "summary"), ("document", "summary")) == 2


# -- unknown keys in dict-valued settings --------------------------------------------------------------------
def student_fit(run_dir, cache_dir, shared_data, teacher_dir, *extra):
    return ["fit", "--config", "experiments/xsum/dq-tiny.yaml", f"--data.cache_dir={cache_dir}",
            f"--data.data_dir={shared_data / 'xsum'}", f"--trainer.default_root_dir={run_dir}",
            f"--model.teacher={teacher_dir}", *QUICK, *extra]


DICT_CASES = {
    "quant_settings": (["--model.quant_settings={nonsense: 1}"],
                       ["model.quant_settings.nonsense", "--model.quant_settings", "act_clip"]),
    # A full-precision student builds no QuantConfig; the key must still be refused, not ignored.
    "quant_settings of a distill_only student": (["--model.mode=distill_only", "--model.quant_settings={nonsense: 1}"],
                                                 ["model.quant_settings.nonsense", "--model.quant_settings"]),
    "a bit width in quant_settings": (["--model.quant_settings={w_bits: 4}"],
                                      ["model.quant_settings.w_bits", "--model.bits"]),
    "generation": (["--model.generation={num_beam: 2}"], ["model.generation.num_beam", "--model.generation",
                                                           "num_beams"]),
}


@pytest.mark.parametrize("case", list(DICT_CASES))
def test_unknown_key_of_a_dict_setting_names_key_and_flag(case, protected, cache_dir, shared_data, teacher_dir):
    flags, fragments = DICT_CASES[case]
    before = digest(protected)
    result = run_cli(*student_fit(new_run(protected), cache_dir, shared_data, teacher_dir, *flags), env=ENV)
    one_error(result, *fragments)
    assert digest(protected) == before


def test_unknown_key_of_a_data_dict_setting_names_key_and_flag(protected, cache_dir, shared_data):
    before = digest(protected)
    result = run_cli("fit", "--config", "experiments/xsum/pretrain-tiny.yaml", f"--data.cache_dir={cache_dir}",
                     f"--data.data_dir={shared_data / 'xsum'}", f"--trainer.default_root_dir={new_run(protected)}",
                     "--model.model=micro", "--data.objectives={infilling: 1.0, shuffle: 1.0}",
                     "--trainer.max_steps=1", "--trainer.logger=false", env=ENV)
    one_error(result, "data.objectives.shuffle", "--data.objectives", "gap_sentence")
    assert digest(protected) == before


# -- predict: one output line per input line -----------------------------------------------------------------
def predict_cli(model_dir, *args, stdin: bytes = b""):
    return subprocess.run([sys.executable, "-m", "dq_lightning", "predict", "--model", str(model_dir),
                           "--num-beams", "1", "--max-length", "6", "--threads", "1", "--batch-size", "4", *args],
                          input=stdin, capture_output=True, cwd=PROJECT_ROOT, timeout=600, env={**os.environ, **ENV})


# Every character str.splitlines breaks at, inside a line; empty and blank lines; special-token text; a very long
# line; emoji, combining and right-to-left text; NUL and other control characters.
UNICODE_LINES = ["Hello world.", "", "one\u2028two\u2029three", "four\x85five", "six\x0cseven\x0beight",
                 "nine\x1cten\x1deleven\x1etwelve", "lone\rreturn inside", "   \t ", "\u2028", "</s> <pad> <mask>",
                 "\U0001f600 e\u0301 \u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627",
                 "nul\x00byte \x7f\x1b[0m",
                 "long " * 40000, "last line."]


@pytest.mark.parametrize("source", ["stdin", "file with CRLF and no final newline"])
def test_predict_gives_one_line_per_input_line_whatever_it_holds(source, teacher_dir, tmp_path):
    if source == "stdin":
        data = "".join(line + "\n" for line in UNICODE_LINES).encode()
        result = predict_cli(teacher_dir, stdin=data)
    else:
        data = "\r\n".join(UNICODE_LINES).encode()
        path = tmp_path / "in.txt"
        path.write_bytes(data)
        result = predict_cli(teacher_dir, "--input", str(path))
        assert path.read_bytes() == data
    assert result.returncode == 0, result.stderr[-3000:]
    out = lines_of(result.stdout)
    assert len(out) == len(UNICODE_LINES), (len(out), result.stdout[:500])
    for line, text in zip(out, UNICODE_LINES):
        if not text.strip():
            assert line == b""
        line.decode("utf-8")  # valid UTF-8


@pytest.fixture(scope="module")
def line_breaking_model(teacher_dir, tmp_path_factory):
    """A model whose every output holds line breaks: the LM bias ranks the byte tokens of "x\\ny\\rz<U+2028>w
    <U+0085>v\\x0cu" first, and no_repeat_ngram_size=1 makes greedy decoding emit them in that order."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    model = AutoModelForSeq2SeqLM.from_pretrained(str(teacher_dir))
    ids = [i for piece in ["x", "\n", "y", "\r", "z", "\u2028", "w", "\x85", "v", "\x0c", "u"]
           for i in tokenizer(piece, add_special_tokens=False)["input_ids"]]
    assert len(set(ids)) == len(ids)
    with torch.no_grad():
        model.final_logits_bias.zero_()
        for rank, token in enumerate(ids):
            model.final_logits_bias[0, token] = 1000.0 - rank
    model.generation_config.update(no_repeat_ngram_size=1, num_beams=1, min_length=0, max_length=len(ids) + 2)
    generated = model.generate(**tokenizer(["hello"], return_tensors="pt"))
    raw = tokenizer.batch_decode(generated, skip_special_tokens=True)[0]
    assert "\n" in raw and "\u2028" in raw and "\r" in raw  # the test below can fail
    out = tmp_path_factory.mktemp("line_breaker")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_predict_flattens_line_breaks_in_outputs(line_breaking_model):
    result = subprocess.run([sys.executable, "-m", "dq_lightning", "predict", "--model", str(line_breaking_model),
                             "--threads", "1"], input=b"hello\n\nworld\n", capture_output=True, cwd=PROJECT_ROOT,
                            timeout=600, env={**os.environ, **ENV})
    assert result.returncode == 0, result.stderr[-3000:]
    out = lines_of(result.stdout)
    assert out == [b"x y z w v u", b"", b"x y z w v u"], result.stdout
    assert result.stdout.decode().splitlines() == [line.decode() for line in out]  # for any line reader


@pytest.mark.parametrize("source", ["stdin", "file"])
def test_predict_refuses_invalid_utf8_naming_file_and_line(source, teacher_dir, tmp_path):
    data = b"fine\n\ncaf\xe9 au lait\nfine again\n"
    if source == "stdin":
        result, name = predict_cli(teacher_dir, stdin=data), "<stdin>"
    else:
        path = tmp_path / "in.txt"
        path.write_bytes(data)
        result, name = predict_cli(teacher_dir, "--input", str(path)), str(path)
        assert path.read_bytes() == data
    one_error(result, f"--input {name}:3", "not UTF-8", "--invalid-utf8 replace")
    assert result.stdout == b""  # refused before generating: no partial output to mistake for the whole


def test_predict_replaces_invalid_utf8_when_asked(teacher_dir):
    lines = [b"fine", b"caf\xe9", b"\xff\xfe\xfd", b"", b"half \xe2\x80 a character", b"end"]
    result = predict_cli(teacher_dir, "--invalid-utf8", "replace", stdin=b"\n".join(lines) + b"\n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(lines_of(result.stdout)) == len(lines)
    assert "--invalid-utf8" in run_cli("predict", "--model", str(teacher_dir), "--help").stdout


# -- export ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def student_checkpoint(teacher_dir, tmp_path_factory):
    """An untrained 8-8-8 2-1 student saved as Lightning lays a checkpoint out (what export reads)."""
    from dq_lightning.modules.student import DQStudentModule
    from dq_lightning.quant import prepare

    module = DQStudentModule(teacher=str(teacher_dir), bits="8-8-8", depth="2-1",
                             generation={"num_beams": 1, "max_length": 6})
    prepare(module.model, module.quant_config)
    path = tmp_path_factory.mktemp("student") / "student.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in module.model.state_dict().items()},
                "hyper_parameters": dict(module.hparams), "global_step": 0}, path)
    return path


@pytest.fixture(scope="module")
def earlier_export(student_checkpoint, tmp_path_factory):
    from dq_lightning.export import export_student

    out = tmp_path_factory.mktemp("earlier") / "packed"
    export_student(student_checkpoint, out)
    return out


def test_export_over_an_earlier_export_keeps_the_users_files(student_checkpoint, earlier_export, tmp_path):
    from dq_lightning.export import load_packed
    from dq_lightning.export.manifest import MANIFEST, WEIGHTS

    out = tmp_path / "packed"
    shutil.copytree(earlier_export, out)
    (out / "NOTES.md").write_text("my notes\n")
    (out / "predictions").mkdir()
    (out / "predictions" / "test.txt").write_text("a summary\n")
    (out / WEIGHTS).write_bytes(b"an older, different weights file")  # an export file: to be replaced
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"]["old_only.txt"] = {"bytes": 3, "sha256": ""}  # written by the earlier export only
    (out / MANIFEST).write_text(json.dumps(manifest))
    (out / "old_only.txt").write_text("old")
    users = digest(out / "predictions") | {str(out / "NOTES.md"): hashlib.sha256(b"my notes\n").hexdigest()}

    result = run_cli("export", "--ckpt", str(student_checkpoint), "--out", str(out), env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert {k: v for k, v in digest(out).items() if k in users} == users
    assert not (out / "old_only.txt").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left behind
    assert (out / WEIGHTS).read_bytes() != b"an older, different weights file"
    new_manifest = json.loads((out / MANIFEST).read_text())
    assert new_manifest["tensors"] == json.loads((earlier_export / MANIFEST).read_text())["tensors"]
    assert "NOTES.md" not in new_manifest["files"] and "old_only.txt" not in new_manifest["files"]
    load_packed(out)  # the new export is whole and verifies
    for name in [*new_manifest["files"], MANIFEST]:  # exporting a checkpoint again gives the same bytes
        assert (out / name).read_bytes() == (earlier_export / name).read_bytes(), name


def test_export_below_a_file_is_one_error(student_checkpoint, tmp_path):
    blocker = tmp_path / "some_file"
    blocker.write_text("not a directory\n")
    before = digest(tmp_path)
    result = run_cli("export", "--ckpt", str(student_checkpoint), "--out", str(blocker / "sub"), env=ENV)
    one_error(result, f"--out {blocker / 'sub'}", str(blocker), "is a file")
    assert digest(tmp_path) == before and sorted(tmp_path.iterdir()) == [blocker]


def _read_only(path):
    """Make `path` unwritable even for root (chattr +i); returns how to undo it, or None if impossible."""
    path.chmod(0o555)
    if os.access(path, os.W_OK):  # root: the mode does not stop it; the immutable flag does
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            path.chmod(0o755)
            return None
        return lambda: (subprocess.run(["chattr", "-i", str(path)], check=True), path.chmod(0o755))
    return lambda: path.chmod(0o755)


def test_export_into_an_unwritable_directory_is_one_error(student_checkpoint, earlier_export, tmp_path):
    out = tmp_path / "packed"
    shutil.copytree(earlier_export, out)
    undo = _read_only(out)
    if undo is None:
        # No way to make a directory unwritable here (root without chattr): a filesystem nobody may write to.
        target, fragments = "/sys/dq_lightning_export", ["--out /sys/dq_lightning_export", "cannot write"]
    else:
        target, fragments = str(out), [f"--out {out}", "permission"]
    before = digest(tmp_path)
    try:
        result = run_cli("export", "--ckpt", str(student_checkpoint), "--out", target, env=ENV)
    finally:
        if undo is not None:
            undo()
    one_error(result, *fragments)
    assert digest(tmp_path) == before
