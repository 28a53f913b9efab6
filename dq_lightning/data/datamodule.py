"""One LightningDataModule per benchmark, all sharing `Seq2SeqDataModule`.

Raw text comes from the Hub dataset by default or from local `{train,validation,test}.jsonl` files
(`data_dir`). It is tokenized once with `datasets.map`, whose cache makes the second run (and every DDP rank
after the first) skip the work, and batched by `DataCollatorForSeq2Seq` with labels padded by -100 so that
padding never counts in the loss.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import ClassVar

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from dq_lightning.data.jsonl import check_jsonl, get_field
from dq_lightning.data.loader import LoaderCursor, ResumableDataLoader
from dq_lightning.data.tasks import TaskSpec, get_task
from dq_lightning.errors import UserError, first_line
from dq_lightning.models.tokenizer import cached_bpe_tokenizer, encode_texts, language_ids, load_tokenizer

SPLITS = ("train", "validation", "test")
STAGE_SPLITS = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",),
                "predict": ("test",)}
DEFAULT_CACHE_DIR = ".cache/dq_lightning"


_TRUE = ("1", "on", "yes", "true")


def hub_offline() -> str | None:
    """The setting that keeps `datasets` off the Hugging Face Hub (`HF_DATASETS_OFFLINE=1`), or None."""
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return f"{name}={os.environ[name]}"
    return None


def hub_cached(hub_path: str, cache_dir) -> bool:
    """Whether `datasets` holds this Hub dataset under the DataModule's cache (then it loads offline too)."""
    root = Path(cache_dir) / "hub"
    return root.is_dir() and any(root.glob(f"{hub_path.replace('/', '___')}*"))


def _data_dir_hint() -> str:
    # Run from a Makefile recipe, the user sets DATA_DIR, not the flag.
    return " (make: DATA_DIR=DIR)" if os.environ.get("MAKELEVEL") else ""


def check_data_source(task_name: str, data_dir, cache_dir=DEFAULT_CACHE_DIR, splits: dict[str, str] | None = None,
                      test_file=None) -> None:
    """Refuse, before anything is built or written, a data source that cannot work: a `data_dir` that is not a
    directory or lacks a split the command will read (`splits`: split -> why it is read), a `test_file` that
    is not a file, or no `data_dir` while the task's Hub dataset can neither be downloaded (offline) nor read
    from the cache.

    Without this the first sign was `datasets`' ConnectionError traceback from inside `trainer.fit`, or a
    missing test.jsonl found by the test after a whole fit.
    """
    splits = splits or {}
    if test_file is not None and "test" in splits:
        if not Path(str(test_file)).expanduser().is_file():
            raise UserError(f"--data.test_file={test_file}: no such file (read by {splits['test']})")
        splits = {split: why for split, why in splits.items() if split != "test"}
    if data_dir is not None:
        path = Path(str(data_dir)).expanduser()
        if not path.is_dir():
            what = "not a directory" if path.exists() else "no such directory"
            raise UserError(f"--data.data_dir={data_dir}: {what}")
        for split, why in splits.items():
            if not (path / f"{split}.jsonl").is_file():
                raise UserError(f"--data.data_dir={data_dir}: missing {split}.jsonl, which {why} reads")
        return
    task = get_task(task_name)
    if task.hub_path is None or hub_cached(task.hub_path, cache_dir):
        return
    reason = hub_offline()
    if reason:
        raise UserError(f"--data.data_dir is not set, and {task.name}'s Hub dataset {task.hub_path} cannot be "
                        f"downloaded ({reason}): give the folder of train.jsonl, validation.jsonl and test.jsonl "
                        f"with --data.data_dir=DIR{_data_dir_hint()}")


def column_values(batch: dict, column: str) -> list[str]:
    top, _, rest = column.partition(".")
    if not rest:
        return batch[top]
    return [get_field(record, rest) for record in batch[top]]


