"""One sub-network of a supernet: the model of an ordinary DQ student, run on tensors taken from the supernet.

The supernet is one latent full-precision student of the teacher's depth and width. A sub-network at bits
W-E-A, depth E-D and a width is what `DQStudentModule` would train at that point: a student built by the same
factory (`TeacherAndStudent.for_recipe`: the recipe's layer map, a thinner width's kept units) and prepared
with the quantizers of its bits. Here that student is a *skeleton*: its own weights are dropped, and every
forward takes them from the supernet instead, through a `Slice` per tensor (its layers' rows and columns of
the supernet's, `dq_lightning.distill.width.slicing_plan`), with `torch.func.functional_call`. So:

- bits nest by sharing: every width quantizes the same latent weights with its own ordinary quantizer (its
  scale computed from them on every forward, as in the student); a 2-bit and an 8-bit point train one tensor;
- depth nests by the layer map: a sub-network's layer i is the supernet's layer `map[i]`, the teacher layer a
  separately trained student would copy and be distilled against;
- width nests by importance: a thinner sub-network keeps the supernet's most important units (scored once,
  `Units.for_layers`), so a narrower width's units are a subset of a wider one's.

Gradients of every sub-network's loss flow through the slices into the supernet's latent tensors; `state()`
gives the same tensors detached, which is how an extracted student gets exactly the weights the sub-network
computed with.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call
from transformers import PreTrainedModel

from dq_lightning.distill.recipe import ResolvedRecipe
from dq_lightning.distill.student import TeacherAndStudent, copy_student
from dq_lightning.distill.width import Slice, Units, embedding_balance, slicing_plan
from dq_lightning.quant import QuantConfig, prepare, set_quantization_enabled
from dq_lightning.supernet.grid import SubNet

_LAYER = re.compile(r"(^|\.)(encoder|decoder)\.layers\.(\d+)(?=\.|$)")


def relayered(name: str, maps: dict[str, list[int]]) -> str:
    """A sub-network's tensor name as the supernet's: its layer i of a stack is the supernet's `map[i]`."""
    return _LAYER.sub(lambda m: f"{m.group(1)}{m.group(2)}.layers.{maps[m.group(2)][int(m.group(3))]}", name)


@dataclass(frozen=True)
class Source:
    """Where one of a skeleton's tensors comes from: the supernet tensor `name`, sliced."""

    name: str
    slice: Slice


class SubNetwork:
    """The skeleton of one grid point and the plan that fills it from the supernet (module docstring)."""

    def __init__(self, subnet: SubNet, teacher: str, recipe: ResolvedRecipe, scores: Units | None):
        """
        Args:
            subnet: the grid point.
            teacher: the teacher directory the supernet was copied from.
            recipe: the resolved recipe (layer maps, quantizers, attention maps) shared by every point.
            scores: the supernet's unit importance at full depth (`Units`), for a thinner point.
        """
        self.subnet = subnet
        encoder_layers, decoder_layers = subnet.layers
        self.factory = TeacherAndStudent.for_recipe(teacher, recipe, "dq", encoder_layers, decoder_layers,
                                                    subnet.width)
        self.quant_config: QuantConfig | None = recipe.quant_config(subnet.bits)
        self.maps = {"encoder": self.factory.encoder_map, "decoder": self.factory.decoder_map}
        self.kept: Units | None = None
        if subnet.width is not None:
            self.kept = scores.for_layers(self.maps).keep(self.factory.width)
            self.factory.keep_width(self.kept)
        skeleton = self.factory.new_student()
        self.sources = self._plan(skeleton)
        if self.quant_config is not None:
            prepare(skeleton, self.quant_config)
        # Every state-dict name -> the first name of its tensor: tied weights (the token embedding, its
        # lookups and the LM head) are one tensor, given once to functional_call, whose ties follow it.
        first: dict[int, str] = {}
        tensors = [*skeleton.named_parameters(remove_duplicate=False), *skeleton.named_buffers(remove_duplicate=False)]
        self._canonical = {name: first.setdefault(id(tensor), name) for name, tensor in tensors}
        self._names = list(dict.fromkeys(self._canonical.values()))
        self.skeleton = _hollow(skeleton)

    def _plan(self, skeleton: PreTrainedModel) -> dict[str, Source]:
        plan: dict[str, Slice] = {}
        if self.kept is not None:
            copied = copy_student(self.factory.teacher, self.maps["encoder"], self.maps["decoder"])
            plan = slicing_plan(copied, self.kept, embedding_balance(copied.config, skeleton.config))
        return {name: Source(relayered(name, self.maps), plan.get(name, Slice()))
                for name in skeleton.state_dict()}

    @property
    def encoder_map(self) -> list[int]:
        return self.maps["encoder"]

    @property
    def decoder_map(self) -> list[int]:
        return self.maps["decoder"]

    def set_training(self, mode: bool) -> None:
        """Train or eval mode (dropout) for the skeleton's forward. Module by module: transformers' own
        `PreTrainedModel.train` prepares kernels for the weights' device, which a skeleton's meta weights have
        not."""
        for module in self.skeleton.modules():
            module.training = mode

    def tensors(self, latent: dict[str, Tensor]) -> dict[str, Tensor]:
        """The skeleton's tensors taken from the supernet's `latent` tensors (by name; gradients flow)."""
        return {name: self.sources[name].slice(latent[self.sources[name].name]) for name in self._names}

    def __call__(self, latent: dict[str, Tensor], quantize: bool = True, **inputs) -> object:
        """The forward of this point's student on the supernet's tensors; `quantize` False is the warm-up's
        full precision."""
        set_quantization_enabled(self.skeleton, quantize)
        return functional_call(self.skeleton, self.tensors(latent), args=(), kwargs=inputs, tie_weights=True,
                               strict=True)

    @torch.no_grad()
    def state(self, latent: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every state-dict tensor of this point's student (tied names included), detached copies."""
        gathered = {name: tensor.detach().clone() for name, tensor in self.tensors(latent).items()}
        return {name: gathered[self._canonical[name]] for name in self.sources}

    def materialized(self, latent: dict[str, Tensor], device: torch.device | None = None) -> PreTrainedModel:
        """A real model of this point with the supernet's current weights (detached, in eval mode): for
        generation, which `functional_call` cannot drive."""
        model = copy.deepcopy(self.skeleton)
        tensors = self.state(latent)
        new: dict[int, nn.Parameter] = {}
        for name, old in list(model.named_parameters(remove_duplicate=False)):
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            if id(old) not in new:
                new[id(old)] = nn.Parameter(tensors[name].to(device) if device else tensors[name],
                                            requires_grad=False)
            module._parameters[leaf] = new[id(old)]
        for name, buffer in list(model.named_buffers()):
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = tensors[name].to(device or buffer.device)
        set_quantization_enabled(model, True)
        return model.eval()


def _hollow(model: PreTrainedModel) -> PreTrainedModel:
    """`model` with every parameter on the meta device (tied ones still one object): a skeleton whose tensors
    always come from the supernet, so that a grid of sub-networks costs no copies of the weights."""
    hollow: dict[int, nn.Parameter] = {}
    for name, parameter in list(model.named_parameters(remove_duplicate=False)):
        owner, _, leaf = name.rpartition(".")
        if id(parameter) not in hollow:
            hollow[id(parameter)] = nn.Parameter(torch.empty_like(parameter, device="meta"),
                                                 requires_grad=parameter.requires_grad)
        model.get_submodule(owner)._parameters[leaf] = hollow[id(parameter)]
    return model
