"""Recipes, and the settings of a DQ student grouped by concept.

A recipe is a named set of defaults: every setting it decides is a field of one of the groups below, unset
(None) unless the user sets it. `resolve` turns a recipe name and the groups into one `ResolvedRecipe`, once:
the LightningModules (the DQ student, the supernet) receive resolved settings and never consult the table.

- `dq-bart`: what the official code (amazon-science/dq-bart: `quant/utils_quant.py`,
  `quant/modeling_bart_quant.py`, `run_summarization_no_trainer.py`) does.
- `dq_lightning`: this project's own choices.
- `tbt`: what TBT (Liu et al., ACL 2023, "Binary and Ternary Natural Language Generation"; code
  facebookresearch/Ternary_Binary_Transformer: `quant/utils_quant.py`, `quant/modeling_bart_quant.py`,
  `run_summarization_no_trainer.py`) does: statistics-based binary and ternary weights, learned-step
  activations, logits distilled by KL. The README's recipe table gives each value's file and line.

| group | setting | dq-bart (official) | dq_lightning | tbt |
|---|---|---|---|---|
| quant_settings | `weight_method` / `embedding_method` | auto (TWN at 2 bits, binary at 1) | auto | tbt (binary at 1 bit, 4/3 mean ternary at 2) |
| quant_settings | `weight_granularity` (Linear weights) | tensor | row | row |
| quant_settings | `weight_clip` | 2.5 | none | none |
| quant_settings | `act_method` | minmax | minmax | elastic (learned step at <= 4 bits) |
| quant_settings | `unsigned_ffn_attn` | false | false | true (fc2 input, attention probabilities) |
| quant_settings | `quantize_lm_head` | false: full-precision head, input unquantized | true: E-bit tied matrix, input at A bits | false |
| quant_settings | `attention_quant` | dq-bart: q (after scaling), k, v, probs (after dropout) | off | tbt: as dq-bart, elastic |
| objective | `logits_loss` | mse | mse | kl |
| objective | `mask_padding` (distillation means) | false | true | false |
| objective | `final_encoder_weight` (on the mean over examples) | 8 | 0 | 8 |
| objective | `attention_maps` distilled | before_dropout | after_dropout | before_dropout |
| objective | `teacher_precision` | fp32 | autocast | fp32 |
| shape | `layer_map` | dq-bart (the official table for 6-layer teachers) | max_spacing | dq-bart |
| optimizer | `weight_decay` | 0 | 0.01 | 0 |
| optimizer | `gradient_clip` | 0 (none) | 1.0 | 0 (none) |
| optimizer | `adam_eps` / `adam_eps_style` | 1e-6 / transformers | 1e-8 / torch | 1e-6 / transformers |

docs/official-loop.md gives the official value of each, with its file and line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal, get_args

from dq_lightning.distill.layer_map import LayerMapStrategy
from dq_lightning.distill.objective import LogitsLoss, ObjectiveConfig
from dq_lightning.distill.views import VIEWS, View
from dq_lightning.distill.width import WidthMethod
from dq_lightning.errors import UserError
from dq_lightning.quant.config import (FULL_PRECISION, ActMethod, AttentionQuant, Granularity, QuantConfig,
                                       WeightMethod, parse_wea)

Recipe = Literal["dq-bart", "dq_lightning", "tbt"]
RECIPES = get_args(Recipe)
Mode = Literal["dq", "quant_only", "distill_only"]
MODES = get_args(Mode)
AttentionMaps = Literal["before_dropout", "after_dropout"]
EvalHead = Literal["trained", "deployed"]
WidthHidden = Literal["kept", "projection"]

TeacherPrecision = Literal["fp32", "autocast"]
AdamEpsStyle = Literal["transformers", "torch"]
ObjectivePreset = Literal["weighted"]

EQUAL_WEIGHTS = {"task_weight": 1.0, "logits_weight": 1.0, "hidden_weight": 1.0, "attention_weight": 1.0}
# The official script adds one MSE per example of the final encoder state (run_summarization_no_trainer.py:691-693)
# at its per-device batch of 8 (179-182), with the other intermediate terms' weight 1 (723-726): 8 times the
# mean over the examples. Here the weight is on that mean, so no batch layout changes the objective.
OFFICIAL_FINAL_ENCODER_WEIGHT = 8.0
# transformers.AdamW (run_summarization_no_trainer.py:44, 592) at its defaults (transformers 4.17.0,
# requirements.txt:1): betas (0.9, 0.999), eps 1e-6 added to sqrt(v) before the bias correction.
OFFICIAL_ADAMW = {"adam_eps": 1e-6, "adam_eps_style": "transformers"}
# The official `--weighted` (run_summarization_no_trainer.py:286, 327-335): task 1, logits 0.8 and `hid_weight` 3,
# which multiplies every intermediate term, the final encoder's included (723-726). Factors on the recipe's weights.
PRESETS: dict[str, dict[str, float]] = {
    "weighted": {"task_weight": 1.0, "logits_weight": 0.8, "hidden_weight": 3.0, "attention_weight": 3.0,
                 "final_encoder_weight": 3.0},
}

# The one table: what each recipe sets, by group and field.
TABLE: dict[str, dict[str, dict[str, Any]]] = {
    "dq-bart": {
        "quant_settings": {"weight_method": "auto", "weight_granularity": "tensor", "weight_clip": 2.5,
                           "act_method": "minmax", "unsigned_ffn_attn": False, "quantize_lm_head": False,
                           "attention_quant": "dq-bart"},
        "objective": {**EQUAL_WEIGHTS, "logits_loss": "mse", "mask_padding": False,
                      "final_encoder_weight": OFFICIAL_FINAL_ENCODER_WEIGHT, "attention_maps": "before_dropout",
                      "teacher_precision": "fp32"},
        "shape": {"layer_map": "dq-bart"},
        "optimizer": {"weight_decay": 0.0, "gradient_clip": 0.0, **OFFICIAL_ADAMW},
    },
    "dq_lightning": {
        "quant_settings": {"weight_method": "auto", "weight_granularity": "row", "weight_clip": float("inf"),
                           "act_method": "minmax", "unsigned_ffn_attn": False, "quantize_lm_head": True,
                           "attention_quant": "off"},
        "objective": {**EQUAL_WEIGHTS, "logits_loss": "mse", "mask_padding": True, "final_encoder_weight": 0.0,
                      "attention_maps": "after_dropout", "teacher_precision": "autocast"},
        "shape": {"layer_map": "max_spacing"},
        "optimizer": {"weight_decay": 0.01, "gradient_clip": 1.0, "adam_eps": 1e-8, "adam_eps_style": "torch"},
    },
    # TBT's script keeps the official loop: transformers.AdamW (its run_summarization_no_trainer.py:52, 610), a teacher
    # accelerate never prepares (613-616), the per-example final-encoder sum (712-714) at 8 per device (187-190).
    "tbt": {
        "quant_settings": {"weight_method": "tbt", "embedding_method": "tbt", "weight_granularity": "row",
                           "weight_clip": float("inf"), "act_method": "elastic", "unsigned_ffn_attn": True,
                           "quantize_lm_head": False, "attention_quant": "tbt"},
        "objective": {**EQUAL_WEIGHTS, "logits_loss": "kl", "mask_padding": False,
                      "final_encoder_weight": OFFICIAL_FINAL_ENCODER_WEIGHT, "attention_maps": "before_dropout",
                      "teacher_precision": "fp32"},
        "shape": {"layer_map": "dq-bart"},
        "optimizer": {"weight_decay": 0.0, "gradient_clip": 0.0, **OFFICIAL_ADAMW},
    },
}
assert set(TABLE) == set(RECIPES)


@dataclass(frozen=True)
class ShapeSettings:
    """Which teacher layers and units the student is made of (its depth, bits and width are `--model.depth`,
    `--model.bits` and `--model.width`)."""

    layer_map: LayerMapStrategy | None = None
    """Which teacher layers the student copies: dq-bart (the official table for 6-layer teachers, max_spacing's
    formula for other depths), dq-bart-new (the official --new_distill_map: the encoder as dq-bart, a 1-layer
    decoder copies teacher layer 0 instead of the last), max_spacing (first to last, evenly), uniform, first,
    last. Unset: the recipe's (dq-bart, tbt: dq-bart; dq_lightning: max_spacing)."""
    encoder_layer_map: list[int] | None = None
    """Explicit teacher encoder layers to copy (overrides layer_map for the encoder)."""
    decoder_layer_map: list[int] | None = None
    """Explicit teacher decoder layers to copy (overrides layer_map for the decoder)."""
    unsorted_layer_maps: bool = False
    """Explicit maps may list distinct teacher layers in any order (a map searched with search-map
    --allow-unsorted); false: strictly increasing."""
    width_method: WidthMethod = "impt"
    """Which units a thinner student (--model.width) keeps: impt (the most important, scored on the first
    width_batches training batches when fit starts) or rand (a random choice seeded by width_seed)."""
    width_batches: int = 8
    """Training batches (in stored order, unshuffled) scored for width_method impt."""
    width_seed: int = 0
    """The seed of width_method rand."""
    width_hidden: WidthHidden = "kept"
    """How a thinner student's hidden states meet the teacher's in the hidden-state and final-encoder losses:
    kept (at the teacher dimensions it kept) or projection (through a learned linear map to the teacher's width,
    TinyBERT's W_h, trained with the student and not exported; it starts as the kept dimensions' embedding)."""

    def __post_init__(self) -> None:
        if self.width_method not in get_args(WidthMethod):
            raise UserError(f"model.shape.width_method={self.width_method!r}: choose impt or rand")
        if isinstance(self.width_batches, bool) or not isinstance(self.width_batches, int) or self.width_batches < 1:
            raise UserError(f"model.shape.width_batches={self.width_batches!r} must be a positive integer")
        if self.width_hidden not in get_args(WidthHidden):
            raise UserError(f"model.shape.width_hidden={self.width_hidden!r}: choose kept or projection")


