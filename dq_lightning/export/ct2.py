"""CTranslate2 export and generation of a BART/mBART model.

Export (`build_ct2`): CTranslate2's own Transformers loaders (`ctranslate2.converters.transformers.BartLoader`,
`MBartLoader`) lay out the model specification; every quantized weight (Linear layers, the token embedding and
the tied LM head) is then given as its exported int8 codes with CTranslate2's per-row scale (`weight_scale`,
the factor from the real value to the code: 1 / the exported scale, repeated per row for a per-tensor scale),
and the specification is saved without CTranslate2's own quantization pass, which would round the codes again.

What CTranslate2 cannot express: its int8 GEMMs quantize each activation row dynamically to 8 bits (no clip,
one scale per token), and its attention products run in float. The student's activation quantizer (per tensor,
clipped at the recipe's clip) and attention-operand quantizers are therefore not reproduced: with
`compute_type="int8"` the activations are rounded on another grid, with "float32" not at all. The benchmark
(`benchmarks/deploy.py`) measures the difference as token agreement with the fake-quantized student.

Generation (`Ct2Seq2Seq`): `Translator.translate_batch` with the model's decoding settings mapped onto
CTranslate2's (`ct2_options`); its beam search and length handling are CTranslate2's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from dq_lightning.errors import UserError
from dq_lightning.export.deploy_source import DeploySource

CT2_DIR = "ctranslate2"
DEFAULT_NEW_TOKENS = 20


def require_ctranslate2(flag: str) -> None:
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        raise UserError(f"{flag}: CTranslate2 is not installed (pip install ctranslate2; `make install` installs "
                        "it)") from None


def _ct2_scale(scale: torch.Tensor, rows: int) -> np.ndarray:
    """CTranslate2's weight_scale (value * scale = code) of exported codes whose value is code * `scale`."""
    per_row = scale.detach().double().reshape(-1)
    if per_row.numel() == 1:
        per_row = per_row.expand(rows)
    # A zero scale is an all-zero row (the padding row of a ternary embedding): any factor keeps it zero, and 1
    # is what CTranslate2's own quantizer uses there (an infinite one would not survive its arithmetic).
    return torch.where(per_row > 0, 1.0 / per_row, torch.ones_like(per_row)).float().numpy().copy()


def _loader_class(source: DeploySource):
    from ctranslate2.converters import transformers as ct2_transformers
    from ctranslate2.converters import utils

    base = ct2_transformers.MBartLoader if source.is_mbart else ct2_transformers.BartLoader
    module_names = {id(module): name for name, module in source.model.named_modules(remove_duplicate=False)}

    class CodesLoader(base):
        """The base loader, with each quantized weight given as its exported codes and scales."""

        def get_model_spec(self, model):
            # The base reads config.normalize_before, which transformers 5 configs no longer carry: BART is
            # post-LN, mBART pre-LN.
            from ctranslate2.specs import transformer_spec

            config = model.config
            spec = transformer_spec.TransformerSpec.from_config(
                (config.encoder_layers, config.decoder_layers), config.encoder_attention_heads,
                pre_norm=source.is_mbart,
                activation=ct2_transformers._SUPPORTED_ACTIVATIONS[config.activation_function],
                layernorm_embedding=True)
            self.set_encoder(spec.encoder, model.model.encoder)
            self.set_decoder(spec.decoder, model.model.decoder)
            self.set_linear(spec.decoder.projection, model.lm_head)
            bias = getattr(model, "final_logits_bias", None)
            if bias is not None and bias.nonzero().numel() != 0:
                spec.decoder.projection.bias = bias.squeeze()
            return spec

        def _codes(self, module):
            return source.weight_codes(f"{module_names.get(id(module), '?')}.weight")

        def set_linear(self, spec, module, *args, **kwargs):
            super().set_linear(spec, module, *args, **kwargs)
            codes = self._codes(module)
            if codes is not None:
                spec.weight = codes[0].numpy().copy()
                spec.weight_scale = _ct2_scale(codes[1], codes[0].shape[0])

        def set_embeddings(self, spec, module):
            super().set_embeddings(spec, module)
            codes = self._codes(module)
            if codes is not None:
                spec.weight = codes[0].numpy().copy()
                spec.weight_scale = _ct2_scale(codes[1], codes[0].shape[0])

        def set_attention(self, spec, attention, self_attention=False):
            from ctranslate2.specs import common_spec

            split = [common_spec.LinearSpec() for _ in range(3)]
            for part, linear in zip(split, (attention.q_proj, attention.k_proj, attention.v_proj)):
                self.set_linear(part, linear)
            groups = [split] if self_attention else [split[:1], split[1:]]
            for target, parts in zip(spec.linear, groups):
                utils.fuse_linear(target, parts)
                if all(isinstance(part.weight_scale, np.ndarray) for part in parts):
                    target.weight_scale = np.concatenate([part.weight_scale for part in parts])
                elif any(isinstance(part.weight_scale, np.ndarray) for part in parts):
                    raise ValueError("a fused attention projection mixes quantized and float weights")
            self.set_linear(spec.linear[-1], attention.out_proj)

        def set_config(self, config, model, tokenizer):
            super().set_config(config, model, tokenizer)
            # The decoding start this project trains with: </s> for BART, the target-language code for mBART.
            config.decoder_start_token = tokenizer.convert_ids_to_tokens(
                source.generation_config.decoder_start_token_id)

    return CodesLoader


