"""Running an ONNX export (`dq_lightning.export.onnx_graph`) with ONNX Runtime behind transformers' `generate`.

`OnnxSeq2SeqLM` is a transformers model with no weights of its own: its encoder, its cross-attention operands
and each decoding step are ONNX Runtime sessions. `generate` therefore decodes exactly as it does for the
PyTorch model (beams, lengths, no-repeat n-grams, the forced mBART language, suppressed tokens): only the
arithmetic runs elsewhere. The self-attention keys and values live in transformers' own cache (so beam search
reorders them); the cross-attention operands are computed once per `generate` call, at its first step, and
kept outside the cache: they are the same for every beam of an example, so reordering never changes them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from dq_lightning.errors import UserError


def ort_session(path: Path, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


class _Encoder(nn.Module):
    main_input_name = "input_ids"

    def __init__(self, session):
        super().__init__()
        self.session = session

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutput

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        (hidden,) = self.session.run(None, {"input_ids": _array(input_ids, np.int64),
                                            "attention_mask": _array(attention_mask, np.int64)})
        return BaseModelOutput(last_hidden_state=torch.from_numpy(hidden))


def _array(tensor: torch.Tensor, dtype) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().cpu().numpy().astype(dtype, copy=False))


def load_onnx_model(directory: Path, threads: int | None = None):
    """The `OnnxSeq2SeqLM` of an ONNX export directory (config, generation settings and three sessions)."""
    from transformers import AutoConfig, GenerationConfig, GenerationMixin, PreTrainedModel

    config = AutoConfig.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)

    class OnnxSeq2SeqLM(PreTrainedModel, GenerationMixin):
        """A BART/mBART model whose computation is three ONNX Runtime sessions (see the module docstring)."""

        config_class = type(config)
        main_input_name = "input_ids"
        base_model_prefix = "model"

        def __init__(self):
            super().__init__(config)
            self.encoder = _Encoder(ort_session(directory / "encoder.onnx", threads))
            self.cross_session = ort_session(directory / "cross.onnx", threads)
            self.decoder_session = ort_session(directory / "decoder.onnx", threads)
            self.cross_names = [output.name for output in self.cross_session.get_outputs()]
            self.decoder_inputs = {item.name for item in self.decoder_session.get_inputs()}
            self.layers = config.decoder_layers
            self.heads = config.decoder_attention_heads
            self._cross: dict[str, np.ndarray] = {}
            self.post_init()

        @property
        def device(self):
            return torch.device("cpu")

        @property
        def dtype(self):
            return torch.float32

        def get_encoder(self):
            return self.encoder

        def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, encoder_outputs=None,
                    cache=None, use_cache=None, **kwargs):
            from transformers.cache_utils import DynamicCache, EncoderDecoderCache
            from transformers.modeling_outputs import Seq2SeqLMOutput

            if decoder_input_ids is None or decoder_input_ids.shape[1] != 1:
                raise ValueError("OnnxSeq2SeqLM runs one decoding step at a time (decoder_input_ids [batch, 1])")
            if cache is None:
                cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            states = encoder_outputs[0] if isinstance(encoder_outputs, (tuple, list)) else \
                encoder_outputs.last_hidden_state
            self_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
            first = self_cache.get_seq_length() == 0
            if first:
                outputs = self.cross_session.run(None, {"encoder_hidden_states": _array(states, np.float32)})
                self._cross = dict(zip(self.cross_names, outputs))
            batch = decoder_input_ids.shape[0]
            head_dim = config.d_model // self.heads
            feeds = {"input_ids": _array(decoder_input_ids, np.int64),
                     "encoder_attention_mask": _array(attention_mask, np.int64) if attention_mask is not None
                     else np.ones(states.shape[:2], dtype=np.int64), **self._cross}
            empty = np.zeros((batch, self.heads, 0, head_dim), dtype=np.float32)
            for index in range(self.layers):
                if first:
                    feeds[f"past_key_{index}"] = feeds[f"past_value_{index}"] = empty
                else:
                    layer = self_cache.layers[index]
                    feeds[f"past_key_{index}"] = layer.keys.numpy()
                    feeds[f"past_value_{index}"] = layer.values.numpy()
            logits, *presents = self.decoder_session.run(None, feeds)
            for index in range(self.layers):
                self_cache.update(torch.from_numpy(presents[2 * index]), torch.from_numpy(presents[2 * index + 1]),
                                  index)
            return Seq2SeqLMOutput(logits=torch.from_numpy(logits), cache=cache)

    model = OnnxSeq2SeqLM()
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(directory))
    return model


def onnx_runtime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def require_onnxruntime(flag: str) -> None:
    if not onnx_runtime_available():
        raise UserError(f"{flag}: ONNX Runtime is not installed (pip install onnxruntime onnx; `make install` "
                        "installs both)")
