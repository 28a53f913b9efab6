"""Every user error ends in one line naming the culprit, a non-zero exit, no traceback, and nothing lost."""

import hashlib
import shutil

import pytest
import yaml

from tests.conftest import PROJECT_ROOT, run_cli, write_jsonl

GOOD_ROW = {"id": "1", "document": "A document. It has text.", "summary": "A summary."}
QUICK = ["--data.max_train_samples=8", "--data.max_eval_samples=2", "--data.max_source_length=64",
         "--data.max_target_length=16", "--data.batch_size=4", "--trainer.max_steps=1", "--trainer.logger=false",
         "--model.generation={num_beams: 1, max_length: 6}"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, shared_data, cache_dir, teacher_dir):
    """Bad data directories, a corrupt teacher, a bad sweep file, and a run directory with results to protect."""
    root = tmp_path_factory.mktemp("bad_input")
    data = {}
    for name, train, validation in [
        ("malformed", [GOOD_ROW] * 3, [GOOD_ROW, '{"id": "2", "document": "unterminated']),
        ("no_column", [{"id": "1", "document": "text only"}] * 3, [GOOD_ROW]),
        ("empty", [GOOD_ROW] * 3, []),
    ]:
        write_jsonl(root / name / "train.jsonl", train)
        (root / name / "validation.jsonl").write_text("".join(
            (r if isinstance(r, str) else yaml.safe_dump(r, default_flow_style=True).strip()) + "\n"
            for r in validation))
        data[name] = root / name
    write_jsonl(root / "no_column" / "validation.jsonl", [GOOD_ROW])
    write_jsonl(root / "malformed" / "validation.jsonl", [GOOD_ROW, '{"id": "2", "document": "unterminated'])
    corrupt = root / "corrupt_teacher"
    shutil.copytree(teacher_dir, corrupt)
    (corrupt / "model.safetensors").write_bytes((teacher_dir / "model.safetensors").read_bytes()[:1000])
    sweep = yaml.safe_load((PROJECT_ROOT / "sweeps" / "xsum-tiny.yaml").read_text())
    sweep["parameters"]["model.w_bitz"] = {"values": [2]}
    (root / "bad_sweep.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    flag = yaml.safe_load((PROJECT_ROOT / "sweeps" / "xsum-tiny.yaml").read_text())
    flag["command"].insert(-1, "--trainer.max_epochz=2")
    (root / "bad_flag_sweep.yaml").write_text(yaml.safe_dump(flag, sort_keys=False))

    sweeps = root / "sweeps"  # malformed sweep files
    sweeps.mkdir()
    good = (PROJECT_ROOT / "sweeps" / "xsum-tiny.yaml").read_text()
    (sweeps / "empty_parameters.yaml").write_text(good.replace("parameters:\n", "parameters: {}\nunused:\n"))
    listed = yaml.safe_load(good)
    listed["parameters"] = ["model.bits", "model.depth"]
    (sweeps / "list_parameters.yaml").write_text(yaml.safe_dump(listed, sort_keys=False))
    (sweeps / "bad_syntax.yaml").write_text("method: grid\nmetric: {name: val/rougeL}\nparameters:\n"
                                            "  model.bits: {values: [8-8-8, 2-2-8]}\n  model.depth: {values: [6-6\n"
                                            "command: [python, '${args}']\n")

    # A tokenizer whose vocabulary is not the teacher's (any; the real BART files are not on every machine).
    from dq_lightning.data.datamodule import XSumDataModule

    XSumDataModule(data_dir=str(shared_data / "xsum"), vocab_size=700, max_train_samples=200,
                   cache_dir=str(cache_dir)).build_tokenizer().save_pretrained(root / "other_tokenizer")

    run_dir = root / "runs" / "xsum" / "run"  # results and a checkpoint that no failure may touch
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"checkpoint bytes")
    (root / "runs" / "xsum" / "sweep").mkdir(parents=True)
    (root / "runs" / "xsum" / "sweep" / "results.csv").write_text("run_id,status\nold,finished\n")
    return {"root": root, "data": data, "corrupt": corrupt, "run_dir": run_dir, "shared": shared_data,
            "cache": cache_dir, "teacher": teacher_dir}