class Seq2SeqDataModule(pl.LightningDataModule):
    """Source -> target text pairs of one benchmark, tokenized and batched for BART/mBART."""

    task_name: ClassVar[str] = ""

    def __init__(
        self,
        data_dir: str | None = None,
        tokenizer: str | None = None,
        vocab_size: int = 8000,
        max_source_length: int | None = None,
        max_target_length: int | None = None,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        max_val_samples: int | None = None,
        test_file: str | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        cache_dir: str = DEFAULT_CACHE_DIR,
    ):
        """
        Args:
            data_dir: directory of local `train.jsonl`, `validation.jsonl`, `test.jsonl` with the Hub
                dataset's column names; unset loads the dataset from the Hugging Face Hub.
            tokenizer: pretrained tokenizer (Hub id or directory); unset trains a byte-level BPE of
                `vocab_size` tokens on the training split and keeps it under `cache_dir`.
            vocab_size: size of the BPE trained when no `tokenizer` is given.
            max_source_length: source tokens kept (truncation); unset uses the task's default.
            max_target_length: target tokens kept; unset uses the task's default.
            max_train_samples: use only the first N training rows (quick runs).
            max_eval_samples: use only the first N validation and test rows.
            max_val_samples: use only the first N validation rows (overrides max_eval_samples there): model
                selection beam-searches the validation split at every validation, the test split only once.
            test_file: a JSON Lines file read as the test split instead of `data_dir`'s test.jsonl or the Hub's
                (same columns, any size): scores a finished model on another test set without retraining.
            batch_size: training batch size per device.
            eval_batch_size: validation/test batch size per device (default: `batch_size`).
            num_workers: DataLoader worker processes.
            cache_dir: where tokenizers, datasets' caches and generated corpora are kept.
        """
        super().__init__()
        self.save_hyperparameters()
        self.task: TaskSpec = get_task(self.task_name)
        for name, value in (("max_train_samples", max_train_samples), ("max_eval_samples", max_eval_samples),
                            ("max_val_samples", max_val_samples), ("batch_size", batch_size),
                            ("eval_batch_size", eval_batch_size), ("vocab_size", vocab_size),
                            ("max_source_length", max_source_length), ("max_target_length", max_target_length)):
            # 0 is not "unset" (null is): the saved config would record a 0 that meant something else.
            if value is not None and value < 1:
                raise UserError(f"data.{name}={value} must be a positive integer" +
                                ("" if name in ("batch_size", "vocab_size") else "; leave it unset (null) for none"))
        if num_workers < 0:
            raise UserError(f"data.num_workers={num_workers} must be 0 (load in the main process) or more")
        self.data_dir = data_dir
        self.max_source_length = max_source_length or self.task.max_source_length
        self.max_target_length = max_target_length or self.task.max_target_length
        self.cache_dir = Path(cache_dir)
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.datasets: dict = {}
        self._train_loader: ResumableDataLoader | None = None
        self._pending_position: dict | None = None

    # -- raw text -------------------------------------------------------------------------------------
    def local_data_dir(self) -> Path | None:
        """Directory of local split files, or None for the Hub."""
        if self.data_dir is None:
            return None
        check_data_source(self.task.name, self.data_dir, self.cache_dir)
        return Path(self.data_dir).expanduser()

    def load_raw(self, splits: tuple[str, ...]):
        """The raw splits; the test split from `test_file` when it is set."""
        test_file = self.hparams.test_file
        from_file = test_file is not None and "test" in splits
        raw = self._load_source(tuple(split for split in splits if not (from_file and split == "test")))
        if from_file:
            import datasets

            path = Path(test_file).expanduser()
            if not path.is_file():
                raise UserError(f"--data.test_file={test_file}: no such file")
            columns = (self.task.source_column, self.task.target_column)
            check_jsonl(path, columns, required_text=columns)  # scored, so references are needed
            raw["test"] = datasets.load_dataset("json", data_files={"test": str(path)},
                                                cache_dir=str(self.cache_dir / "json"))["test"]
        return raw

    def _load_source(self, splits: tuple[str, ...]):
        """The splits from `data_dir` or the Hub."""
        if not splits:
            return {}
        import datasets

        local = self.local_data_dir()
        columns = (self.task.source_column, self.task.target_column)
        if local is None:
            check_data_source(self.task.name, None, self.cache_dir)
            try:
                raw = datasets.load_dataset(self.task.hub_path, self.task.hub_config,
                                            cache_dir=str(self.cache_dir / "hub"))
            except ConnectionError as error:  # no network, though no setting said offline
                raise UserError(f"--data.data_dir is not set, and {self.task.name}'s Hub dataset "
                                f"{self.task.hub_path} cannot be loaded ({first_line(error)}): give the folder of "
                                f"train.jsonl, validation.jsonl and test.jsonl with --data.data_dir=DIR"
                                f"{_data_dir_hint()}") from None
            return {split: raw[split] for split in splits}
        files = {}
        for split in splits:
            path = local / f"{split}.jsonl"
            if not path.exists():
                raise UserError(f"data.data_dir={self.data_dir}: missing {split}.jsonl")
            # Sources must hold text somewhere in every split; targets in train and validation (loss and
            # scores), not in test, which `predict` may use without references.
            check_jsonl(path, columns, required_text=columns if split != "test" else columns[:1])
            files[split] = str(path)
        raw = datasets.load_dataset("json", data_files=files, cache_dir=str(self.cache_dir / "json"))
        return {split: raw[split] for split in splits}

    def _limit(self, dataset, split: str):
        limit = {"train": self.hparams.max_train_samples,
                 "validation": self.hparams.max_val_samples or self.hparams.max_eval_samples}.get(
                     split, self.hparams.max_eval_samples)
        return dataset.select(range(min(limit, len(dataset)))) if limit else dataset

    # -- tokenizer ------------------------------------------------------------------------------------
    def build_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.hparams.tokenizer:
            tokenizer = load_tokenizer(self.hparams.tokenizer, flag="data.tokenizer")
        else:
            train = self._raw_split("train")

            def texts():
                for start in range(0, len(train), 1000):
                    batch = train[start:start + 1000]
                    yield from column_values(batch, self.task.source_column)
                    yield from column_values(batch, self.task.target_column)

            languages = tuple(code for code in (self.task.source_lang, self.task.target_lang) if code)
            tokenizer = cached_bpe_tokenizer(texts, f"{self.task.name}-{train._fingerprint}",
                                             self.hparams.vocab_size, self.cache_dir, language_codes=languages)
        if self.task.source_lang and hasattr(tokenizer, "src_lang"):
            tokenizer.src_lang, tokenizer.tgt_lang = self.task.source_lang, self.task.target_lang
        return tokenizer

    # -- tokenized splits -----------------------------------------------------------------------------
    def tokenize(self, dataset, split: str):
        tokenizer, task = self.tokenizer, self.task
        max_source, max_target = self.max_source_length, self.max_target_length

        # A trained BPE with language codes: mBART's layout, as mBART's own tokenizer makes it.
        source_lang, target_lang = language_ids(tokenizer, task.source_lang, task.target_lang) or (None, None)

        def encode(batch, indices):
            sources = encode_texts(tokenizer, column_values(batch, task.source_column), max_source, source_lang)
            return {"input_ids": sources, "attention_mask": [[1] * len(ids) for ids in sources],
                    "labels": encode_texts(tokenizer, column_values(batch, task.target_column), max_target,
                                           target_lang, as_target=True),
                    # The row of the split: per-example test results name it, and DDP's repeats are found by it.
                    "example_index": list(indices)}

        return dataset.map(encode, batched=True, with_indices=True, remove_columns=dataset.column_names,
                           desc=f"tokenizing {task.name} {split}")

    def prepare_data(self) -> None:
        # Runs on one process per node first: the BPE training and `map` caches it leaves are reused by
        # every rank's `setup`.
        self._load_splits(self.available_splits())

    def setup(self, stage: str | None = None) -> None:
        splits = STAGE_SPLITS.get(stage, SPLITS) if stage else SPLITS
        self._load_splits(splits)

    def _load_splits(self, splits: tuple[str, ...]) -> None:
        if self.tokenizer is None:
            self.tokenizer = self.build_tokenizer()
        missing = tuple(split for split in splits if split not in self.datasets)
        if not missing:
            return
        raw = self.load_raw(missing)
        for split in missing:
            self.datasets[split] = self.tokenize(self._limit(raw[split], split), split)

    # -- loaders --------------------------------------------------------------------------------------
    def collator(self) -> DataCollatorForSeq2Seq:
        return DataCollatorForSeq2Seq(self.tokenizer, label_pad_token_id=-100, pad_to_multiple_of=8)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            self._load_splits((split,))
        batch_size = self.hparams.batch_size if split == "train" else (
            self.hparams.eval_batch_size or self.hparams.batch_size)
        common = dict(batch_size=batch_size, collate_fn=self.collator(), num_workers=self.hparams.num_workers,
                      persistent_workers=self.hparams.num_workers > 0)
        if not shuffle:
            # A generator of its own: a DataLoader draws each pass's base seed from it, else from the global RNG,
            # and an evaluation (one a stop triggers, one Lightning skips on resume) would shift what training
            # draws next (dropout), so a resumed fit would not continue as an uninterrupted one.
            return DataLoader(self.datasets[split], shuffle=False, generator=torch.Generator(), **common)
        # The shuffling generator is seeded from the run's seed (seed_everything), not the global RNG, so the
        # order of batches is reproducible and can be restored mid-epoch.
        generator = torch.Generator().manual_seed(torch.initial_seed())
        return ResumableDataLoader(self.datasets[split], shuffle=True, generator=generator, cursor=LoaderCursor(),
                                   **common)

    def train_dataloader(self) -> DataLoader:
        self._train_loader = self._loader("train", shuffle=True)
        if self._pending_position is not None:
            self._train_loader.restore_position(self._pending_position)
            self._pending_position = None
        return self._train_loader

    def ordered_train_dataloader(self) -> DataLoader:
        """The training split in its stored order, unshuffled: the same batches on every call and every rank,
        and the resumable training loader (its position, the shuffling generator) left untouched."""
        return self._loader("train", shuffle=False)

    # Saved in every checkpoint: where the training loader stands, so `--ckpt_path` resumes mid-epoch.
    def state_dict(self) -> dict:
        return {"train_position": self._train_loader.position() if self._train_loader is not None else None}

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending_position = state_dict.get("train_position")
        if self._pending_position is not None and self._train_loader is not None:
            self._train_loader.restore_position(self._pending_position)
            self._pending_position = None

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def available_splits(self) -> tuple[str, ...]:
        """Splits to prepare ahead: all three, or those present locally (test.jsonl may come later)."""
        local = self.local_data_dir()
        if local is None:
            return SPLITS
        return tuple(split for split in SPLITS if (local / f"{split}.jsonl").exists()
                     or (split == "test" and self.hparams.test_file)) or ("train",)

    def _raw_split(self, split: str):
        """One split's raw rows, limited as its loader's are (so in loader order and number)."""
        return self._limit(self.load_raw((split,))[split], split)

    def example_ids(self, split: str) -> list[str] | None:
        """The split's `id` column in loader order, or None for a dataset without one (WMT16)."""
        raw = self._raw_split(split)
        return [str(value) for value in raw["id"]] if "id" in raw.column_names else None

    def references(self, split: str) -> list[str]:
        """Target texts of a split, in loader order (what generation is scored against)."""
        return column_values(self._raw_split(split)[:], self.task.target_column)


