"""QuantizeOnForward on a tiny LightningModule wrapping a micro BART."""

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import BartForConditionalGeneration

from dq_lightning.callbacks.quantize import QuantizeOnForward
from dq_lightning.errors import UserError
from dq_lightning.models.presets import build_config
from dq_lightning.quant import ConvertedLinear, QuantLinear, is_converted, is_prepared
from dq_lightning.distill.recipe import recipe_quant_config

VOCAB = 256


class RandomTokens(Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        return {"input_ids": torch.randint(3, VOCAB, (12,), generator=generator),
                "labels": torch.randint(3, VOCAB, (7,), generator=generator)}


class Student(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.student = BartForConditionalGeneration(build_config("micro", vocab_size=VOCAB, dropout=0.0))
        self.seen: list[tuple[int, bool]] = []
        self.optimized: set[int] = set()

    def training_step(self, batch, batch_idx):
        self.seen.append((self.global_step, self.student.model.encoder.layers[0].fc1.quant_enabled))
        return self.student(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
        self.optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
        return optimizer

    def train_dataloader(self):
        return DataLoader(RandomTokens(), batch_size=4)


def fit(callback: QuantizeOnForward, module: Student | None = None, max_steps: int = 3) -> Student:
    module = module or Student()
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(module)
    module.metrics = dict(trainer.callback_metrics)
    return module


def test_callback_prepares_warms_up_logs_and_converts():
    module = Student()
    fc1_weight = module.student.model.encoder.layers[0].fc1.weight
    before = fc1_weight.detach().clone()
    callback = QuantizeOnForward("2-2-8", warmup_steps=1, log_every_n_steps=2)
    module = fit(callback, module)

    # Full precision during the single warm-up step, quantized afterwards.
    assert module.seen == [(0, False), (1, True), (2, True)]
    # The optimizer was built after prepare and holds the same latent weights as the quantized modules.
    assert id(fc1_weight) in module.optimized
    assert all(id(p) in module.optimized for p in module.student.parameters())
    assert not torch.equal(fc1_weight.detach(), before)
    # Statistics from step 2 (the only quantized step that is a multiple of 2), plus the size, once.
    metrics = module.metrics
    assert metrics["quant/enabled"] == 1.0
    assert 0 < metrics["quant/encoder.layers.0.fc1/a_scale"] <= 2.5 / 127
    assert "quant/encoder.layers.0.fc1/w_clipped_frac" in metrics
    assert 0 <= metrics["quant/act/clipped_frac_max"] <= 1
    assert metrics["quant/compression"] > 1
    # Converted at the end of fit: int8 codes from the trained latent weights.
    assert is_converted(module.student)
    fc1 = module.student.model.encoder.layers[0].fc1
    assert isinstance(fc1, ConvertedLinear) and fc1.packed.codes.dtype == torch.int8


def test_callback_without_conversion_leaves_a_prepared_student_and_aggregates_only():
    callback = QuantizeOnForward(recipe_quant_config("dq_lightning", "8-8-8"), log_every_n_steps=1, per_layer_stats=False,
                                 convert_on_fit_end=False)
    module = fit(callback, max_steps=2)
    assert is_prepared(module.student) and not is_converted(module.student)
    assert isinstance(module.student.model.encoder.layers[0].fc1, QuantLinear)
    assert "quant/weight/scale_mean" in module.metrics
    assert not any(key.startswith("quant/encoder.") for key in module.metrics)


def test_an_already_prepared_student_is_left_alone():
    module = Student()
    callback = QuantizeOnForward("2-2-8", convert_on_fit_end=False, log_every_n_steps=0)
    callback.prepare_student(module)
    fc1 = module.student.model.encoder.layers[0].fc1
    fit(callback, module, max_steps=1)
    assert module.student.model.encoder.layers[0].fc1 is fc1
    other = QuantizeOnForward("8-8-8")
    with pytest.raises(UserError, match="already prepared"):
        other.prepare_student(module)


def test_bad_callback_settings():
    with pytest.raises(UserError, match="warmup_steps=-1"):
        QuantizeOnForward(warmup_steps=-1)
    with pytest.raises(UserError, match="a_bits=5"):
        QuantizeOnForward("2-2-5")
    with pytest.raises(UserError, match="'model'"):
        QuantizeOnForward(student_attr="model").prepare_student(Student())
