"""The mBART path of wmt16_en_ro with a trained BPE: language codes as tokens, mBART's layout of sources and
targets, the decoder started at the target code, and `predict` laying sources out as training did."""

from __future__ import annotations

import pytest
import torch

from dq_lightning.data.datamodule import WMT16EnRoDataModule
from dq_lightning.export.predict import encode_sources
from dq_lightning.models.loading import load_or_build_model
from dq_lightning.models.tokenizer import language_ids
from dq_lightning.modules.seq2seq import mbart_generation_settings


@pytest.fixture(scope="module")
def en_ro(shared_data, cache_dir):
    data = WMT16EnRoDataModule(data_dir=str(shared_data / "wmt16_en_ro"), vocab_size=500, max_train_samples=200,
                               max_eval_samples=8, max_source_length=24, max_target_length=24,
                               cache_dir=str(cache_dir))
    data.setup("fit")
    return data


def test_trained_bpe_holds_the_language_codes_as_single_special_tokens(en_ro):
    tokenizer = en_ro.tokenizer
    en, ro = language_ids(tokenizer, "en_XX", "ro_RO")
    assert tokenizer.convert_ids_to_tokens([en, ro]) == ["en_XX", "ro_RO"]
    text = tokenizer.decode([tokenizer.bos_token_id, en, *tokenizer("casa mare", add_special_tokens=False)["input_ids"],
                             ro, tokenizer.eos_token_id], skip_special_tokens=True)
    assert text.strip() == "casa mare"


def test_sources_and_targets_are_laid_out_as_mbart_lays_them(en_ro):
    tokenizer, (en, ro) = en_ro.tokenizer, language_ids(en_ro.tokenizer, "en_XX", "ro_RO")
    for row in en_ro.datasets["validation"]:
        source, labels = row["input_ids"], row["labels"]
        assert source[-2:] == [tokenizer.eos_token_id, en] and tokenizer.bos_token_id not in source
        assert labels[-2:] == [tokenizer.eos_token_id, ro] and tokenizer.bos_token_id not in labels
        assert len(row["attention_mask"]) == len(source) <= 24 and len(labels) <= 24  # truncation still holds
    reference = en_ro.references("validation")[0]
    decoded = tokenizer.decode(en_ro.datasets["validation"][0]["labels"], skip_special_tokens=True)
    assert reference.startswith(decoded.strip())


def test_an_mbart_model_trains_and_generates_from_the_target_code_and_bart_keeps_its_start(en_ro):
    tokenizer, (_, ro) = en_ro.tokenizer, language_ids(en_ro.tokenizer, "en_XX", "ro_RO")
    mbart = load_or_build_model("micro-mbart", tokenizer)
    bart = load_or_build_model("micro", tokenizer)
    labels = torch.tensor([en_ro.datasets["validation"][0]["labels"]])
    # Training (mBART's shift_tokens_right) and generation start the decoder on the same token.
    assert mbart.prepare_decoder_input_ids_from_labels(labels=labels)[0, 0] == ro
    en = language_ids(tokenizer, "en_XX", "ro_RO")[0]
    # ... and a language code is never written: it is not part of a translation.
    assert mbart_generation_settings(mbart, tokenizer, "en_XX", "ro_RO") == {"decoder_start_token_id": ro,
                                                                             "suppress_tokens": sorted([en, ro])}
    assert bart.prepare_decoder_input_ids_from_labels(labels=labels)[0, 0] == tokenizer.eos_token_id
    assert mbart_generation_settings(bart, tokenizer, "en_XX", "ro_RO") == {}
    assert mbart_generation_settings(mbart, tokenizer, None, None) == {}


def test_predict_encodes_sources_exactly_as_training_did(en_ro, shared_data):
    texts = [row["translation"]["en"] for row in en_ro.load_raw(("validation",))["validation"].select(range(3))]
    batch = encode_sources(en_ro.tokenizer, texts, 24, {"source_lang": "en_XX", "target_lang": "ro_RO"})
    for i, row in enumerate(en_ro.datasets["validation"].select(range(3))):
        length = int(batch["attention_mask"][i].sum())
        assert batch["input_ids"][i, :length].tolist() == row["input_ids"]
    plain = encode_sources(en_ro.tokenizer, texts, 24, {})
    assert plain["input_ids"][0, 0] == en_ro.tokenizer.bos_token_id  # no languages named: BART's layout


def test_tokenizers_of_other_tasks_have_no_language_codes(teacher_dir):
    from dq_lightning.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(teacher_dir))
    assert language_ids(tokenizer, "en_XX", "ro_RO") is None
    assert "en_XX" not in tokenizer.get_vocab()