@dataclass(frozen=True)
class ObjectiveSettings:
    """The DQ loss: the task cross-entropy plus the distillation terms against the frozen teacher."""

    preset: ObjectivePreset | None = None
    """weighted: the official --weighted (task 1, logits 0.8, and 3 on the hidden, attention and final-encoder
    terms), as factors on the recipe's weights (dq-bart: 1, 0.8, 3, 3, 24); a weight set here as well is taken
    as given. Unset: the recipe's weights."""
    task_weight: float | None = None
    """Weight of the task cross-entropy. Unset: 1 (times the preset's factor)."""
    logits_weight: float | None = None
    """Weight of the logits distillation loss. Unset: 1 (times the preset's factor)."""
    hidden_weight: float | None = None
    """Weight of the hidden-state MSE (encoder + decoder, summed over layers). Unset: 1 (times the preset's
    factor)."""
    attention_weight: float | None = None
    """Weight of the attention-map MSE (encoder self, decoder self, cross). Unset: 1 (times the preset's
    factor)."""
    final_encoder_weight: float | None = None
    """Weight of the official extra final-encoder-state term, on the mean over the examples of each one's MSE,
    so that neither the per-device batch nor the device count changes it. Unset: the recipe's (dq-bart, tbt 8:
    the official script sums the per-example MSEs over its per-device batch of 8; dq_lightning 0)."""
    teacher_precision: TeacherPrecision | None = None
    """The frozen teacher's forward: fp32 (as the official script, whose teacher accelerate never prepares,
    even under --trainer.precision=bf16-mixed) or autocast (in the trainer's mixed precision: cheaper, with
    distillation targets rounded to it). Unset: the recipe's (dq-bart, tbt fp32; dq_lightning autocast)."""
    logits_loss: LogitsLoss | None = None
    """mse (DQ-BART's) or kl (with temperature; TBT's, whose soft cross-entropy to the teacher differs from the
    KL by the teacher's entropy only). Unset: the recipe's (dq-bart, dq_lightning mse; tbt kl)."""
    temperature: float = 1.0
    """Softening temperature of the KL logits loss."""
    mask_padding: bool | None = None
    """Distillation means over real tokens only (true) or over every position, padding included (false).
    Unset: the recipe's (dq-bart, tbt false; dq_lightning true)."""
    attention_maps: AttentionMaps | None = None
    """Which attention map is distilled: before_dropout (the softmax, as the official code) or after_dropout
    (what transformers returns). Unset: the recipe's (dq-bart, tbt before_dropout; dq_lightning
    after_dropout)."""
    label_smoothing: float = 0.0
    """Label smoothing of the task cross-entropy while training."""

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise UserError(f"model.objective.preset={self.preset!r}: choose {', '.join(PRESETS)} (or leave it unset)")
        if self.teacher_precision is not None and self.teacher_precision not in get_args(TeacherPrecision):
            raise UserError(f"model.objective.teacher_precision={self.teacher_precision!r}: choose fp32 or autocast")


