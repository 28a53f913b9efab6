"""Recipes: named sets of defaults for a DQ student. A recipe only sets defaults; every choice it makes is also
a setting of its own (`DQStudentModule`'s arguments, `QuantConfig`'s fields), so choices can be mixed.

- `dq-bart`: what the official code (amazon-science/dq-bart: `quant/utils_quant.py`,
  `quant/modeling_bart_quant.py`, `run_summarization_no_trainer.py`) does.
- `dq_lightning`: this project's own choices.

| setting | dq-bart (official) | dq_lightning |
|---|---|---|
| `weight_granularity` (Linear weights) | tensor | row |
| `embedding_granularity` | row | row |
| `weight_clip` | 2.5 | none |
| `quantize_lm_head` | false: full-precision head, input unquantized | true: E-bit tied matrix, input at A bits |
| `attention_quant` | dq-bart: q (after scaling), k, v, probs (after dropout) | off |
| `mask_padding` (distillation means) | false | true |
| `final_encoder_weight` | 1 | 0 |
| `attention_maps` distilled | before_dropout | after_dropout |
| `layer_map` | dq-bart (the official table for 6-layer teachers) | max_spacing |
| `weight_decay` | 0 | 0.01 |
| `gradient_clip` | 0 (none) | 1.0 |

The quantization rows are `dq_lightning.quant.config.recipe_defaults`; this module holds the others.
"""

from __future__ import annotations

from typing import Any

from dq_lightning.quant.config import RECIPES, recipe_defaults

_STUDENT_DEFAULTS: dict[str, dict[str, Any]] = {
    "dq-bart": {"mask_padding": False, "final_encoder_weight": 1.0, "attention_maps": "before_dropout",
                "layer_map": "dq-bart", "weight_decay": 0.0, "gradient_clip": 0.0},
    "dq_lightning": {"mask_padding": True, "final_encoder_weight": 0.0, "attention_maps": "after_dropout",
                     "layer_map": "max_spacing", "weight_decay": 0.01, "gradient_clip": 1.0},
}
assert set(_STUDENT_DEFAULTS) == set(RECIPES)


def recipe_settings(name: str, flag: str = "model.recipe") -> dict[str, Any]:
    """The student settings (distillation and training; not quantization) recipe `name` sets."""
    recipe_defaults(name, flag)  # names the flag for an unknown recipe
    return dict(_STUDENT_DEFAULTS[name])

