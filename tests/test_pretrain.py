"""The CPU-scale teacher's pre-training stage: denoising pairs and the encoder auxiliary loss."""

import pytest
import torch

from dq_lightning.errors import UserError
from dq_lightning.pretrain.datamodule import DenoisingDataModule
from dq_lightning.modules.teacher import TeacherModule


@pytest.fixture(scope="module")
def denoising(shared_data, cache_dir):
    module = DenoisingDataModule(task="xsum", data_dir=str(shared_data / "xsum"), vocab_size=500,
                                 max_train_samples=12, max_eval_samples=4, chunk_tokens=64, min_chunk_tokens=16,
                                 extra_text=[f"{shared_data / 'wmt16_en_ro' / 'validation.jsonl'}:translation.en"],
                                 batch_size=4, cache_dir=str(cache_dir))
    module.setup("fit")
    return module


def test_infilling_pairs_reconstruct_a_chunk_of_real_text(denoising):
    tokenizer = denoising.tokenizer
    train = denoising.datasets["train"]
    with open(denoising.hparams.extra_text[0].rsplit(":", 1)[0], "rb") as rows:
        extra = sum(1 for line in rows if line.strip())
    assert len(train) == 12 + extra  # the task's 12 documents and one per extra English sentence
    for index in range(6):
        example = train[index]
        source, target = example["input_ids"], example["labels"]
        assert source[0] == tokenizer.bos_token_id and target[-1] == tokenizer.eos_token_id
        assert len(target) <= 64 and tokenizer.mask_token_id in source
        clean = tokenizer.decode(target, skip_special_tokens=True).strip()
        assert clean and clean.split()[0] in " ".join(train.documents[index])


def test_noise_is_fresh_each_epoch_and_reproducible(denoising):
    train = denoising.datasets["train"]
    first = train[0]["input_ids"]
    assert train[0]["input_ids"] == first  # same epoch, same example: same noise
    train.fixed_epoch = 1
    try:
        assert train[0]["input_ids"] != first
    finally:
        train.fixed_epoch = None


def test_bad_settings_are_named(shared_data, tmp_path):
    with pytest.raises(UserError, match="data.objectives"):
        DenoisingDataModule(task="xsum", data_dir=str(shared_data / "xsum"), objectives={"shuffle": 1.0})
    with pytest.raises(UserError, match="data.extra_text"):
        DenoisingDataModule(task="xsum", data_dir=str(shared_data / "xsum"), extra_text=[str(tmp_path / "x.jsonl:text")])


@pytest.mark.parametrize("keep", [1.0, 0.0])
def test_lead_objective_takes_the_lead_three(shared_data, cache_dir, keep):
    module = DenoisingDataModule(task="cnn_dailymail", data_dir=str(shared_data / "cnn_dailymail"), vocab_size=500,
                                 max_train_samples=40, max_eval_samples=2, objectives={"lead": 1.0},
                                 lead_sentences=3, lead_keep_prob=keep, gap_keep_prob=0.5,
                                 max_source_length=1024, max_target_length=1024, cache_dir=str(cache_dir))
    module.setup("fit")
    tokenizer, train = module.tokenizer, module.datasets["train"]
    multi = [index for index in range(len(train)) if len(train.documents[index]) >= 2]
    assert any(len(train.documents[index]) > 3 for index in multi)  # the full lead-3 case is exercised
    for index in multi:
        sentences = train.documents[index]
        lead = sentences[:min(3, len(sentences) - 1)]  # a short document keeps one sentence in the source
        example = train[index]
        source = tokenizer.decode(example["input_ids"], skip_special_tokens=False)
        target = tokenizer.decode(example["labels"], skip_special_tokens=True)
        expected = tokenizer(text_target=" ".join(lead), max_length=1024, truncation=True)["input_ids"]
        assert target.strip() == tokenizer.decode(expected, skip_special_tokens=True).strip()
        masks = source.count(tokenizer.mask_token)
        if keep == 1.0:  # "copy the lead": the target is in the source, nothing masked
            opening = target.split()[:8]
            assert masks == 0 and source.replace("<s>", "").split()[:len(opening)] == opening
        else:
            assert masks == len(lead) and sentences[len(lead)].split()[0] in source


@pytest.mark.parametrize("setting, flag", [({"lead_sentences": 0}, "data.lead_sentences"),
                                           ({"lead_sentences": 2.5}, "data.lead_sentences"),
                                           ({"lead_keep_prob": 1.5}, "data.lead_keep_prob"),
                                           ({"gap_keep_prob": -0.1}, "data.gap_keep_prob"),
                                           ({"gap_keep_prob": "often"}, "data.gap_keep_prob")])
def test_bad_lead_and_gap_settings_are_named(shared_data, setting, flag):
    with pytest.raises(UserError, match=flag.replace(".", r"\.")):
        DenoisingDataModule(task="cnn_dailymail", data_dir=str(shared_data / "cnn_dailymail"), **setting)


def test_encoder_auxiliary_loss_is_added_and_trains_the_encoder(denoising):
    batch = next(iter(denoising.train_dataloader()))
    losses = {}
    for weight in (0.0, 0.5):
        torch.manual_seed(0)
        module = TeacherModule(model="micro", encoder_aux_weight=weight, dropout=0.0)
        module.attach(denoising.tokenizer, denoising.task)
        loss = module._step(batch, "train")
        losses[weight] = loss.item()
        if weight:
            loss.backward()
            encoder_grad = module.model.model.encoder.layers[0].fc1.weight.grad
            assert encoder_grad is not None and encoder_grad.abs().sum() > 0
            assert module.last_loss_terms["encoder_aux"] > 0
    # the auxiliary term is a token-level cross-entropy (~log V at init), weighted 0.5
    assert losses[0.5] - losses[0.0] == pytest.approx(0.5 * module.last_loss_terms["encoder_aux"].item(), rel=1e-4)


def test_fine_tuning_a_saved_model_trains_with_dropout(teacher_dir):
    """from_pretrained returns eval mode and Lightning keeps it: the teacher must switch dropout back on."""
    from transformers import BartTokenizer

    module = TeacherModule(model=str(teacher_dir), dropout=0.3)
    model = module.build_model(BartTokenizer.from_pretrained(str(teacher_dir)))
    assert model.config.dropout == 0.3
    assert all(submodule.training for submodule in model.modules())


def test_demo_task_pretrains_on_its_generated_corpus(cache_dir):
    """The demo has no files to point at: its docstring corpus is generated, as for fine-tuning."""
    module = DenoisingDataModule(task="demo", vocab_size=500, max_train_samples=8, max_eval_samples=4,
                                 chunk_tokens=32, batch_size=4, cache_dir=str(cache_dir))
    module.setup("fit")
    example = module.datasets["train"][0]
    assert module.tokenizer.mask_token_id in example["input_ids"] and len(example["labels"]) > 2
    assert len(module.datasets["validation"]) == 4
