"""The memory estimate (`dq_lightning.memory`) against the models it describes: exact parameter counts, and the
activation formulas against the tensors autograd really saves, at shapes other than the bart-base ones they were
counted at. The estimate against a measured peak: tests/test_rehearsal.py."""

from __future__ import annotations

import pytest
import torch

from dq_lightning.__main__ import main as dq_main
from dq_lightning.memory import estimate_dq, estimate_teacher, saved_tensor_bytes
from dq_lightning.modules.seq2seq import label_smoothed_loss
from dq_lightning.modules.student import DQStudentModule
from dq_lightning.quant import prepare
from transformers import AutoConfig, AutoModelForSeq2SeqLM

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(vocab: int, b: int, s: int, t: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(5, vocab, (b, s), generator=generator),
            "attention_mask": torch.ones(b, s, dtype=torch.long),
            "labels": torch.randint(5, vocab, (b, t), generator=generator)}


@pytest.fixture(scope="module")
def student(teacher_dir):
    module = DQStudentModule(teacher=str(teacher_dir), bits="2-2-8", depth="4-2")
    prepare(module.model, module.quant_config)
    module.model.train()
    module.log = module.log_dict = lambda *args, **kwargs: None  # no trainer to log to
    return module


def test_parameter_parts_are_the_built_models_counts(student, teacher_dir):
    config = AutoConfig.from_pretrained(teacher_dir)
    estimate = estimate_dq(config, "4-2", "2-2-8", batch_size=2, source_length=40, target_length=12,
                           precision="32-true", devices=2, device="cpu", runtime_bytes=0)
    trainable = {id(p): p.numel() for p in student.model.parameters() if p.requires_grad}
    teacher = {id(p): p.numel() for p in student.factory.teacher.parameters()}
    assert not any(p.requires_grad for p in student.factory.teacher.parameters())
    assert estimate.counts["student_parameters"] == sum(trainable.values())
    assert estimate.counts["teacher_parameters"] == sum(teacher.values())
    assert estimate.parts["student_weights"] == estimate.parts["gradients"] == estimate.parts["ddp_buckets"] \
        == 4 * sum(trainable.values())
    assert estimate.parts["adamw_moments"] == 8 * sum(trainable.values())
    assert estimate.parts["teacher_weights"] == 4 * sum(teacher.values())
    # One float32 copy of every fake-quantized Linear weight is saved for the backward pass.
    counted = saved_tensor_bytes(lambda: student._step(batch(config.vocab_size, 2, 40, 12), "train"),
                                 exclude=[*student.parameters()])
    assert estimate.parts["quantized_weights"] == counted["weight_copies"]
    # Gradients and AdamW's moments as they are after a real step.
    trainable_params = [p for p in student.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable_params, lr=1e-5)
    student._step(batch(config.vocab_size, 2, 40, 12), "train").backward()
    optimizer.step()
    assert sum(p.grad.nbytes for p in trainable_params) == estimate.parts["gradients"]
    moments = [tensor for state in optimizer.state.values() for key, tensor in state.items() if key != "step"]
    assert sum(tensor.nbytes for tensor in moments) == estimate.parts["adamw_moments"]
    student.model.zero_grad(set_to_none=True)
    one = estimate_dq(config, "4-2", "2-2-8", batch_size=2, source_length=40, target_length=12,
                      precision="32-true", devices=1, device="cpu", runtime_bytes=0)
    assert "ddp_buckets" not in one.parts  # one process: no buckets


@pytest.mark.parametrize("b,s,t", [(2, 40, 12), (1, 96, 24), (3, 24, 40)])
def test_dq_activation_formula_counts_what_autograd_saves(student, teacher_dir, b, s, t):
    # Micro shapes (d_model 32, FFN 64 = 2 d_model, 2 heads, 500 tokens): the formula was counted at bart-base's
    # (768, 3072 = 4 d_model, 12 heads, 50,265), so every term's dependence on the shapes is tried.
    config = AutoConfig.from_pretrained(teacher_dir)
    estimate = estimate_dq(config, "4-2", "2-2-8", batch_size=b, source_length=s, target_length=t,
                           precision="32-true", device="cpu", runtime_bytes=0)
    counted = saved_tensor_bytes(lambda: student._step(batch(config.vocab_size, b, s, t), "train"),
                                 exclude=[*student.parameters()])
    assert estimate.parts["activations"] == pytest.approx(counted["activations"], rel=0.03)


@pytest.mark.parametrize("b,s,t", [(2, 40, 12), (1, 96, 24)])
def test_teacher_activation_formula_counts_what_autograd_saves(teacher_dir, b, s, t):
    model = AutoModelForSeq2SeqLM.from_pretrained(teacher_dir, attn_implementation="sdpa", dropout=0.1).train()
    config = model.config
    data = batch(config.vocab_size, b, s, t)

    def forward():
        logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"],
                       decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels=data["labels"])).logits
        label_smoothed_loss(logits, data["labels"], 0.1)

    estimate = estimate_teacher(config, batch_size=b, source_length=s, target_length=t, precision="32-true",
                                device="cpu", runtime_bytes=0)
    counted = saved_tensor_bytes(forward, exclude=[*model.parameters()])
    assert estimate.parts["activations"] == pytest.approx(counted["activations"], rel=0.05)
    assert estimate.counts["teacher_parameters"] == sum({id(p): p.numel() for p in model.parameters()}.values())


def test_memory_command_prints_the_paper_table(capsys):
    assert dq_main(["memory", "--preset", "bart-base", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("bart-base")]
    assert [(row[1], row[-7]) for row in rows] == [("teacher-paper", "6-6"), ("dq-paper", "6-6"), ("dq-paper", "6-3")]
    gib = {row[-7]: float(row[-5]) for row in rows[1:]}  # bf16-mixed GiB of the two DQ depths
    assert gib["6-3"] < gib["6-6"]


def test_memory_command_names_a_bad_preset(capsys):
    assert dq_main(["memory", "--preset", "bart-huge"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "bart-huge" in err[0]


def test_resource_usage_records_each_batch_and_the_peak(teacher_dir, shared_data, cache_dir, tmp_path):
    import json

    import lightning.pytorch as pl

    from dq_lightning.callbacks.resources import ResourceUsage
    from tests.conftest import tiny_xsum_datamodule

    module = DQStudentModule(teacher=str(teacher_dir), bits="2-2-8", depth="2-1",
                             generation={"num_beams": 1, "max_length": 6, "min_length": 1})
    data = tiny_xsum_datamodule(shared_data, cache_dir, teacher_dir, max_source_length=64, max_target_length=16)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                         limit_val_batches=1, val_check_interval=2, num_sanity_val_steps=0,
                         callbacks=[ResourceUsage(str(tmp_path / "usage"), name="probe")])
    trainer.fit(module, datamodule=data)
    record = json.loads((tmp_path / "usage" / "probe-rank0.json").read_text())
    assert (record["start_step"], record["end_step"], record["world_size"]) == (0, 3, 1)
    assert [batch["global_step"] for batch in record["batches"]] == [1, 2, 3]
    assert all(batch["shape"][0] == 4 and batch["shape"][1] <= 64 and batch["shape"][2] <= 16
               for batch in record["batches"])
    assert [v["global_step"] for v in record["validations"]] == [2]
    validation = record["validations"][0]
    assert 0 < record["rss_at_train_start_mib"] <= validation["peak_rss_before_mib"] \
        <= validation["peak_rss_after_mib"] <= record["peak_rss_mib"]
