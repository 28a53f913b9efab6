"""Tokenizers: a pretrained one by name or directory, or a byte-level BPE trained on the task's text.

A trained BPE is written as `vocab.json` + `merges.txt` and loaded back through `BartTokenizer`, so it is a
real BART tokenizer (same special tokens, same `<s> ... </s>` wrapping) that only has a smaller vocabulary;
`save_pretrained` then stores it beside every model trained with it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from transformers import AutoTokenizer, BartTokenizer, PreTrainedTokenizerBase

from dq_lightning.errors import UserError
from dq_lightning.files import replace_directory

BART_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4, BART's order for the first four


def load_tokenizer(name_or_dir: str, flag: str = "tokenizer") -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory or the Hugging Face Hub.

    A directory holding only `vocab.json` and `merges.txt` (the original BART release files) is read as a
    BART tokenizer; in transformers 5 `BartTokenizerFast(vocab_file=..., merges_file=...)` would silently
    ignore those files, so `from_pretrained` on the directory is the way that works.
    """
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        has_full = (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists()
        if has_full:
            return AutoTokenizer.from_pretrained(str(path))
        if (path / "vocab.json").exists() and (path / "merges.txt").exists():
            return BartTokenizer.from_pretrained(str(path))
        raise UserError(f"{flag}={name_or_dir}: directory has no tokenizer files "
                        "(tokenizer.json, tokenizer_config.json, or vocab.json + merges.txt)")
    if path.suffix or name_or_dir.startswith((".", "/", "~")):
        raise UserError(f"{flag}={name_or_dir}: no such directory")
    try:
        return AutoTokenizer.from_pretrained(name_or_dir)
    except OSError as error:
        raise UserError(f"{flag}={name_or_dir}: not a local directory and not loadable from the Hugging Face "
                        f"Hub ({str(error).splitlines()[0]})") from None


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike,
                        min_frequency: int = 2, language_codes: tuple[str, ...] = ()) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE on `texts`, save it as a BART tokenizer in `out_dir` and return it.

    `language_codes` (mBART's `en_XX`, `ro_RO`) become special tokens after BART's five, so they are single
    ids and `decode(skip_special_tokens=True)` drops them; `language_ids` finds them again."""
    from tokenizers import ByteLevelBPETokenizer

    if vocab_size < 300:
        raise UserError(f"vocab_size={vocab_size} is too small for a byte-level BPE (needs at least 300)")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                            special_tokens=[*BART_SPECIAL_TOKENS, *language_codes], show_progress=False)
    # Written beside the target and renamed, so a crash never leaves a half-written tokenizer to be reused.
    with replace_directory(out_dir) as staging:
        bpe.save_model(str(staging))
        tokenizer = BartTokenizer.from_pretrained(str(staging))
        if language_codes:
            tokenizer.add_special_tokens({"additional_special_tokens": list(language_codes)})
        tokenizer.save_pretrained(str(staging))
    return load_tokenizer(str(out_dir))


def cached_bpe_tokenizer(texts_factory, fingerprint: str, vocab_size: int, cache_dir: str | os.PathLike,
                         language_codes: tuple[str, ...] = ()) -> PreTrainedTokenizerBase:
    """Train once per (data fingerprint, vocabulary size, language codes); later calls (other ranks, `test`)
    load it."""
    # Without codes the key is the one tokenizers trained before language codes existed were cached under.
    codes = f"-{','.join(language_codes)}" if language_codes else ""
    key = hashlib.sha256(f"{fingerprint}-{vocab_size}{codes}".encode()).hexdigest()[:16]
    out_dir = Path(cache_dir) / "tokenizers" / f"bpe{vocab_size}-{key}"
    if (out_dir / "tokenizer_config.json").exists():
        return load_tokenizer(str(out_dir))
    texts: Iterator[str] = texts_factory()
    return train_bpe_tokenizer(texts, vocab_size, out_dir, language_codes=language_codes)


def language_ids(tokenizer: PreTrainedTokenizerBase, source_lang: str | None,
                 target_lang: str | None) -> tuple[int, int] | None:
    """Ids of the source and target language codes that this project must place itself: those of a BART
    tokenizer that holds them as tokens (a BPE trained for translation). None when the task has no languages,
    when the tokenizer lacks either code, or when it places them itself (a pretrained mBART tokenizer,
    through `src_lang`/`tgt_lang`)."""
    if not source_lang or not target_lang or hasattr(tokenizer, "src_lang"):
        return None
    vocab = tokenizer.get_vocab()
    if source_lang not in vocab or target_lang not in vocab:
        return None
    return vocab[source_lang], vocab[target_lang]


def to_mbart_layout(ids: list[int], language_id: int, bos_token_id: int) -> list[int]:
    """BART's `<s> tokens </s>` as mBART lays a sequence out, `tokens </s> <lang>` (the code is last, so
    mBART's `shift_tokens_right` starts the decoder on it); the length is unchanged, so truncation holds."""
    body = ids[1:] if ids and ids[0] == bos_token_id else ids
    return [*body, language_id]


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int,
                 language_id: int | None = None, as_target: bool = False) -> list[list[int]]:
    """Token ids of `texts`, truncated to `max_length`, in mBART's layout when `language_id` is given (see
    `language_ids`): the one encoding of training (`Seq2SeqDataModule.tokenize`) and `predict`."""
    encoded = (tokenizer(text_target=texts, max_length=max_length, truncation=True) if as_target
               else tokenizer(texts, max_length=max_length, truncation=True))["input_ids"]
    if language_id is None:
        return encoded
    return [to_mbart_layout(ids, language_id, tokenizer.bos_token_id) for ids in encoded]
