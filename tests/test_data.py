import json

import pytest
import torch

from dq_lightning.data.datamodule import DATAMODULES, DemoDataModule
from dq_lightning.data.demo_corpus import build_examples, split_of
from dq_lightning.errors import UserError

# task -> (source column, target column) as in the Hub datasets and ../shared/data
COLUMNS = {"xsum": ("document", "summary"), "cnn_dailymail": ("article", "highlights"),
           "eli5": ("question", "answer"), "wmt16_en_ro": ("translation.en", "translation.ro")}


def first_row(path):
    with open(path) as lines:
        return json.loads(next(lines))


@pytest.mark.parametrize("task", sorted(COLUMNS))
def test_datamodule_reads_shared_data(task, shared_data, cache_dir):
    module = DATAMODULES[task](data_dir=str(shared_data / task), vocab_size=1000, max_source_length=64,
                               max_target_length=24, batch_size=4, cache_dir=str(cache_dir))
    module.prepare_data()
    module.setup("fit")
    assert len(module.datasets["train"]) == sum(1 for _ in open(shared_data / task / "train.jsonl"))

    batch = next(iter(module.val_dataloader()))
    assert set(batch) >= {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 64
    assert batch["labels"].shape[1] <= 24
    assert batch["input_ids"].shape[1] % 8 == 0  # padded to a multiple of 8

    # Padding: the attention mask is 0 exactly at pad tokens; label padding is -100, never the pad id.
    tokenizer = module.tokenizer
    assert torch.equal(batch["attention_mask"] == 0, batch["input_ids"] == tokenizer.pad_token_id)
    assert not (batch["labels"] == tokenizer.pad_token_id).any()
    lengths = (batch["labels"] != -100).sum(dim=1)
    if lengths.min() < batch["labels"].shape[1]:
        assert (batch["labels"] == -100).any()
    for row in batch["labels"]:  # -100 only as a suffix
        kept = (row != -100).nonzero().flatten()
        assert torch.equal(kept, torch.arange(len(kept)))

    # Column mapping: the first validation example is that row's source and target text.
    source_column, target_column = COLUMNS[task]
    record = first_row(shared_data / task / "validation.jsonl")
    source, target = record, record
    for part in source_column.split("."):
        source = source[part]
    for part in target_column.split("."):
        target = target[part]
    labels = batch["labels"][0][batch["labels"][0] != -100]
    decoded_target = tokenizer.decode(labels, skip_special_tokens=True)
    decoded_source = tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True)
    assert target.startswith(decoded_target.strip()[:40])
    assert source.startswith(decoded_source.strip()[:40])


def test_max_samples_limits_rows(shared_data, cache_dir):
    module = DATAMODULES["xsum"](data_dir=str(shared_data / "xsum"), vocab_size=1000, max_train_samples=10,
                                 max_eval_samples=3, cache_dir=str(cache_dir))
    module.setup("fit")
    assert len(module.datasets["train"]) == 10 and len(module.datasets["validation"]) == 3
    # max_val_samples limits validation only: the test split keeps max_eval_samples
    module = DATAMODULES["xsum"](data_dir=str(shared_data / "xsum"), vocab_size=1000, max_val_samples=2,
                                 max_eval_samples=5, cache_dir=str(cache_dir))
    module.setup()
    assert len(module.datasets["validation"]) == 2 and len(module.datasets["test"]) == 5


def test_batches_name_their_rows(shared_data, cache_dir):
    module = DATAMODULES["xsum"](data_dir=str(shared_data / "xsum"), vocab_size=1000, batch_size=4,
                                 cache_dir=str(cache_dir))
    module.setup("test")
    indices = torch.cat([batch["example_index"] for batch in module.test_dataloader()]).tolist()
    assert indices == list(range(len(module.datasets["test"])))
    ids = module.example_ids("test")
    assert ids[0] == str(first_row(shared_data / "xsum" / "test.jsonl")["id"])


def test_test_file_replaces_the_test_split(shared_data, cache_dir, tmp_path):
    rows = [json.loads(line) for line in open(shared_data / "xsum" / "validation.jsonl")][:7]
    other = tmp_path / "other_test.jsonl"
    other.write_text("".join(json.dumps(row) + "\n" for row in rows))
    module = DATAMODULES["xsum"](data_dir=str(shared_data / "xsum"), vocab_size=1000, test_file=str(other),
                                 cache_dir=str(cache_dir))
    module.setup("test")
    assert len(module.datasets["test"]) == 7
    assert module.references("test")[0] == rows[0]["summary"]
    assert module.example_ids("test") == [str(row["id"]) for row in rows]