def new_run(w):
    # Into a new folder beside the protected run: a fit into the run folder itself is refused before any of
    # these mistakes is looked at (it holds an earlier run; tests/test_bad_input_cli.py).
    return w["run_dir"].parent / "new-run"


def teacher_fit(w, *extra):
    return ["fit", "--config", "experiments/xsum/teacher-tiny.yaml", f"--data.cache_dir={w['cache']}",
            f"--trainer.default_root_dir={new_run(w)}", "--model.model=micro", "--data.vocab_size=300", *QUICK,
            *extra]


def student_fit(w, *extra):
    return ["fit", "--config", "experiments/xsum/dq-tiny.yaml", f"--data.cache_dir={w['cache']}",
            f"--data.data_dir={w['shared'] / 'xsum'}", f"--trainer.default_root_dir={new_run(w)}",
            f"--model.teacher={w['teacher']}", *QUICK, *extra]


def sweep(w, *extra, env=None):
    args = ["sweep", "--task", "xsum", "--runs", str(w["root"] / "runs"), *extra]
    return (args, env) if env else args


CASES = {
    "unknown task": (lambda w: ["sweep", "--task", "nosuchtask", "--runs", str(w["root"] / "runs")],
                     ["unknown task 'nosuchtask'"]),
    "unknown scale": (lambda w: ["sweep", "--task", "xsum", "--scale", "huge", "--runs", str(w["root"] / "runs")],
                      ["unknown scale 'huge'"]),
    "unknown preset": (lambda w: teacher_fit(w, f"--data.data_dir={w['shared'] / 'xsum'}", "--model.model=gigantic"),
                       ["model.model=gigantic"]),
    "missing data_dir": (lambda w: teacher_fit(w, f"--data.data_dir={w['root'] / 'nowhere'}"),
                         ["data.data_dir=", "no such directory"]),
    "malformed JSONL line": (lambda w: teacher_fit(w, f"--data.data_dir={w['data']['malformed']}"),
                             ["validation.jsonl:2", "malformed JSON"]),
    "missing column": (lambda w: teacher_fit(w, f"--data.data_dir={w['data']['no_column']}"),
                       ["train.jsonl:1", "missing column 'summary'"]),
    "empty split": (lambda w: teacher_fit(w, f"--data.data_dir={w['data']['empty']}"),
                    ["validation.jsonl", "split is empty"]),
    "unsupported bits": (lambda w: student_fit(w, "--model.bits=5-2-8"), ["w_bits=5"]),
    "old flat bits flag": (lambda w: student_fit(w, "--model.w_bits=2"), ["--model.w_bits=2", "now --model.bits"]),
    "unsupported W-E-A": (lambda w: student_fit(w, "--model.bits=2-2-7"), ["a_bits=7"]),
    "zero bits": (lambda w: student_fit(w, "--model.bits=0-2-8"), ["model.bits=0-2-8", "w_bits=0 is not supported"]),
    "1-bit activations under a recipe without them": (
        lambda w: student_fit(w, "--model.recipe=dq-bart", "--model.bits=2-2-1"),
        ["model.bits=2-2-1", "a_bits=1 needs act_method='elastic'", "recipe dq-bart"]),
    "1-bit weights with a quantizer that has no 1-bit grid": (
        lambda w: student_fit(w, "--model.recipe=tbt", "--model.bits=1-1-8", "--model.quant_settings.weight_method=minmax"),
        ["model.bits=1-1-8", "w_bits=1 needs weight_method binary"]),
    "unknown recipe": (lambda w: student_fit(w, "--model.recipe=dq-bert"), ["--model.recipe=dq-bert", "'dq-bart', 'dq_lightning'"]),
    "ternary at 8 bits": (lambda w: student_fit(w, "--model.bits=8-8-8", "--model.quant_settings.weight_method=ternary"),
                          ["weight_method", "ternary"]),
    "unknown attention quantization": (lambda w: student_fit(w, "--model.quant_settings.attention_quant=sometimes"),
                                       ["attention_quant", "sometimes"]),
    "bits inside quant_settings": (lambda w: student_fit(w, "--model.quant_settings={w_bits: 4}"),
                                   ["quant_settings", "w_bits"]),
    "student deeper than teacher": (lambda w: student_fit(w, "--model.depth=9-4"),
                                    ["model.depth (encoder)", "may not be deeper"]),
    "map of wrong length": (lambda w: student_fit(w, "--model.depth=4-2", "--model.shape.decoder_layer_map=[0,1,3]"),
                            ["model.shape.decoder_layer_map=[0, 1, 3]", "has 3 entries"]),
    "missing teacher": (lambda w: student_fit(w, f"--model.teacher={w['root'] / 'no_teacher'}"),
                        ["model.teacher=", "no such directory"]),
    "corrupt teacher": (lambda w: student_fit(w, f"--model.teacher={w['corrupt']}"),
                        ["model.teacher=", "cannot load model"]),
    "vocabulary mismatch": (lambda w: student_fit(w, f"--data.tokenizer={w['root'] / 'other_tokenizer'}"),
                            ["vocabulary", "data.tokenizer"]),
    "sweep file is a directory": (lambda w: sweep(w, "--sweep-file", str(w["root"] / "sweeps")),
                                  ["sweeps: is a directory"]),
    "sweep parameters empty": (lambda w: sweep(w, "--sweep-file", str(w["root"] / "sweeps" / "empty_parameters.yaml")),
                               ["empty_parameters.yaml", "parameters must be a mapping", "empty"]),
    "sweep parameters a list": (lambda w: sweep(w, "--sweep-file", str(w["root"] / "sweeps" / "list_parameters.yaml")),
                                ["list_parameters.yaml", "parameters must be a mapping", "a list"]),
    "sweep YAML syntax error": (lambda w: sweep(w, "--sweep-file", str(w["root"] / "sweeps" / "bad_syntax.yaml")),
                                ["bad_syntax.yaml:6:", "not valid YAML"]),
    "sweep data folder missing": (lambda w: sweep(w, "--data-dir", str(w["root"] / "nowhere")),
                                  ["--data-dir", "DATA_DIR", "no such directory"]),
    "sweep without data while offline": (lambda w: sweep(w, env={"HF_DATASETS_OFFLINE": "1"}),
                                         ["no data folder for xsum", "--data-dir", "DATA_DIR", "OFFLINE=1"]),
    "sweep asking for GPUs the machine lacks": (lambda w: sweep(w, "--data-dir", str(w["shared"] / "xsum"),
                                                                "--gpus", "64"), ["--gpus 64", "GPUS=64", "asks for a GPU"]),
    "sweep workers not a number": (lambda w: sweep(w, "--data-dir", str(w["shared"] / "xsum"), "--workers", "two"),
                                   ["--workers two", "WORKERS", "positive number"]),
    "several sweep workers sharing GPUs": (lambda w: sweep(w, "--data-dir", str(w["shared"] / "xsum"),
                                                           "--workers", "2", "--gpus", "1"),
                                           ["--workers 2", "--gpus 1", "one worker per machine"]),
    "unknown sweep parameter": (lambda w: sweep(w, "--sweep-file", str(w["root"] / "bad_sweep.yaml"),
                                                "--data-dir", str(w["shared"] / "xsum")),
                                ["unknown parameter 'model.w_bitz'"]),
    "unknown flag in the sweep command": (lambda w: sweep(w, "--sweep-file", str(w["root"] / "bad_flag_sweep.yaml"),
                                                          "--data-dir", str(w["shared"] / "xsum")),
                                          ["bad_flag_sweep.yaml", "flag --trainer.max_epochz=2 is not accepted"]),
}


def digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_user_error(case, world):
    make_args, fragments = CASES[case]
    protected = world["root"] / "runs"
    before = digest(protected)
    args = make_args(world)
    args, env = args if isinstance(args, tuple) else (args, None)
    result = run_cli(*args, env=env)
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    after = {k: v for k, v in digest(protected).items() if k in before}
    assert after == before, "a failed command altered an existing checkpoint or results file"


def test_command_line_boundary_turns_user_errors_into_one_line(capsys):
    from dq_lightning.errors import UserError, command_line

    @command_line
    def refuses(argv):
        try:
            raise UserError(f"--flag {argv[0]}: not a number")
        except UserError as error:  # wrapped, as jsonargparse wraps the errors of a class's __init__
            raise RuntimeError("could not instantiate") from error

    assert refuses(["abc"]) == 2
    assert capsys.readouterr().err == "error: --flag abc: not a number\n"

    @command_line
    def has_a_bug(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):  # not the user's fault: the traceback stays
        has_a_bug([])