class XSumDataModule(Seq2SeqDataModule):
    """XSum: BBC article (`document`) -> one-sentence summary (`summary`)."""

    task_name = "xsum"


class CNNDailyMailDataModule(Seq2SeqDataModule):
    """CNN/DailyMail 3.0.0: news `article` -> bullet-point `highlights`."""

    task_name = "cnn_dailymail"


class ELI5DataModule(Seq2SeqDataModule):
    """ELI5: Reddit `question` -> long-form `answer`."""

    task_name = "eli5"


class WMT16EnRoDataModule(Seq2SeqDataModule):
    """WMT16 English -> Romanian translation (`translation.en` -> `translation.ro`)."""

    task_name = "wmt16_en_ro"


class DemoDataModule(Seq2SeqDataModule):
    """Offline demo: a standard-library docstring body -> its first sentence (see `demo_corpus`)."""

    task_name = "demo"

    def local_data_dir(self) -> Path:
        if self.data_dir is not None:
            return Seq2SeqDataModule.local_data_dir(self)  # not super(): pre-training modules borrow this method
        from dq_lightning.data.demo_corpus import write_corpus

        version = f"py{sys.version_info.major}.{sys.version_info.minor}"
        corpus_dir = self.cache_dir / "demo" / version
        if not (corpus_dir / "test.jsonl").exists():
            write_corpus(corpus_dir)
        return corpus_dir


DATAMODULES = {cls.task_name: cls for cls in (XSumDataModule, CNNDailyMailDataModule, ELI5DataModule,
                                              WMT16EnRoDataModule, DemoDataModule)}
