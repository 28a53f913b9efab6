"""DQStudentModule on a micro teacher built from scratch (never downloaded)."""

import json

import lightning.pytorch as pl
import pytest
import torch

from dq_lightning.modules.student import DQStudentModule
from dq_lightning.errors import UserError
from dq_lightning.quant import is_converted, is_prepared
from tests.conftest import run_cli, tiny_xsum_datamodule

DQ_XSUM = "experiments/xsum/dq-tiny.yaml"


def datamodule(shared_data, cache_dir, teacher_dir, **kwargs):
    return tiny_xsum_datamodule(shared_data, cache_dir, teacher_dir,
                                **{"max_source_length": 64, "max_target_length": 16, **kwargs})


def trainer(tmp_path, **kwargs):
    settings = dict(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=str(tmp_path), limit_val_batches=1,
                    num_sanity_val_steps=0)
    return pl.Trainer(**{**settings, **kwargs})


QUICK_GENERATION = {"num_beams": 1, "max_length": 6, "min_length": 1}


def test_full_depth_full_precision_student_is_the_teacher(teacher_dir, shared_data, cache_dir, tmp_path):
    module = DQStudentModule(teacher=str(teacher_dir), mode="distill_only", generation=QUICK_GENERATION)
    data = datamodule(shared_data, cache_dir, teacher_dir)
    results = trainer(tmp_path).validate(module, datamodule=data)[0]
    for term in ("logits", "hidden", "attention"):
        assert results[f"val/loss_{term}"] == 0.0, term
    assert results["val/label_loyalty"] == 1.0
    assert results["val/prob_loyalty"] == pytest.approx(1.0, abs=1e-3)
    assert results["val/compression"] == pytest.approx(1.0)


def test_attention_and_hidden_losses_are_nonzero_for_a_quantized_shallow_student(teacher_dir, shared_data,
                                                                                 cache_dir, tmp_path):
    module = DQStudentModule(teacher=str(teacher_dir), mode="dq", bits="2-2-8", depth="4-2",
                             generation=QUICK_GENERATION)
    results = trainer(tmp_path).validate(module, datamodule=datamodule(shared_data, cache_dir, teacher_dir))[0]
    assert module.decoder_map == [0, 3]
    for term in ("logits", "hidden", "attention"):
        assert results[f"val/loss_{term}"] > 0.0, term
    assert results["val/label_loyalty"] < 1.0
    assert results["val/compression"] > 4.0


@pytest.mark.parametrize("mode", ["dq", "quant_only", "distill_only"])
def test_fit_trains_the_student_only(mode, teacher_dir, shared_data, cache_dir, tmp_path):
    module = DQStudentModule(teacher=str(teacher_dir), mode=mode, bits="2-8-8", depth="2-1", lr=1e-2,
                             generation=QUICK_GENERATION)
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in module.model.state_dict().items()}
    fit = trainer(tmp_path, max_steps=3, enable_checkpointing=True)
    fit.fit(module, datamodule=datamodule(shared_data, cache_dir, teacher_dir))

    teacher_after = module.teacher.state_dict()
    assert all(torch.equal(teacher_before[k], teacher_after[k]) for k in teacher_before)
    assert all(not p.requires_grad for p in module.teacher.parameters())
    assert not module.teacher.training
    optimized = {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in module.teacher.parameters()}
    changed = [k for k, v in module.model.state_dict().items() if k in student_before
               and v.dtype.is_floating_point and not torch.equal(v, student_before[k])]
    assert changed, "the student did not learn"
    assert is_prepared(module.model) == (mode != "distill_only")
    assert is_converted(module.model) == (mode != "distill_only")  # converted when fit ends

    checkpoint = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=True, map_location="cpu")
    keys = list(checkpoint["state_dict"])
    assert keys and all(key.startswith(("model.", "val_", "test_")) for key in keys)
    assert not any(key.startswith(("teacher", "_teacher")) for key in keys)
    assert not any(".layers.2." in key or ".layers.3." in key for key in keys)  # only 2 encoder layers kept