@torch.no_grad()
def build_ct2(source: DeploySource, out_dir: Path) -> list[str]:
    """Write the CTranslate2 model of `source` into `out_dir / ctranslate2`; returns the files written."""
    spec = _loader_class(source)()(source.model, source.tokenizer)
    spec.validate()
    spec.optimize(quantization=None)  # aliases tied weights; no second rounding of the codes
    target = out_dir / CT2_DIR
    target.mkdir(parents=True, exist_ok=True)
    spec.save(str(target))
    return [f"{CT2_DIR}/{path.name}" for path in sorted(target.iterdir()) if path.is_file()]


def ct2_options(generation, tokenizer) -> dict[str, Any]:
    """transformers decoding settings as `Translator.translate_batch` options. transformers counts the decoder
    start token in max_length/min_length; CTranslate2 counts generated tokens."""
    options: dict[str, Any] = {"beam_size": generation.num_beams or 1,
                               "length_penalty": float(generation.length_penalty if generation.length_penalty
                                                       is not None else 1.0),
                               "no_repeat_ngram_size": generation.no_repeat_ngram_size or 0,
                               "repetition_penalty": float(generation.repetition_penalty or 1.0)}
    if generation.max_new_tokens:
        options["max_decoding_length"] = generation.max_new_tokens
    elif generation.max_length:
        options["max_decoding_length"] = max(generation.max_length - 1, 1)
    else:  # transformers 5's model-agnostic default: 20 tokens after the decoder's start
        options["max_decoding_length"] = DEFAULT_NEW_TOKENS
    if generation.min_new_tokens:
        options["min_decoding_length"] = generation.min_new_tokens
    else:  # CTranslate2's default, 1, would forbid the end token as the first one, which transformers allows
        options["min_decoding_length"] = max((generation.min_length or 0) - 1, 0)
    if generation.forced_eos_token_id is not None and "max_decoding_length" in options:
        # transformers spends the last step on the forced </s>; CTranslate2 stops at its length without one.
        options["max_decoding_length"] = max(options["max_decoding_length"] - 1, 1)
    suppressed = list(generation.suppress_tokens or [])
    if suppressed:
        options["suppress_sequences"] = [[token] for token in tokenizer.convert_ids_to_tokens(suppressed)]
    if generation.eos_token_id is None and "max_decoding_length" in options:
        # No end-of-sequence token: every hypothesis runs to the maximum length (fixed-length benchmarks).
        options["min_decoding_length"] = options["max_decoding_length"]
    if generation.forced_bos_token_id is not None:
        options["target_prefix"] = tokenizer.convert_ids_to_tokens([generation.forced_bos_token_id])
    return options


def generation_with(config, settings: dict):
    """A copy of a GenerationConfig with `settings` changed."""
    return config.__class__.from_dict({**config.to_dict(), **settings})


class Ct2Seq2Seq:
    """A CTranslate2 `Translator` with the tokenizer's ids in and out."""

    def __init__(self, directory: Path, tokenizer, threads: int | None = None, compute_type: str = "int8"):
        import ctranslate2
        from transformers import AutoConfig, GenerationConfig

        self.config = AutoConfig.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
        self.generation_config = GenerationConfig.from_pretrained(str(directory))
        self.tokenizer = tokenizer
        self.compute_type = compute_type
        self.translator = ctranslate2.Translator(str(directory / CT2_DIR), device="cpu", compute_type=compute_type,
                                                 intra_threads=threads or 0, inter_threads=1)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, generation_config=None,
                 **settings) -> list[list[int]]:
        """Generated token ids (no start token) of each row of a padded batch; `settings` override single
        decoding settings, as in transformers' `generate`."""
        generation = generation_with(generation_config or self.generation_config, settings)
        sources = [self.tokenizer.convert_ids_to_tokens(row[mask.bool()].tolist())
                   for row, mask in zip(input_ids, attention_mask)]
        options = ct2_options(generation, self.tokenizer)
        results = self.translator.translate_batch(sources, max_batch_size=len(sources), **options)
        return [self.tokenizer.convert_tokens_to_ids(result.hypotheses[0]) for result in results]
