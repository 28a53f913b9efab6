"""Build a student by copying chosen teacher layers (plus embeddings, positions and LayerNorms)."""

from __future__ import annotations

import copy

from torch import nn
from transformers import PreTrainedModel


def copy_student(teacher: PreTrainedModel, encoder_map: list[int], decoder_map: list[int]) -> PreTrainedModel:
    """A new model whose encoder/decoder layer i is a copy of the teacher's layer `map[i]`.

    Everything else (token and positional embeddings, layer norms, LM head and its bias) is copied as is,
    and tied weights stay tied. With the full maps the student equals the teacher exactly.
    """
    student = copy.deepcopy(teacher)
    student.train(teacher.training)
    encoder, decoder = student.get_encoder(), student.get_decoder()
    encoder.layers = nn.ModuleList([encoder.layers[i] for i in encoder_map])
    decoder.layers = nn.ModuleList([decoder.layers[i] for i in decoder_map])
    # The KV cache is indexed by each attention's layer_idx; copied layers must be renumbered.
    for layers in (encoder.layers, decoder.layers):
        for new_index, layer in enumerate(layers):
            for module in layer.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = new_index
    student.config.encoder_layers = len(encoder_map)
    student.config.decoder_layers = len(decoder_map)
    student.config.num_hidden_layers = len(encoder_map)
    return student