@pytest.mark.parametrize("settings, message", [
    ({"depth": "4-6"}, r"model.depth \(decoder\): a student of 6 layers"),
    ({"shape": {"decoder_layer_map": [0, 5]}, "depth": "4-2"}, "layer 5 is outside the teacher's 4 layers"),
    ({"shape": {"encoder_layer_map": [0, 1, 2]}},
     "model.shape.encoder_layer_map=[0, 1, 2] has 3 entries but the student has 4"),
    ({"bits": "5-2-8"}, "w_bits"),
    ({"shape": {"width_hidden": "both"}}, "model.shape.width_hidden='both'"),
    ({"objective": {"task_weight": -1}}, "model.objective.task_weight=-1"),
    ({"optimizer": {"weight_decay": -0.1}}, "model.optimizer.weight_decay=-0.1"),
    ({"objective": {"hidden_wieght": 2}}, "model.objective.hidden_wieght: unknown setting"),
    ({"mode": "prune"}, "model.mode='prune'"),
])
def test_bad_student_settings_name_the_setting(settings, message, teacher_dir):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        DQStudentModule(teacher=str(teacher_dir), **settings)


@pytest.mark.parametrize("settings, expected", [
    ({"mode": "dq", "bits": "2-2-8", "depth": "4-2"}, ("dq", "2-2-8", 4, 2)),
    ({"mode": "dq", "bits": "32-32-32", "depth": "4-1"}, ("distill_only", "32-32-32", 4, 1)),
    ({"mode": "distill_only", "bits": "2-2-8"}, ("distill_only", "32-32-32", 4, 4)),
    ({"mode": "quant_only", "bits": "32-32-32", "depth": "2-2"}, ("quant_only", "32-32-32", 2, 2)),
])
def test_run_summary_names_what_was_actually_trained(settings, expected, teacher_dir):
    summary = DQStudentModule(teacher=str(teacher_dir), **settings).run_summary()
    assert (summary["mode"], summary["bits"], summary["encoder_layers"], summary["decoder_layers"]) == expected
    # The widths travel as numbers, so reports never parse the W-E-A string back.
    assert "-".join(str(summary[key]) for key in ("w_bits", "e_bits", "a_bits")) == expected[1]
    assert summary["width"] == "full"


def test_run_summary_names_a_thinner_students_widths(teacher_dir):
    module = DQStudentModule(teacher=str(teacher_dir), bits="2-2-8", width="0.5", shape={"width_method": "rand"})
    config = module.model.config
    assert module.run_summary()["width"] == (f"heads={config.encoder_attention_heads},ffn={config.encoder_ffn_dim},"
                                             f"d_model={config.d_model} rand")
    assert config.d_model < module.teacher.config.d_model


def test_missing_teacher_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="model.teacher="):
        DQStudentModule(teacher=str(tmp_path / "no_teacher"))


def test_vocabulary_mismatch_is_a_clear_error(teacher_dir, shared_data, cache_dir, tmp_path):
    module = DQStudentModule(teacher=str(teacher_dir), generation=QUICK_GENERATION)
    other = datamodule(shared_data, cache_dir, teacher_dir, tokenizer=None, vocab_size=700,
                       max_train_samples=200).build_tokenizer()
    other.save_pretrained(tmp_path / "other_tokenizer")
    data = datamodule(shared_data, cache_dir, teacher_dir, tokenizer=str(tmp_path / "other_tokenizer"))
    with pytest.raises(UserError, match="data.tokenizer"):
        trainer(tmp_path).validate(module, datamodule=data)


@pytest.mark.slow  # two training processes with a teacher: `make test-slow`
@pytest.mark.timeout(900)
def test_student_ddp_fit_two_processes(teacher_dir, shared_data, cache_dir, tmp_path):
    root = tmp_path / "ddp"
    result = run_cli("fit", "--config", DQ_XSUM, f"--model.teacher={teacher_dir}",
                     f"--data.data_dir={shared_data / 'xsum'}", f"--data.cache_dir={cache_dir}",
                     f"--trainer.default_root_dir={root}", "--model.depth=4-2",
                     "--data.max_train_samples=16", "--data.max_eval_samples=5", "--data.max_source_length=64",
                     "--data.max_target_length=16", "--data.batch_size=4", "--trainer.max_epochs=1",
                     "--model.generation={num_beams: 1, max_length: 6}", "--trainer.logger=false",
                     "--trainer.enable_progress_bar=false", "--trainer.devices=2", "--trainer.strategy=ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MEMBER: 2/2" in result.stderr + result.stdout
    assert (root / "checkpoints" / "last.ckpt").exists()
    # test_after_fit (set in dq-tiny.yaml): the converted student reloaded the latent checkpoint and tested
    assert "test/rougeL" in (root / "test_metrics.json").read_text()
    # 5 test rows over 2 ranks: the sampler repeats one so that both get 3; the file holds each row once.
    rows = [json.loads(line) for line in (root / "test_predictions.jsonl").read_text().splitlines()]
    assert [row["index"] for row in rows] == [0, 1, 2, 3, 4]
