"""Named model sizes built from scratch as `BartConfig`/`MBartConfig`, with no download.

The `bart-*` and `mbart-*` presets copy the shapes of the published checkpoints so that size accounting
and speed benchmarks see the real architecture; the small ones are for CPU-scale runs and tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import BartConfig, MBartConfig, PretrainedConfig

from dq_lightning.errors import UserError


@dataclass(frozen=True)
class Preset:
    """Architecture of a from-scratch model. Vocabulary size comes from the tokenizer at build time."""

    d_model: int
    encoder_layers: int
    decoder_layers: int
    attention_heads: int
    ffn_dim: int
    max_position_embeddings: int = 1024
    vocab_size: int = 50265
    family: str = "bart"  # "bart" or "mbart"
    dropout: float = 0.1


PRESETS: dict[str, Preset] = {
    # Tests: builds in milliseconds.
    "micro": Preset(d_model=32, encoder_layers=2, decoder_layers=2, attention_heads=2, ffn_dim=64,
                    max_position_embeddings=256),
    "micro-mbart": Preset(d_model=32, encoder_layers=2, decoder_layers=2, attention_heads=2, ffn_dim=64,
                          max_position_embeddings=256, family="mbart"),
    "tiny": Preset(d_model=128, encoder_layers=6, decoder_layers=6, attention_heads=4, ffn_dim=512,
                   max_position_embeddings=512),
    "small": Preset(d_model=256, encoder_layers=6, decoder_layers=6, attention_heads=4, ffn_dim=1024,
                    max_position_embeddings=1024),
    "tiny-mbart": Preset(d_model=128, encoder_layers=6, decoder_layers=6, attention_heads=4, ffn_dim=512,
                         max_position_embeddings=512, family="mbart"),
    # Shapes of facebook/bart-base, facebook/bart-large and facebook/mbart-large-cc25.
    "bart-base": Preset(d_model=768, encoder_layers=6, decoder_layers=6, attention_heads=12, ffn_dim=3072),
    "bart-large": Preset(d_model=1024, encoder_layers=12, decoder_layers=12, attention_heads=16, ffn_dim=4096),
    "mbart-large-cc25": Preset(d_model=1024, encoder_layers=12, decoder_layers=12, attention_heads=16,
                               ffn_dim=4096, vocab_size=250027, family="mbart"),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}") from None


def build_config(name: str, vocab_size: int | None = None, pad_token_id: int = 1, bos_token_id: int = 0,
                 eos_token_id: int = 2, **overrides) -> PretrainedConfig:
    """The `BartConfig`/`MBartConfig` of preset `name`; `overrides` are passed to the config as they are."""
    preset = get_preset(name)
    config_class = MBartConfig if preset.family == "mbart" else BartConfig
    kwargs = dict(
        vocab_size=vocab_size or preset.vocab_size,
        d_model=preset.d_model,
        encoder_layers=preset.encoder_layers,
        decoder_layers=preset.decoder_layers,
        encoder_attention_heads=preset.attention_heads,
        decoder_attention_heads=preset.attention_heads,
        encoder_ffn_dim=preset.ffn_dim,
        decoder_ffn_dim=preset.ffn_dim,
        max_position_embeddings=preset.max_position_embeddings,
        dropout=preset.dropout,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        decoder_start_token_id=eos_token_id,
        forced_eos_token_id=eos_token_id,
        scale_embedding=preset.family == "mbart",
    )
    kwargs.update(overrides)
    return config_class(**kwargs)
