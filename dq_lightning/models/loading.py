"""Get a model by name: a from-scratch preset, a local Hugging Face directory, or a Hub id."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoModelForSeq2SeqLM, PreTrainedModel, PreTrainedTokenizerBase

from dq_lightning.errors import UserError, first_line
from dq_lightning.models.presets import PRESETS, build_config


def load_or_build_model(name: str, tokenizer: PreTrainedTokenizerBase, flag: str = "model.model",
                        attn_implementation: str = "eager", **config_overrides) -> PreTrainedModel:
    """A seq2seq model whose vocabulary matches `tokenizer`.

    Eager attention is the default because SDPA returns no attention maps, which attention distillation
    needs; pass "sdpa" where maps are never read and speed matters.
    """
    if name in PRESETS:
        config = build_config(name, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              **config_overrides)
        config._attn_implementation = attn_implementation
        return AutoModelForSeq2SeqLM.from_config(config, attn_implementation=attn_implementation)
    model = load_pretrained(name, flag, attn_implementation=attn_implementation, **config_overrides)
    check_vocabulary(model, tokenizer, flag)
    return model


def load_pretrained(name: str, flag: str, attn_implementation: str = "eager",
                    **config_overrides) -> PreTrainedModel:
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"{flag}={name}: directory has no config.json (not a Hugging Face model directory)")
    elif path.suffix or name.startswith((".", "/", "~")):
        raise UserError(f"{flag}={name}: no such directory, and not a preset ({', '.join(PRESETS)})")
    try:
        config = AutoConfig.from_pretrained(str(path) if path.is_dir() else name, **config_overrides)
        # Weights are read only from safetensors or with torch.load(weights_only=True) inside transformers;
        # trust_remote_code stays off so that nothing in a model directory is executed.
        return AutoModelForSeq2SeqLM.from_pretrained(str(path) if path.is_dir() else name, config=config,
                                                     attn_implementation=attn_implementation,
                                                     trust_remote_code=False)
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - unreadable or truncated files surface as many error types
        # (OSError, ValueError, safetensors' SafetensorError, ...); every one means "this model cannot be used".
        raise UserError(f"{flag}={name}: cannot load model ({first_line(error)})") from None


def check_vocabulary(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, flag: str) -> None:
    embeddings = model.get_input_embeddings().num_embeddings
    if embeddings < len(tokenizer):
        raise UserError(f"{flag}: model vocabulary ({embeddings} tokens) is smaller than the data's tokenizer "
                        f"({len(tokenizer)} tokens); use the tokenizer saved with that model (data.tokenizer)")