@dataclass(frozen=True)
class QuantSettings:
    """How the student is quantized, beyond its W-E-A bits (`--model.bits`). Unset (null) fields take the
    recipe's value, or the `QuantConfig` default where no recipe sets them."""

    weight_method: WeightMethod | None = None
    """Weight quantizer: auto (binary at 1 bit, TWN ternary at 2, min-max otherwise), tbt (binary at 1 bit, TBT's
    ternary at 2, min-max otherwise), minmax, ternary (TWN), tbt_ternary (scale 4/3 of the mean |w|, codes
    round(clamp(w / scale, -1, 1))), binary (sign times the mean |w|) or lsq. Unset: the recipe's (dq-bart,
    dq_lightning auto; tbt tbt)."""
    weight_granularity: Granularity | None = None
    """Linear weights: tensor (one scale per matrix) or row (one per output row). The token embedding is per row
    in every recipe (embedding_granularity). Unset: the recipe's (dq-bart tensor; dq_lightning, tbt row)."""
    weight_clip: float | None = None
    """Linear weights and the embedding are clipped to +-weight_clip before quantization; inf for no clip.
    Unset: the recipe's (dq-bart 2.5; dq_lightning, tbt inf)."""
    quantize_lm_head: bool | None = None
    """Quantize the LM head (the tied embedding at e_bits, its input at a_bits), or train it in full precision
    (false; export still ships the E-bit matrix, see evaluation.eval_head). Unset: the recipe's (dq-bart, tbt
    false; dq_lightning true)."""
    attention_quant: AttentionQuant | None = None
    """Attention operands at a_bits: dq-bart (q after scaling, k, v, probabilities after dropout, symmetric per
    tensor), asym_probs (q before scaling, k, v with the activation quantizer, probabilities asymmetric before
    dropout), tbt (where dq-bart quantizes, with the activation quantizer; the probabilities with its unsigned
    variant under unsigned_ffn_attn) or off. Unset: the recipe's (dq-bart; dq_lightning off; tbt tbt)."""
    embedding_method: WeightMethod | None = None
    """Quantizer of the token embedding, with weight_method's choices. Unset: the recipe's (dq-bart, dq_lightning
    auto; tbt tbt)."""
    act_method: ActMethod | None = None
    """Activation quantizer: minmax (symmetric, the official), asym_minmax (with a zero point), lsq (learned
    step size) or elastic (TBT's learned step at 4 bits or fewer, codes in [-1, 1] at 2 bits; min-max at 8).
    Unset: the recipe's (dq-bart, dq_lightning minmax; tbt elastic)."""
    unsigned_ffn_attn: bool | None = None
    """fc2's input (after the GELU) and, with attention_quant tbt, the attention probabilities take the unsigned
    variant of the activation quantizer (min-max: asymmetric; elastic: shifted by the tensor's minimum). Unset:
    the recipe's (dq-bart, dq_lightning false; tbt true)."""
    embedding_granularity: Granularity | None = None
    """Token embedding (and a quantized LM head): row, one scale per token (the official), or tensor. Unset: row."""
    act_granularity: Granularity | None = None
    """Activations: tensor, one dynamic scale per tensor (the official), or row, one per token. Unset: tensor."""
    act_clip: float | None = None
    """Activations are clipped to +-act_clip before quantization; inf for no clip. Unset: 2.5 (the official)."""
    warmup_steps: int = 0
    """Optimizer steps in full precision before quantization starts."""

    def __post_init__(self) -> None:
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise UserError(f"model.quant_settings.warmup_steps={self.warmup_steps!r} must be a non-negative integer")

    def quant_fields(self) -> dict[str, Any]:
        """The `QuantConfig` fields that are set, as `QuantConfig` takes them (inf, no clip, is its None)."""
        given = {name: value for name, value in asdict(self).items() if value is not None and name != "warmup_steps"}
        for clip in ("weight_clip", "act_clip"):
            if given.get(clip) == float("inf"):
                given[clip] = None
        return given


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW and its schedule (the peak learning rate is `--model.lr`; betas 0.9, 0.999, as the official script)."""

    weight_decay: float | None = None
    """AdamW weight decay (not applied to biases and LayerNorms). Unset: the recipe's (dq-bart, tbt 0;
    dq_lightning 0.01)."""
    gradient_clip: float | None = None
    """Clip the gradient norm at this value; 0 for none. --trainer.gradient_clip_val, when set, takes
    precedence. Unset: the recipe's (dq-bart, tbt 0; dq_lightning 1.0)."""
    warmup_ratio: float = 0.05
    """Share of the steps spent warming the learning rate up linearly."""
    adam_eps: float | None = None
    """AdamW's epsilon. Unset: the recipe's (dq-bart, tbt 1e-6, transformers.AdamW's default that the official
    script uses; dq_lightning 1e-8, torch's)."""
    adam_eps_style: AdamEpsStyle | None = None
    """Where adam_eps enters: transformers (added to sqrt(v) before the bias correction, as transformers.AdamW of
    the official script: early steps see a larger epsilon, eps / sqrt(1 - 0.999^step)) or torch (added after
    it, torch.optim.AdamW). Unset: the recipe's (dq-bart, tbt transformers; dq_lightning torch)."""

    def __post_init__(self) -> None:
        if self.adam_eps is not None and not self.adam_eps > 0:
            raise UserError(f"model.optimizer.adam_eps={self.adam_eps!r} must be positive")
        if self.adam_eps_style is not None and self.adam_eps_style not in get_args(AdamEpsStyle):
            raise UserError(f"model.optimizer.adam_eps_style={self.adam_eps_style!r}: choose transformers or torch")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise UserError(f"model.optimizer.weight_decay={self.weight_decay} must not be negative")
        if self.gradient_clip is not None and not self.gradient_clip >= 0:
            raise UserError(f"model.optimizer.gradient_clip={self.gradient_clip!r} must be 0 (none) or positive")
        if not 0 <= self.warmup_ratio < 1:
            raise UserError(f"model.optimizer.warmup_ratio={self.warmup_ratio} must be in [0, 1)")