@pytest.mark.parametrize("content, expected", [
    ('{"id": "1", "document": "text"}\n', "other_test.jsonl:1: missing column 'summary'"),
    ('{"id": "1", "document": "a", "summary": "b"}\n{"id": 2,\n', "other_test.jsonl:2: malformed JSON"),
    (None, "--data.test_file=.*other_test.jsonl: no such file"),
])
def test_bad_test_file_is_named(content, expected, shared_data, cache_dir, tmp_path):
    other = tmp_path / "other_test.jsonl"
    if content is not None:
        other.write_text(content)
    module = DATAMODULES["xsum"](data_dir=str(shared_data / "xsum"), vocab_size=1000, test_file=str(other),
                                 cache_dir=str(cache_dir))
    with pytest.raises(UserError, match=expected):
        module.setup("test")


def test_pretrained_tokenizer_from_directory(shared_data, bart_tokenizer_dir, cache_dir):
    module = DATAMODULES["xsum"](data_dir=str(shared_data / "xsum"), tokenizer=str(bart_tokenizer_dir),
                                 max_eval_samples=2, cache_dir=str(cache_dir))
    module.setup("validate")
    assert len(module.tokenizer) == 50265
    assert module.tokenizer("Hello world").input_ids == [0, 31414, 232, 2]


def test_demo_corpus_is_real_docstrings_with_stable_splits():
    examples = build_examples()
    assert len(examples) > 1000
    by_id = {example["id"]: example for example in examples}
    join = by_id["builtins.str.join"]
    assert join["summary"] == "Concatenate any number of strings."
    assert join["document"].startswith("builtins.str.join. ")
    assert join["summary"] not in join["document"]
    assert all(split_of(example["id"]) == split_of(example["id"]) for example in examples[:50])
    shares = {split: sum(split_of(e["id"]) == split for e in examples) / len(examples)
              for split in ("train", "validation", "test")}
    assert 0.75 < shares["train"] < 0.85 and shares["validation"] > 0.05 and shares["test"] > 0.05


def test_demo_datamodule_needs_no_data_dir(cache_dir):
    module = DemoDataModule(vocab_size=1000, max_train_samples=16, max_eval_samples=4, batch_size=4,
                            cache_dir=str(cache_dir))
    module.setup("fit")
    assert (cache_dir / "demo").is_dir()
    batch = next(iter(module.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4


@pytest.mark.parametrize("case, expected", [
    ("missing_dir", "data.data_dir="),
    ("missing_split", "missing validation.jsonl"),
    ("malformed", "validation.jsonl:2: malformed JSON"),
    ("missing_column", "train.jsonl:1: missing column 'summary'"),
    ("empty", "validation.jsonl: split is empty"),
])
def test_bad_local_data_is_named(case, expected, tmp_path, cache_dir):
    from tests.conftest import write_jsonl

    good = {"id": "1", "document": "A document. It has text.", "summary": "A summary."}
    data_dir = tmp_path / "data"
    write_jsonl(data_dir / "train.jsonl", [good] * 3)
    write_jsonl(data_dir / "validation.jsonl", [good] * 3)
    if case == "missing_dir":
        data_dir = tmp_path / "nowhere"
    elif case == "missing_split":
        (data_dir / "validation.jsonl").unlink()
    elif case == "malformed":
        write_jsonl(data_dir / "validation.jsonl", [good, '{"id": "2", "document": "unterminated'])
    elif case == "missing_column":
        write_jsonl(data_dir / "train.jsonl", [{"id": "1", "document": "text"}])
    elif case == "empty":
        (data_dir / "validation.jsonl").write_text("\n")
    module = DATAMODULES["xsum"](data_dir=str(data_dir), vocab_size=300, cache_dir=str(cache_dir))
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        module.setup("fit")


def test_restored_position_reaches_the_copy_lightning_builds_for_ddp():
    # Under DDP Lightning iterates a copy of the train loader with a DistributedSampler, built from the
    # arguments the original was given: a restored skip must reach that copy, and what the copy hands out is
    # what the original (the one the DataModule saves) reports.
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import DistributedSampler

    from dq_lightning.data.loader import LoaderCursor, ResumableDataLoader

    rows = list(range(40))

    def built_as_the_datamodule_does():
        generator = torch.Generator().manual_seed(7)
        return ResumableDataLoader(rows, batch_size=4, shuffle=True, generator=generator, cursor=LoaderCursor())

    def ddp_copy(loader):
        sampler = DistributedSampler(rows, num_replicas=2, rank=1, shuffle=True, seed=3)
        sampler.set_epoch(2)
        return _update_dataloader(loader, sampler)

    uninterrupted = [batch.tolist() for batch in ddp_copy(built_as_the_datamodule_does())]
    assert len(uninterrupted) == 5  # 40 rows / 2 ranks / batch 4

    original = built_as_the_datamodule_does()
    copy = ddp_copy(original)
    batches = iter(copy)
    seen = [next(batches).tolist() for _ in range(3)]
    saved = original.position()
    assert saved["batches"] == 3 and seen == uninterrupted[:3]

    resumed = built_as_the_datamodule_does()
    resumed.restore_position(saved)
    assert [batch.tolist() for batch in ddp_copy(resumed)] == uninterrupted[3:]
    assert resumed.position()["batches"] == 0  # a finished pass: the next one starts from the top
