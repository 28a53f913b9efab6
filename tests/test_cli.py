"""The command line as users run it: fresh processes, real files, real exit codes."""

import json

import pytest
import yaml
import torch
from transformers import AutoModelForSeq2SeqLM

from dq_lightning.evaluation.per_example import corpus_score, read_predictions
from dq_lightning.export.predict import load_model, source_length
from tests.conftest import run_cli

XSUM_TINY = "experiments/xsum/teacher-tiny.yaml"
QUICK = ["--model.model=micro", "--data.vocab_size=500", "--data.max_train_samples=16", "--data.max_eval_samples=4",
         "--data.max_source_length=64", "--data.max_target_length=16", "--data.batch_size=4",
         "--model.generation={num_beams: 2, max_length: 12, min_length: 2}", "--trainer.max_epochs=2",
         "--trainer.check_val_every_n_epoch=1",
         "--trainer.logger=false", "--trainer.enable_progress_bar=false"]


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


def test_fit_then_test_end_to_end(shared_data, cache_dir, tmp_path):
    root = tmp_path / "teacher"
    common = [f"--data.data_dir={shared_data / 'xsum'}", f"--data.cache_dir={cache_dir}",
              f"--trainer.default_root_dir={root}", *QUICK]
    fit = run_cli("fit", "--config", XSUM_TINY, *common)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert (root / "checkpoints" / "last.ckpt").exists()
    hf_dir = root / "hf"
    info = json.loads((hf_dir / "dq_lightning.json").read_text())
    assert info["task"] == "xsum" and "val/rougeL" in info
    # predict and robustness truncate its sources as it was trained (--data.max_source_length=64)
    model, _, task = load_model(str(hf_dir), False, None)
    assert info["max_source_length"] == 64 and source_length(model, task, None) == 64

    # The exported teacher is a standard Hugging Face directory that generates.
    model = AutoModelForSeq2SeqLM.from_pretrained(hf_dir)
    assert model.config.encoder_layers == 2
    assert model.generation_config.num_beams == 2
    out = model.generate(torch.tensor([[0, 100, 200, 2]]), max_length=6)
    assert out[0, 0].item() == model.config.decoder_start_token_id and out.shape[1] >= 2
    assert int(out.max()) < model.config.vocab_size

    # A second run in the same directory starts over only when asked to, and moves the first run aside.
    again = run_cli("fit", "--config", XSUM_TINY, *common, "--trainer.max_epochs=1", "--replace_run=true")
    assert again.returncode == 0, again.stderr[-3000:]
    assert [p.name.split(".replaced-")[0] for p in tmp_path.iterdir() if ".replaced-" in p.name] == ["teacher"]

    # The test logs to W&B (offline) too: the per-example table goes there.
    with_wandb = [arg for arg in common if arg != "--trainer.logger=false"]
    test = run_cli("test", "--config", XSUM_TINY, *with_wandb, f"--model.model={hf_dir}", f"--data.tokenizer={hf_dir}",
                   env={"WANDB_MODE": "offline"})
    assert test.returncode == 0, test.stderr[-3000:]
    for key in ("test/rouge1", "test/rouge2", "test/rougeL", "test/rougeLsum", "test/loss"):
        assert key in test.stdout, test.stdout

    # Every test example once, with its own scores; together they give the logged corpus scores.
    rows = read_predictions(root / "test_predictions.jsonl", "rougeL")
    test_rows = [json.loads(line) for line in (shared_data / "xsum" / "test.jsonl").read_text().splitlines()][:4]
    assert [row["index"] for row in rows] == [0, 1, 2, 3]
    assert [row.get("id") for row in rows] == [str(row["id"]) if "id" in row else None for row in test_rows]
    assert all(row["prediction"] and row["reference"] and row["source"] for row in rows)
    logged = json.loads((root / "test_metrics.json").read_text())
    assert logged["predictions"] == "test_predictions.jsonl" and logged["test_examples"] == 4
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert corpus_score(rows, key) == pytest.approx(logged["metrics"][f"test/{key}"], abs=1e-3)
    tables = list((root / "wandb").glob("offline-run-*/files/media/table/test/predictions_*.table.json"))
    assert tables, sorted(str(p) for p in (root / "wandb").rglob("*.json"))
    table = json.loads(tables[0].read_text())
    assert table["columns"][:5] == ["index", "id", "source", "reference", "prediction"] and len(table["data"]) == 4


def test_override_and_print_config():
    result = run_cli("fit", "--config", XSUM_TINY, "--model.lr=3e-5", "--print_config")
    assert result.returncode == 0, result.stderr
    assert "lr: 3.0e-05" in result.stdout


def test_a_printed_config_is_complete_and_runs_from_any_folder(tmp_path):
    """`base:` paths are relative to the file that names them: a printed config holding them would read its
    bases next to wherever it was saved. It is the merged result, naming none, and reads back as itself."""
    printed = run_cli("fit", "--config", XSUM_TINY, "--model.lr=3e-5", "--print_config")
    assert printed.returncode == 0, printed.stderr
    assert yaml.safe_load(printed.stdout)["base"] is None
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "printed.yaml").write_text(printed.stdout)
    again = run_cli("fit", "--config", "printed.yaml", "--print_config", cwd=elsewhere)
    assert again.returncode == 0, again.stderr
    assert yaml.safe_load(again.stdout) == yaml.safe_load(printed.stdout)
    bad = run_cli("fit", "--config", XSUM_TINY, "--print_config=bogus")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --print_config=bogus")


@pytest.mark.slow  # two training processes: `make test-slow`
@pytest.mark.timeout(900)
def test_ddp_two_processes_on_cpu(shared_data, cache_dir, tmp_path):
    root = tmp_path / "ddp"
    quick = [arg for arg in QUICK if arg != "--trainer.logger=false"]
    result = run_cli("fit", "--config", XSUM_TINY, f"--data.data_dir={shared_data / 'xsum'}",
                     f"--data.cache_dir={cache_dir}", f"--trainer.default_root_dir={root}", *quick,
                     "--trainer.max_epochs=1", "--trainer.devices=2", "--trainer.strategy=ddp",
                     "--trainer.callbacks+=tests.ddp_probe.WeightsDigest",
                     f"--trainer.callbacks.out_dir={root / 'digests'}", env={"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MEMBER: 2/2" in result.stderr + result.stdout
    # One W&B run (rank 0 only), one set of checkpoints, the same weights on both ranks.
    assert len(list((root / "wandb").glob("offline-run-*"))) == 1
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    assert (root / "hf" / "model.safetensors").exists()
    digests = {p.name: p.read_text() for p in (root / "digests").iterdir()}
    assert len(digests) == 2 and len(set(digests.values())) == 1


def test_unknown_command():
    result = run_cli("train")
    assert result.returncode == 2 and "unknown command 'train'" in result.stderr


def test_student_help_lists_choices_and_the_quant_settings_field_docs():
    """The typed arguments reach --help: Literal choices, and each QuantSettings field with its docstring."""
    result = run_cli("fit", "--model.help", "dq_lightning.modules.student.DQStudentModule")
    assert result.returncode == 0, result.stderr[-2000:]
    text = " ".join(result.stdout.split())
    assert "--model.mode {dq,quant_only,distill_only}" in text
    assert "--model.recipe {dq-bart,dq_lightning}" in text
    assert "--model.quant_settings.act_clip ACT_CLIP Activations are clipped to +-act_clip" in text
    assert "--model.quant_settings.act_method" in text and "lsq (learned step size)" in text
