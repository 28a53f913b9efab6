"""Quantization half of DQ-BART, in plain PyTorch: fake quantizers with straight-through gradients, quantized
BART/mBART modules, `prepare` (swap them in) and `convert` (bake integer codes).

    config = QuantConfig.from_notation("2-2-8")      # W-E-A bits, as in the paper
    prepare(student, config)                         # every forward now uses low-bit weights/activations
    ...train...                                      # the optimizer updates the full-precision latent weights
    convert(student)                                 # int8 codes + scales, same outputs in eval mode
"""

from dq_lightning.quant.api import (collect_stats, convert, holds_codes, in_form_of, is_converted, is_prepared, prepare, quant_config_of,
                                    quantizers, return_maps_before_dropout, set_observe, set_quantization_enabled,
                                    use_deployed_head)
from dq_lightning.quant.config import SUPPORTED_BITS, QuantConfig, parse_wea
from dq_lightning.quant.modules import (AttentionInputQuantizer, ConvertedEmbedding, ConvertedLinear, PackedWeight,
                                        QuantEmbedding, QuantLinear)
from dq_lightning.quant.quantizers import (AsymMinMaxQuantizer, FakeQuantizer, LSQQuantizer, MinMaxQuantizer,
                                           TernaryQuantizer, make_activation_quantizer, make_weight_quantizer)

__all__ = [
    "SUPPORTED_BITS", "AsymMinMaxQuantizer", "AttentionInputQuantizer", "ConvertedEmbedding", "ConvertedLinear",
    "FakeQuantizer", "LSQQuantizer", "MinMaxQuantizer", "PackedWeight", "QuantConfig", "QuantEmbedding",
    "QuantLinear", "TernaryQuantizer", "collect_stats", "convert", "holds_codes", "in_form_of", "is_converted", "is_prepared",
    "make_activation_quantizer", "make_weight_quantizer", "parse_wea", "prepare", "quant_config_of", "quantizers",
    "return_maps_before_dropout", "set_observe", "set_quantization_enabled", "use_deployed_head",
]
