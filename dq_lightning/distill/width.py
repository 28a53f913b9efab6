"""Thinner students extracted from a BART/mBART teacher's most important widths (Extract Then Distill).

Chen et al. (2021, ETD) initialise a narrow student with slices of the teacher: its most important hidden
dimensions, FFN neurons and attention heads (ETD-Impt), or a random choice of the same sizes (ETD-Rand).

    spec = WidthSpec.parse("heads=8,ffn=1536", teacher.config, method="impt")
    scores = importance(teacher, batches) if spec.method == "impt" else random_importance(teacher, seed)
    student, kept = extract(teacher, spec, scores)

Widths. ETD keeps each head whole (head_dim stays the teacher's) and drops heads. A BART attention is
d_model wide (heads x head_dim = d_model), so heads and d_model move together: give either and the other
follows, or both consistently. A single ratio r scales the heads to round(r x heads) (at least 1), hence
d_model to that many heads, and each FFN to round(r x ffn_dim) (at least 1).

Importance, each an |activation x gradient| of the model's own loss on a few training batches, in eval mode
(no dropout, so the same batches always give the same scores):

- heads: Michel et al. (2019)'s |d loss / d head_mask|. transformers 5 has no head masks any more, but a mask
  of 1 multiplying a head's output before out_proj has the gradient sum(output x gradient) over that head's
  features and positions, so it is read off out_proj's input; absolute per batch, summed over batches.
- FFN neurons: |a x d loss / d a| of each neuron's activation a (fc2's input: what dropping the neuron
  removes), absolute per token, summed over tokens and batches.
- hidden dimensions: one score per residual-stream dimension, |h x d loss / d h| summed over every LayerNorm
  output h (the embedding output and each sub-layer's output in post-LN BART; the normalised inputs and
  final states in pre-LN mBART), tokens and batches. One kept set serves the embeddings, every layer and the
  LM head, so the residual stream, the tied embedding and the encoder-decoder interface stay aligned.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Literal, get_args

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from dq_lightning.errors import UserError

WidthMethod = Literal["impt", "rand"]
WIDTH_METHODS = get_args(WidthMethod)
FLAG = "model.width"
KEYS = ("heads", "ffn", "d_model")


@dataclass(frozen=True)
class Widths:
    """The widths of a BART/mBART model that extraction can shrink."""

    d_model: int
    encoder_heads: int
    decoder_heads: int
    encoder_ffn: int
    decoder_ffn: int

    @classmethod
    def of(cls, config) -> Widths:
        return cls(config.d_model, config.encoder_attention_heads, config.decoder_attention_heads,
                   config.encoder_ffn_dim, config.decoder_ffn_dim)

    def head_dim(self, stack: str) -> int:
        return self.d_model // getattr(self, f"{stack}_heads")

    def config_settings(self) -> dict[str, int]:
        return dict(d_model=self.d_model, encoder_attention_heads=self.encoder_heads,
                    decoder_attention_heads=self.decoder_heads, encoder_ffn_dim=self.encoder_ffn,
                    decoder_ffn_dim=self.decoder_ffn)

    def applied_to(self, config):
        """A copy of the transformers `config` at these widths."""
        config = copy.deepcopy(config)
        for name, value in self.config_settings().items():
            setattr(config, name, value)
        return config


@dataclass(frozen=True)
class WidthSpec:
    """The student's widths, checked against its teacher's when built (`parse` reads the shorthand)."""

    student: Widths
    teacher: Widths
    method: WidthMethod = "impt"
    text: str = ""
    """The setting as the user typed it, for error messages."""

    def __post_init__(self) -> None:
        if self.method not in WIDTH_METHODS:
            self._refuse(f"the method (model.width_method) {self.method!r} is not one of {', '.join(WIDTH_METHODS)}")
        self._check_positive()
        for stack in ("encoder", "decoder"):
            heads, head_dim = getattr(self.student, f"{stack}_heads"), self.teacher.head_dim(stack)
            if self.student.d_model % heads:
                self._refuse(f"{heads} heads do not divide d_model {self.student.d_model}")
            if self.student.d_model // heads != head_dim:
                self._refuse(f"{heads} heads of d_model {self.student.d_model} are {self.student.d_model // heads}"
                             f" wide, but extraction keeps the teacher's {stack} head_dim {head_dim} "
                             f"(d_model = heads x {head_dim})")
        for field in fields(Widths):
            value, full = getattr(self.student, field.name), getattr(self.teacher, field.name)
            if value > full:
                self._refuse(f"{field.name} {value} is larger than the teacher's {full}")

    def _check_positive(self) -> None:
        for field in fields(Widths):
            value = getattr(self.student, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                self._refuse(f"{field.name} {value!r} must be a positive integer")

    def _refuse(self, reason: str) -> None:
        raise UserError(f"{FLAG}={self.text or self.student}: {reason}")

    @classmethod
    def parse(cls, text: str, teacher_config, method: WidthMethod = "impt") -> WidthSpec:
        """`text`: a ratio in (0, 1] or comma-separated `heads=`, `ffn=`, `d_model=` (unset: the teacher's)."""
        text = str(text).strip()
        teacher = Widths.of(teacher_config)
        settings = _settings(text) if "=" in text else _ratio_settings(text, teacher)
        return cls(_resolve(settings, teacher, text), teacher, method, text)

    @property
    def is_full(self) -> bool:
        return self.student == self.teacher


def _settings(text: str) -> dict[str, int]:
    settings: dict[str, int] = {}
    for item in text.split(","):
        key, _, value = (part.strip() for part in item.partition("="))
        if key not in KEYS:
            raise UserError(f"{FLAG}={text}: unknown key {key!r}; known: {', '.join(KEYS)}")
        if key in settings:
            raise UserError(f"{FLAG}={text}: {key} is given twice")
        if not value.isdigit():
            raise UserError(f"{FLAG}={text}: {key}={value!r} is not a positive integer")
        settings[key] = int(value)
    return settings


def _ratio_settings(text: str, teacher: Widths) -> dict[str, int]:
    try:
        ratio = float(text)
    except ValueError:
        raise UserError(f"{FLAG}={text!r} is neither a ratio in (0, 1] nor settings like "
                        f"'heads=8,ffn=1536,d_model=512' (keys: {', '.join(KEYS)})") from None
    if not 0 < ratio <= 1:
        raise UserError(f"{FLAG}={text}: the ratio must be in (0, 1]")
    heads = max(1, round(ratio * teacher.encoder_heads))
    return {"d_model": heads * teacher.head_dim("encoder"),
            "encoder_ffn": max(1, round(ratio * teacher.encoder_ffn)),
            "decoder_ffn": max(1, round(ratio * teacher.decoder_ffn))}


def _resolve(settings: Mapping[str, int], teacher: Widths, text: str) -> Widths:
    """The full widths of `settings`: d_model from the heads when only they are given; heads from d_model
    (per stack, at the teacher's head_dim) when they are not."""
    d_model = settings.get("d_model")
    if d_model is None:
        d_model = settings["heads"] * teacher.head_dim("encoder") if "heads" in settings else teacher.d_model
    heads = {}
    for stack in ("encoder", "decoder"):
        head_dim = teacher.head_dim(stack)
        if "heads" not in settings and d_model % head_dim:
            raise UserError(f"{FLAG}={text}: d_model {d_model} is not a whole number of the teacher's "
                            f"{stack} heads ({head_dim} wide; extraction keeps head_dim)")
        heads[stack] = settings.get("heads", d_model // head_dim)
    ffn = {stack: settings.get(f"{stack}_ffn", settings.get("ffn", getattr(teacher, f"{stack}_ffn")))
           for stack in ("encoder", "decoder")}
    return Widths(d_model, heads["encoder"], heads["decoder"], ffn["encoder"], ffn["decoder"])


@dataclass(frozen=True)
class Units:
    """One tensor per kind of width unit of a model: importance scores, or the indices `extract` kept.

    `heads` is keyed by attention module (`model.encoder.layers.0.self_attn`, `...decoder.layers.0.encoder_attn`
    for cross-attention) and `neurons` by layer (`model.decoder.layers.3`); `hidden` is the residual stream's.
    Indices are sorted, so a student's head j of layer i is the teacher's head `heads[...][j]`, and its hidden
    dimension k the teacher's `hidden[k]`: the dimensions and heads to compare when distilling. The layer
    indices are those of the model extracted from (after `copy_student`: the student's own).
    """

    hidden: Tensor
    heads: dict[str, Tensor]
    neurons: dict[str, Tensor]

    def keep(self, spec: WidthSpec) -> Units:
        """The indices of the highest scores at the sizes of `spec` (ties: the lower index)."""
        def top(scores: Tensor, count: int) -> Tensor:
            order = torch.sort(scores.detach().float().cpu(), descending=True, stable=True).indices
            return order[:count].sort().values

        size = spec.student
        return Units(top(self.hidden, size.d_model),
                     {path: top(s, getattr(size, f"{_stack(path)}_heads")) for path, s in self.heads.items()},
                     {path: top(s, getattr(size, f"{_stack(path)}_ffn")) for path, s in self.neurons.items()})


    def for_layers(self, maps: Mapping[str, Sequence[int]]) -> Units:
        """These units as a layer-copied student's: its layer i of each stack is this model's layer
        `maps[stack][i]` (keys renumbered to the student's layers); the residual stream's are shared."""
        def picked(group: dict[str, Tensor]) -> dict[str, Tensor]:
            found = {}
            for path, value in group.items():
                match = _LAYER_PATH.search(path)
                stack, layer = match.group(2), int(match.group(3))
                for index in (i for i, source in enumerate(maps[stack]) if source == layer):
                    found[_LAYER_PATH.sub(f"\\g<1>{stack}.layers.{index}", path)] = value
            return dict(sorted(found.items(), key=lambda item: _layer_order(item[0])))

        return Units(self.hidden, picked(self.heads), picked(self.neurons))

    def to_state(self) -> dict[str, Tensor | dict[str, Tensor]]:
        """Plain tensors and dicts, for a checkpoint read with torch.load(weights_only=True)."""
        return {"hidden": self.hidden, "heads": dict(self.heads), "neurons": dict(self.neurons)}

    @classmethod
    def from_state(cls, state: Mapping) -> Units:
        return cls(state["hidden"], dict(state["heads"]), dict(state["neurons"]))

    def equals(self, other: Units | None) -> bool:
        return other is not None and all(
            a.keys() == b.keys() and all(torch.equal(a[key].cpu(), b[key].cpu()) for key in a)
            for a, b in zip(self._groups(), other._groups()))

    def _groups(self) -> tuple[dict[str, Tensor], ...]:
        return {"": self.hidden}, self.heads, self.neurons

    def as_scores(self, full: Widths) -> Units:
        """Scores under which `keep` at these kept sizes chooses exactly these units (1 on a kept unit, 0
        elsewhere): a stored choice rebuilt without scoring again."""
        def indicator(kept: Tensor, size: int) -> Tensor:
            return torch.zeros(size).index_fill_(0, kept.long().cpu(), 1.0)

        return Units(indicator(self.hidden, full.d_model),
                     {path: indicator(k, getattr(full, f"{_stack(path)}_heads")) for path, k in self.heads.items()},
                     {path: indicator(k, getattr(full, f"{_stack(path)}_ffn")) for path, k in self.neurons.items()})

    def layer_heads(self, stack: str, attention: str) -> list[Tensor]:
        """The kept heads of each layer's `attention` (self_attn, encoder_attn) in `stack`, by layer index."""
        found = {}
        for path, heads in self.heads.items():
            match = _ATTENTION.search(path)
            if match and match.group(1, 3) == (stack, attention):
                found[int(match.group(2))] = heads
        return [found[index] for index in range(len(found))]


_LAYER_PATH = re.compile(r"(^|\.)(encoder|decoder)\.layers\.(\d+)(?=\.|$)")


def _layer_order(path: str) -> tuple:
    match = _LAYER_PATH.search(path)
    return (match.group(2) == "decoder", int(match.group(3)), path)


_ATTENTION = re.compile(r"(?:^|\.)(encoder|decoder)\.layers\.(\d+)\.(self_attn|encoder_attn)$")


def _stack(path: str) -> str:
    return "decoder" if ".decoder." in f".{path}." else "encoder"


def _attentions(model: nn.Module) -> dict[str, nn.Module]:
    return {path: module for path, module in model.named_modules() if hasattr(module, "out_proj")
            and hasattr(module, "q_proj")}


def _feed_forwards(model: nn.Module) -> dict[str, nn.Module]:
    return {path: module for path, module in model.named_modules() if hasattr(module, "fc1")
            and hasattr(module, "fc2")}


def _layer_norms(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if isinstance(module, nn.LayerNorm)]


def random_importance(model: PreTrainedModel, seed: int) -> Units:
    """ETD-Rand: scores drawn from a generator seeded with `seed`, so `keep` makes a seeded random choice."""
    generator = torch.Generator().manual_seed(seed)
    draw = lambda size: torch.rand(size, generator=generator)  # noqa: E731
    return Units(draw(model.config.d_model),
                 {path: draw(module.num_heads) for path, module in _attentions(model).items()},
                 {path: draw(module.fc1.out_features) for path, module in _feed_forwards(model).items()})


def importance(model: PreTrainedModel, batches: Iterable[Mapping[str, Tensor]]) -> Units:
    """ETD-Impt scores (module docstring) of `model` on `batches` of input_ids, attention_mask and labels.

    The model is left as it was: its mode, its parameters' requires_grad and their gradients.
    """
    attentions, feed_forwards = _attentions(model), _feed_forwards(model)
    scores = Units(torch.zeros(model.config.d_model),
                   {path: torch.zeros(module.num_heads) for path, module in attentions.items()},
                   {path: torch.zeros(module.fc1.out_features) for path, module in feed_forwards.items()})
    with _observing(model):
        handles = [norm.register_forward_hook(_track_hidden(scores)) for norm in _layer_norms(model)]
        handles += [module.out_proj.register_forward_pre_hook(_track_heads(scores.heads[path], module.num_heads))
                    for path, module in attentions.items()]
        handles += [module.fc2.register_forward_pre_hook(_track_neurons(scores.neurons[path]))
                    for path, module in feed_forwards.items()]
        try:
            for batch in batches:
                inputs = {key: batch[key].to(model.device) for key in ("input_ids", "attention_mask", "labels",
                                                                       "decoder_input_ids") if key in batch}
                model(**inputs).loss.backward()
        finally:
            for handle in handles:
                handle.remove()
    return scores


@contextlib.contextmanager
def _observing(model: nn.Module) -> Iterator[None]:
    """Eval mode (scores free of dropout's chance) and frozen parameters (no weight gradients to compute or to
    leave behind); gradients flow from the embedding outputs, made leaves by `_track_hidden`."""
    training, flags = model.training, [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for parameter, flag in zip(model.parameters(), flags):
            parameter.requires_grad_(flag)
        model.train(training)


def _on_gradient(activation: Tensor, add: Callable[[Tensor], None]) -> None:
    """Call `add(activation x its gradient)` when the backward pass reaches `activation`."""
    if activation.requires_grad:
        values = activation.detach()

        def on_gradient(gradient: Tensor) -> None:  # returning nothing leaves the gradient as it is
            add((values * gradient).float().cpu())

        activation.register_hook(on_gradient)


def _per_feature(products: Tensor) -> Tensor:
    return products.abs().flatten(0, -2).sum(dim=0)


def _track_hidden(scores: Units) -> Callable:
    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        if not output.requires_grad:  # the embedding's LayerNorm: the start of the observed graph
            output = output.detach().requires_grad_()
        _on_gradient(output, lambda products: scores.hidden.add_(_per_feature(products)))
        return output

    return hook


def _track_heads(total: Tensor, heads: int) -> Callable:
    def hook(module: nn.Module, inputs: tuple) -> None:
        _on_gradient(inputs[0], lambda products: total.add_(products.unflatten(-1, (heads, -1)).flatten(0, -3)
                                                            .sum(dim=(0, 2)).abs()))

    return hook


def _track_neurons(total: Tensor) -> Callable:
    def hook(module: nn.Module, inputs: tuple) -> None:
        _on_gradient(inputs[0], lambda products: total.add_(_per_feature(products)))

    return hook


def extract(model: PreTrainedModel, spec: WidthSpec, scores: Units) -> tuple[PreTrainedModel, Units]:
    """A new model of `model`'s class at the widths of `spec`, made of the slices of `model` that `scores`
    rank highest, and those kept indices. At the teacher's widths the copy equals the teacher exactly.

    Every d_model axis is sliced at the kept dimensions (token and positional embeddings, LayerNorms, every
    projection, the LM head; the vocabulary and final_logits_bias are whole), q/k/v rows and out_proj columns
    at the kept heads, fc1 rows and fc2 columns at the kept neurons. Tied weights stay tied.
    """
    kept = scores.keep(spec)
    student = type(model)(spec.student.applied_to(model.config)).to(model.dtype)
    plan = slicing_plan(model, kept, embedding_balance(model.config, student.config))
    student.load_state_dict({name: plan[name](tensor) for name, tensor in model.state_dict().items()})
    return student.to(model.device).train(model.training), kept


@dataclass(frozen=True)
class Slice:
    """How one tensor of a thinner model is taken from the wider model's tensor of the same name: the rows and
    columns kept (None: all), then scaled by `factor`. Differentiable (`index_select`), so a supernet can train
    the wider tensor through it."""

    rows: Tensor | None = None
    columns: Tensor | None = None
    factor: float = 1.0

    def __call__(self, tensor: Tensor) -> Tensor:
        if self.rows is not None:
            tensor = tensor.index_select(0, self.rows.to(tensor.device))
        if self.columns is not None and tensor.dim() > 1:
            tensor = tensor.index_select(1, self.columns.to(tensor.device))
        return tensor if self.factor == 1 else tensor * self.factor


def slicing_plan(model: nn.Module, kept: Units, position_factor: float = 1.0) -> dict[str, Slice]:
    """For every tensor of `model`'s state dict, the `Slice` that gives the thinner model's tensor of that name:
    the kept units (`_axes`), and for the positional embeddings `position_factor` (`embedding_balance`)."""
    axes = _axes(model, kept)
    positions = {path for path, module in model.named_modules()
                 if isinstance(module, nn.Embedding) and not hasattr(module, "embed_scale")}
    plan = {}
    for name in model.state_dict():
        path = name.rpartition(".")[0]
        rows, columns = axes.get(path, (None, None))
        plan[name] = Slice(rows, columns, position_factor if path in positions else 1.0)
    return plan


def _axes(model: nn.Module, kept: Units) -> dict[str, tuple[Tensor | None, Tensor | None]]:
    """Module path -> the indices kept along its weight's dimension 0 and 1 (a bias or a LayerNorm: 0 only)."""
    hidden = kept.hidden
    axes: dict[str, tuple[Tensor | None, Tensor | None]] = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            axes[path] = (hidden, None)
        elif isinstance(module, nn.Embedding):
            axes[path] = (None, hidden)
    for path, attention in _attentions(model).items():
        heads = kept.heads[path]
        features = (heads[:, None] * attention.head_dim + torch.arange(attention.head_dim)).flatten()
        axes.update({f"{path}.{name}": (features, hidden) for name in ("q_proj", "k_proj", "v_proj")})
        axes[f"{path}.out_proj"] = (hidden, features)
    for path, _ in _feed_forwards(model).items():
        axes[f"{path}.fc1"] = (kept.neurons[path], hidden)
        axes[f"{path}.fc2"] = (hidden, kept.neurons[path])
    head = model.get_output_embeddings()
    axes[next(path for path, module in model.named_modules() if module is head)] = (None, hidden)
    return axes


def embedding_balance(teacher_config, student_config) -> float:
    """The factor on a thinner student's positional embeddings. With scale_embedding the token embedding is
    multiplied by sqrt(d_model), which a narrower config lowers; its weight is the LM head's too and cannot be
    rescaled. Scaling the positional embeddings by the same factor keeps the token-to-position balance, and the
    LayerNorm that follows their sum undoes the common factor: the embedding output is the teacher's (at the
    kept dimensions, renormalised), not a mix tilted towards positions. Without scale_embedding the factor is 1."""
    if not getattr(teacher_config, "scale_embedding", False):
        return 1.0
    return math.sqrt(student_config.d_model) / math.sqrt(teacher_config.d_model)