@dataclass(frozen=True)
class EvaluationSettings:
    """What validation and test do besides the loss."""

    eval_head: EvalHead = "trained"
    """With a full-precision-trained LM head (quant_settings.quantize_lm_head false), which head validation and
    test use: trained (the latent full-precision head, the official evaluation) or deployed (the E-bit tied
    matrix that export writes and the size accounting counts)."""
    evaluate_teacher: bool = False
    """At test time also generate with the teacher and log test/teacher_<metric>."""
    generate_on_validation: bool = True
    """Generate and score ROUGE/BLEU at every validation."""
    prediction_table_rows: int = 100
    """Test examples shown as a W&B table beside the teacher's outputs (from the teacher's own
    test_predictions.jsonl, when it has one); 0 logs none. Every example's output and score is written to
    test_predictions.jsonl regardless."""

    def __post_init__(self) -> None:
        if self.eval_head not in get_args(EvalHead):
            raise UserError(f"model.evaluation.eval_head={self.eval_head!r} is not one of trained, deployed")
        if self.prediction_table_rows < 0:
            raise UserError(f"model.evaluation.prediction_table_rows={self.prediction_table_rows} must be 0 or more")


@dataclass(frozen=True)
class UnlabeledSettings:
    """How the student learns from training inputs without a reference (data.unlabeled_file,
    data.labeled_examples): from the teacher alone. The teacher's own output, generated once per input with the
    task's decoding settings and cached, is both models' decoder input, and the objective's distillation terms
    apply (sequence-level KD, Kim and Rush 2016; Shleifer and Rush 2020); no cross-entropy against a reference.
    The mix of labeled and unlabeled batches is data.unlabeled_per_labeled."""

    weight: float = 1.0
    """Weight of an unlabeled batch's loss, against a labeled batch's 1."""
    pseudo_reference_weight: float = 0.0
    """Weight of the cross-entropy against the teacher's output as a pseudo-reference; 0: the distillation terms
    alone. mode quant_only (no distillation) learns from unlabeled inputs only through this."""
    logits_weight: float | None = None
    """Weight of the logits term on unlabeled batches. Unset: objective.logits_weight."""
    hidden_weight: float | None = None
    """Weight of the hidden-state term on unlabeled batches. Unset: objective.hidden_weight."""
    attention_weight: float | None = None
    """Weight of the attention-map term on unlabeled batches. Unset: objective.attention_weight."""
    final_encoder_weight: float | None = None
    """Weight of the final-encoder-state term on unlabeled batches. Unset: the objective's (the recipe's)."""
    view: View = "full"
    """What the student reads of an unlabeled input (Cross-View Training's restricted view; Clark et al. 2018):
    full (the teacher's source), word_dropout (each word dropped with probability view_rate), perturb (the
    robustness perturbations of view_rate of the words: typos, dropped and swapped words, changed digits) or
    truncate (the last view_rate share of the source cut), while the teacher reads the full source. With a
    restricted view only the decoder-side terms apply (logits, decoder hidden states and self-attention): the
    encoder-side ones would compare positions the view moved."""
    view_rate: float = 0.2
    """The share of the source a restricted view takes away (not tuned: the robustness report perturbs 0.1)."""

    def __post_init__(self) -> None:
        for name in ("weight", "pseudo_reference_weight", "logits_weight", "hidden_weight", "attention_weight",
                     "final_encoder_weight"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not value >= 0):
                raise UserError(f"model.unlabeled.{name}={value!r} must be a non-negative number")
        if self.view not in VIEWS:
            raise UserError(f"model.unlabeled.view={self.view!r} is not one of {', '.join(VIEWS)}")
        if not 0 <= self.view_rate < 1:
            raise UserError(f"model.unlabeled.view_rate={self.view_rate!r} must be in [0, 1)")

    def objective_config(self, labeled: ObjectiveConfig) -> ObjectiveConfig:
        """The loss of an unlabeled batch: `labeled`'s form, these weights, the pseudo-reference as its task term."""
        overrides = {name: getattr(self, name) for name in ("logits_weight", "hidden_weight", "attention_weight",
                                                             "final_encoder_weight") if getattr(self, name) is not None}
        return replace(labeled, task_weight=self.pseudo_reference_weight, **overrides)


