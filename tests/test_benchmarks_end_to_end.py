"""Every benchmark's whole path on a few real rows, through the shipped configs as a user runs them: teacher fit,
DQ student fit (and its test), export, predict. wmt16_en_ro goes through mBART: the outputs must be
Romanian-tagged (an mBART model whose decoder starts at ro_RO, the codes never in the text), not English copies
of the sources. Whether the words are Romanian depends on training far longer than a test can: the closing
measurement of `make teacher TASK=wmt16_en_ro` says that."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

QUICK_DATA = ["--data.max_train_samples=48", "--data.max_eval_samples=4", "--data.max_source_length=64",
              "--data.max_target_length=24", "--data.batch_size=8", "--trainer.logger=false",
              "--trainer.enable_progress_bar=false"]
MODEL = {"cnn_dailymail": "micro", "eli5": "micro", "wmt16_en_ro": "micro-mbart"}
METRIC = {"cnn_dailymail": "rougeL", "eli5": "rougeL", "wmt16_en_ro": "bleu"}


@pytest.mark.slow  # three tasks x (teacher fit, student fit, export, predict): about 3 minutes
@pytest.mark.timeout(900)
@pytest.mark.parametrize("task", ["cnn_dailymail", "eli5", "wmt16_en_ro"])
def test_teacher_student_export_predict(task, shared_data, cache_dir, tmp_path):
    data = [f"--data.data_dir={shared_data / task}", f"--data.cache_dir={cache_dir}"]
    generation = "--model.generation={num_beams: 2, max_length: 16, min_length: 2}"
    teacher = run_cli("fit", "--config", f"experiments/{task}/teacher-tiny.yaml", *data, *QUICK_DATA, generation,
                      f"--model.model={MODEL[task]}", "--data.vocab_size=600", "--trainer.max_epochs=4",
                      "--trainer.check_val_every_n_epoch=4", f"--trainer.default_root_dir={tmp_path / 'teacher'}")
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    teacher_hf = tmp_path / "teacher" / "hf"
    student = run_cli("fit", "--config", f"experiments/{task}/dq-tiny.yaml", *data, *QUICK_DATA, generation,
                      f"--model.teacher={teacher_hf}", "--model.bits=2-2-8", "--model.depth=2-1",
                      "--trainer.max_epochs=1", f"--trainer.default_root_dir={tmp_path / 'student'}")
    assert student.returncode == 0, student.stderr[-3000:]
    tested = json.loads((tmp_path / "student" / "test_metrics.json").read_text())
    assert f"test/{METRIC[task]}" in json.dumps(tested)
    export = tmp_path / "export"
    exported = run_cli("export", "--ckpt", str(tmp_path / "student" / "checkpoints" / "last.ckpt"),
                       "--out", str(export))
    assert exported.returncode == 0, exported.stderr[-3000:]

    rows = [json.loads(line) for line in (shared_data / task / "test.jsonl").read_text().splitlines()[:4]]
    column = {"cnn_dailymail": "article", "eli5": "question"}.get(task)
    sources = [row["translation"]["en"] if column is None else row[column] for row in rows]
    (tmp_path / "in.txt").write_text("".join(" ".join(source.split()) + "\n" for source in sources))
    for model in (teacher_hf, export):
        predicted = run_cli("predict", "--model", str(model), "--input", str(tmp_path / "in.txt"), "--no-progress")
        assert predicted.returncode == 0, predicted.stderr[-3000:]
        outputs = predicted.stdout.splitlines()
        assert len(outputs) == len(sources) and all(output.strip() for output in outputs)
        assert not any(code in output for output in outputs for code in ("en_XX", "ro_RO", "<s>", "</s>"))
        if task != "wmt16_en_ro":
            continue
        config = json.loads((model / "config.json").read_text())
        generation = json.loads((model / "generation_config.json").read_text())
        vocab = json.loads((model / "tokenizer.json").read_text())["model"]["vocab"]
        assert config["model_type"] == "mbart" and generation["decoder_start_token_id"] == vocab["ro_RO"]
        assert {vocab["en_XX"], vocab["ro_RO"]} <= set(generation["suppress_tokens"])
        assert not any(output.split() == source.split() for output, source in zip(outputs, sources))
