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
from torch.utils.data import DataLoader, SequentialSampler
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from dq_lightning.data.jsonl import check_jsonl, get_field
from dq_lightning.data.loader import LoaderCursor, ResumableDataLoader
from dq_lightning.data.mixing import LabeledThenUnlabeled, MixedBatchSampler
from dq_lightning.data.tasks import TaskSpec, get_task
from dq_lightning.data.teacher_outputs import Generate, labels_from_output, teacher_outputs
from dq_lightning.data.unlabeled import SPLIT_FILE, LabeledSplit, check_labeled_settings, check_unlabeled_file
from dq_lightning.errors import UserError, first_line
from dq_lightning.files import write_json_atomic
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
                      test_file=None, unlabeled_file=None) -> None:
    """Refuse, before anything is built or written, a data source that cannot work: a `data_dir` that is not a
    directory or lacks a split the command will read (`splits`: split -> why it is read), a `test_file` that
    is not a file, an `unlabeled_file` a fit (which reads the train split) cannot use (missing, empty, without
    the task's source column), or no `data_dir` while the task's Hub dataset can neither be downloaded
    (offline) nor read from the cache.

    Without this the first sign was `datasets`' ConnectionError traceback from inside `trainer.fit`, or a
    missing test.jsonl found by the test after a whole fit.
    """
    splits = splits or {}
    if unlabeled_file is not None and "train" in splits:
        check_unlabeled_file(unlabeled_file, get_task(task_name).source_column)
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
        unlabeled_file: str | None = None,
        labeled_examples: int | None = None,
        labeled_fraction: float | None = None,
        labeled_seed: int = 0,
        unlabeled_rest: bool = True,
        unlabeled_per_labeled: float | None = None,
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
            cache_dir: where tokenizers, datasets' caches, generated corpora and the teacher's outputs for
                unlabeled inputs are kept.
            unlabeled_file: a JSON Lines file of training inputs without references: the task's source column
                (other columns are ignored), any size. A DQ student learns from them through its teacher alone
                (model.unlabeled).
            labeled_examples: keep the references of only this many training rows (a seeded choice,
                labeled_seed); the other rows train as unlabeled inputs (unlabeled_rest) or are left out. 0: none.
                Unset: every row keeps its reference.
            labeled_fraction: as labeled_examples, as a share of the training rows in [0, 1].
            labeled_seed: the seed of the labeled rows' choice (not the run's seed: runs over several seeds share
                one labeled set); a smaller share is a subset of a larger one with the same seed. The choice is
                written to labeled_split.json in the run folder.
            unlabeled_rest: the training rows whose references labeled_examples/labeled_fraction drop train as
                unlabeled inputs (true), or are left out (false: a smaller labeled set).
            unlabeled_per_labeled: the mix: unlabeled batches drawn per labeled batch in an epoch (each batch is
                of one kind; fresh random inputs every epoch). Unset: every unlabeled input once per epoch.
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
        check_labeled_settings(labeled_examples, labeled_fraction, labeled_seed, unlabeled_per_labeled,
                               unlabeled_rest, unlabeled_file)
        self.data_dir = data_dir
        self.max_source_length = max_source_length or self.task.max_source_length
        self.max_target_length = max_target_length or self.task.max_target_length
        self.cache_dir = Path(cache_dir)
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.datasets: dict = {}
        self._train_loader: ResumableDataLoader | None = None
        self._pending_position: dict | None = None
        self.split: LabeledSplit | None = None  # which training rows kept their references (when any did not)
        self.unlabeled_sources = None  # tokenized sources of the unlabeled inputs, in order
        self.unlabeled = None  # the same with the teacher's outputs as labels (`use_teacher_outputs`)

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
            # A reference the labeled share drops is not read, not even by the tokenizer.
            split = self._labeled_split(len(train)) if self._splits_training() else None
            kept = None if split is None else set(split.labeled)

            def texts():
                for start in range(0, len(train), 1000):
                    batch = train[start:start + 1000]
                    yield from column_values(batch, self.task.source_column)
                    targets = column_values(batch, self.task.target_column)
                    yield from (text for row, text in enumerate(targets, start) if kept is None or row in kept)

            languages = tuple(code for code in (self.task.source_lang, self.task.target_lang) if code)
            name = f"{self.task.name}-{train._fingerprint}" + (
                "" if split is None else f"-labeled-{split.seed}-{len(split.labeled)}")
            tokenizer = cached_bpe_tokenizer(texts, name, self.hparams.vocab_size, self.cache_dir,
                                             language_codes=languages)
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

    def tokenize_sources(self, dataset, what: str):
        """Sources alone (unlabeled inputs): input_ids and attention_mask, laid out as `tokenize` does."""
        tokenizer, task = self.tokenizer, self.task
        source_lang = (language_ids(tokenizer, task.source_lang, task.target_lang) or (None,))[0]

        def encode(batch):
            sources = encode_texts(tokenizer, column_values(batch, task.source_column), self.max_source_length,
                                   source_lang)
            return {"input_ids": sources, "attention_mask": [[1] * len(ids) for ids in sources]}

        return dataset.map(encode, batched=True, remove_columns=dataset.column_names,
                           desc=f"tokenizing {task.name} {what}")

    # -- inputs without references ------------------------------------------------------------------------
    def _splits_training(self) -> bool:
        hparams = self.hparams
        return hparams.labeled_examples is not None or hparams.labeled_fraction is not None

    def _labeled_split(self, rows: int, file_rows: int = 0) -> LabeledSplit:
        hparams = self.hparams
        return LabeledSplit.choose(rows, hparams.labeled_examples, hparams.labeled_fraction, hparams.labeled_seed,
                                   hparams.unlabeled_rest, hparams.unlabeled_file, file_rows)

    def _split_training(self, rows):
        """The training rows that keep their references; the inputs without them (the other rows, with
        unlabeled_rest, then unlabeled_file's) go to `unlabeled_sources`."""
        import datasets

        hparams = self.hparams
        if not self._splits_training() and hparams.unlabeled_file is None:
            return rows
        from_file = None
        if hparams.unlabeled_file is not None:
            # Checked before training too (check_data_source): a file changed since is checked again here.
            path, _ = check_unlabeled_file(hparams.unlabeled_file, self.task.source_column)
            from_file = datasets.load_dataset("json", data_files={"unlabeled": str(path)},
                                              cache_dir=str(self.cache_dir / "json"))["unlabeled"]
        self.split = split = self._labeled_split(len(rows), len(from_file) if from_file is not None else 0)
        if not split.labeled and not split.unlabeled_rows:
            raise UserError(f"data.labeled_examples={len(split.labeled)} with data.unlabeled_rest=false and no "
                            "data.unlabeled_file leaves nothing to train on")
        if not split.labeled and hparams.unlabeled_per_labeled is not None:
            raise UserError(f"data.unlabeled_per_labeled={hparams.unlabeled_per_labeled}: there are no labeled "
                            "batches to mix with (unset it: every unlabeled input once per epoch)")
        if not split.unlabeled_rows and hparams.unlabeled_per_labeled is not None:
            raise UserError(f"data.unlabeled_per_labeled={hparams.unlabeled_per_labeled} changes nothing: every "
                            f"training row keeps its reference or is left out (data.unlabeled_rest="
                            f"{str(split.unlabeled_rest).lower()}), and no data.unlabeled_file is given")
        parts = [self.tokenize_sources(rows.select(split.rest), "training inputs without references")] \
            if split.unlabeled_rest and split.rest else []
        if from_file is not None:
            parts.append(self.tokenize_sources(from_file, f"unlabeled inputs of {hparams.unlabeled_file}"))
        if parts:
            sources = datasets.concatenate_datasets(parts)
            self.unlabeled_sources = sources.add_column("example_index", list(range(len(sources))))
        return rows.select(split.labeled)

    @property
    def needs_teacher_outputs(self) -> bool:
        """Unlabeled inputs wait for their teacher outputs (`use_teacher_outputs`) before training."""
        return self.unlabeled_sources is not None and self.unlabeled is None

    def use_teacher_outputs(self, generate: Generate, identity: dict) -> None:
        """Label the unlabeled inputs with the teacher's outputs: `generate` (a batch of token-id sources ->
        the teacher's generated ids) runs once per input, and its results are kept under cache_dir for every
        later epoch, resume and run (`dq_lightning.data.teacher_outputs`); `identity` names the teacher and
        its decoding settings."""
        tokenizer = self.tokenizer
        outputs = teacher_outputs(self.unlabeled_sources["input_ids"], generate,
                                  {**identity, "max_source_length": self.max_source_length}, self.cache_dir,
                                  self.hparams.eval_batch_size or self.hparams.batch_size)
        labels = [labels_from_output(output, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                     self.max_target_length) for output in outputs]
        self.unlabeled = self.unlabeled_sources.add_column("labels", labels)

    def unlabeled_summary(self) -> dict:
        """What the training mix is made of, for the run summary and W&B ({} when every row is labeled)."""
        if self.split is None:
            return {}
        return {**self.split.summary(), "unlabeled_per_labeled": self.hparams.unlabeled_per_labeled}

    def _record_split(self) -> None:
        """labeled_split.json in the run folder: which rows kept their references (rank 0 writes it)."""
        trainer = getattr(self, "trainer", None)
        if self.split is None or trainer is None or not trainer.is_global_zero:
            return
        write_json_atomic(Path(trainer.default_root_dir) / SPLIT_FILE, self.split.record())

    def prepare_data(self) -> None:
        # Runs on one process per node first: the BPE training and `map` caches it leaves are reused by
        # every rank's `setup`.
        self._load_splits(self.available_splits())

    def setup(self, stage: str | None = None) -> None:
        splits = STAGE_SPLITS.get(stage, SPLITS) if stage else SPLITS
        self._load_splits(splits)
        if stage == "fit":
            self._record_split()

    def _load_splits(self, splits: tuple[str, ...]) -> None:
        if self.tokenizer is None:
            self.tokenizer = self.build_tokenizer()
        missing = tuple(split for split in splits if split not in self.datasets)
        if not missing:
            return
        raw = self.load_raw(missing)
        for split in missing:
            rows = self._limit(raw[split], split)
            self.datasets[split] = self.tokenize(self._split_training(rows) if split == "train" else rows, split)

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

    def _mixed_loader(self) -> DataLoader:
        """Labeled and unlabeled batches (`dq_lightning.data.mixing`), resumable as the plain loader is."""
        if self.unlabeled is None:
            raise UserError(f"{len(self.unlabeled_sources)} training inputs have no reference (data.unlabeled_file, "
                            "data.labeled_examples or data.labeled_fraction); only a DQ student "
                            "(dq_lightning.modules.student.DQStudentModule) trains on them, from its teacher's outputs")
        data = LabeledThenUnlabeled(self.datasets["train"], self.unlabeled)
        generator = torch.Generator().manual_seed(torch.initial_seed())
        batches = MixedBatchSampler(SequentialSampler(data), self.hparams.batch_size, labeled=len(data.labeled),
                                    unlabeled=len(data.unlabeled), per_labeled=self.hparams.unlabeled_per_labeled,
                                    generator=generator)
        return ResumableDataLoader(data, batch_sampler=batches, generator=generator, cursor=LoaderCursor(),
                                   collate_fn=self.collator(), num_workers=self.hparams.num_workers,
                                   persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        if "train" not in self.datasets:
            self._load_splits(("train",))  # which rows have references is known once the split is loaded
        self._train_loader = self._mixed_loader() if self.unlabeled_sources is not None else \
            self._loader("train", shuffle=True)
        if self._pending_position is not None:
            self._train_loader.restore_position(self._pending_position)
            self._pending_position = None
        return self._train_loader

    def ordered_train_dataloader(self) -> DataLoader:
        """The training split in its stored order, unshuffled: the same batches on every call and every rank,
        and the resumable training loader (its position, the shuffling generator) left untouched. Only the rows
        with references (labeled_examples)."""
        if "train" in self.datasets and not len(self.datasets["train"]):
            raise UserError("data.labeled_examples=0: no training row with a reference to score or order by "
                            "(model.width with shape.width_method impt scores units on them; use rand)")
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