GROUPS = {"shape": ShapeSettings, "objective": ObjectiveSettings, "quant_settings": QuantSettings,
          "optimizer": OptimizerSettings, "evaluation": EvaluationSettings, "unlabeled": UnlabeledSettings}


def as_group(name: str, value: Any) -> Any:
    """`value` as the dataclass of group `name`: itself, or built from a mapping (a checkpoint's
    hyper-parameters, a Python caller) whose unknown keys are named in the error."""
    cls = GROUPS[name]
    if isinstance(value, cls):
        return value
    known = [field.name for field in fields(cls)]
    for key in value or {}:
        if key not in known:
            raise UserError(f"model.{name}.{key}: unknown setting of --model.{name}; known: {', '.join(known)}")
    return cls(**(value or {}))


def _check_recipe(name: str, flag: str) -> None:
    if name not in TABLE:
        raise UserError(f"{flag}={name!r} is not a recipe; choose from {', '.join(RECIPES)}")


_BIT_FIELDS = ("w_bits=", "e_bits=", "a_bits=")


# ObjectiveSettings fields that shape what the loss is given (the maps, the teacher's forward) or its weights'
# defaults, not the loss itself.
_NOT_IN_LOSS = ("attention_maps", "preset", "teacher_precision")


@dataclass(frozen=True)
class ResolvedRecipe:
    """A recipe with every setting decided: the groups with no field left unset that the recipe sets."""

    name: str
    shape: ShapeSettings
    objective: ObjectiveSettings
    quant_settings: QuantSettings
    optimizer: OptimizerSettings

    def objective_config(self, mode: str) -> ObjectiveConfig:
        """The loss of `mode`: quant_only trains on the task loss alone."""
        settings = {name: value for name, value in asdict(self.objective).items() if name not in _NOT_IN_LOSS}
        return ObjectiveConfig(distill=mode != "quant_only", **settings)

    def quant_config(self, bits: str | tuple[int, int, int], mode: str = "dq",
                     flag: str = "model.bits") -> QuantConfig | None:
        """The student's `QuantConfig` at W-E-A `bits`, or None for a full-precision student (distill_only, or
        32-32-32). A width no quantizer of the recipe takes names `flag` (and the setting it conflicts with)."""
        notation = bits if isinstance(bits, str) else "-".join(map(str, bits))
        try:
            widths = parse_wea(bits) if isinstance(bits, str) else tuple(bits)
            if mode == "distill_only" or widths == (FULL_PRECISION,) * 3:
                return None
            return self._quant_config(widths)
        except UserError as error:
            message = str(error)
            if message.startswith(_BIT_FIELDS) or message.startswith("bits "):
                raise UserError(f"{flag}={notation}: {message} (recipe {self.name})") from None
            raise UserError(f"model.quant_settings.{message} (recipe {self.name}, {flag}={notation})") from None

    def quantizers(self, widths: tuple[int, int, int]) -> QuantConfig:
        """The `QuantConfig` at these W-E-A widths, full precision included."""
        try:
            return self._quant_config(widths)
        except UserError as error:
            raise UserError(f"model.{error} (recipe {self.name})") from None

    def _quant_config(self, widths: tuple[int, int, int]) -> QuantConfig:
        return QuantConfig(*widths, **self.quant_settings.quant_fields())

    def maps_before_dropout(self, mode: str) -> bool:
        """Whether a student of `mode` returns its attention maps before dropout: the map it is distilled on."""
        return self.objective.attention_maps == "before_dropout" and self.objective_config(mode).needs_attentions


def resolve(name: str, shape: ShapeSettings = ShapeSettings(), objective: ObjectiveSettings = ObjectiveSettings(),
            quant_settings: QuantSettings = QuantSettings(), optimizer: OptimizerSettings = OptimizerSettings(),
            flag: str = "model.recipe") -> ResolvedRecipe:
    """Recipe `name` with the groups' set fields winning over its table; `flag` names the recipe in errors."""
    _check_recipe(name, flag)
    groups = {"shape": shape, "objective": objective, "quant_settings": quant_settings, "optimizer": optimizer}
    resolved = {}
    for group, settings in groups.items():
        settings = as_group(group, settings)
        table = TABLE[name][group]
        if group == "objective" and settings.preset is not None:
            factors = PRESETS[settings.preset]
            table = {key: value * factors[key] if key in factors else value for key, value in table.items()}
        defaults = {key: value for key, value in table.items() if getattr(settings, key) is None}
        resolved[group] = replace(settings, **defaults)
    return ResolvedRecipe(name, **resolved)


def recipe_quant_config(name: str, bits: str | tuple[int, int, int] = "8-8-8", **quant_settings: Any) -> QuantConfig:
    """The `QuantConfig` of recipe `name` at `bits` (W-E-A), with `quant_settings` fields overriding it: the
    quantizers alone, for a caller that builds its own student (`prepare(model, config)`)."""
    widths = parse_wea(bits) if isinstance(bits, str) else tuple(bits)
    return resolve(name, quant_settings=QuantSettings(**quant_settings)).quantizers(widths)


def quant_fields_of(name: str) -> dict[str, Any]:
    """The `QuantConfig` fields recipe `name` sets (bit widths aside)."""
    _check_recipe(name, "recipe")
    return dict(TABLE[name]["quant_settings"])
