"""What a loaded packed model computes with, besides standard transformers modules.

- Activation quantization: the student was trained with every quantized Linear's input fake-quantized at
  A bits. A loaded model keeps the standard `nn.Linear` class and gets the same quantizer as a child module
  `input_quantizer`, applied by a forward pre-hook with `FakeQuantizer.inference`, the computation a
  converted student's `ConvertedLinear` uses, so its outputs equal the fake-quantized student's. (The
  loaded model keeps standard `nn.Linear` modules holding the dequantized weight, so that it is a plain
  transformers model; a converted student holds the codes.)
- int8 inference: `int8_linear` turns a packed weight's integer codes and scales into PyTorch's dynamic
  quantized Linear (`torch.ao.nn.quantized.dynamic.Linear`, fbgemm/x86 int8 GEMM with int32 accumulation).
  The weights are the exported codes themselves (per-row scales become per-channel qint8 scales), so no
  weight is rounded twice. The kernel quantizes its input to 8 bits on every call (per tensor, from the
  input's range). For a student with 8-bit min-max activations that replaces the student's own 8-bit rounding,
  so only the student's clip is applied before it (`attach_input_clip`); activations of fewer bits, or LSQ,
  keep the student's quantizer, then the kernel's rounding. Either way the activations are rounded on a
  different grid than in training, which is why the int8 path is close to, but not token-identical with, the
  fake-quantized student.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from dq_lightning.quant.quantizers import FakeQuantizer

INPUT_QUANTIZER_ATTR = "input_quantizer"


def _quantize_input(module: nn.Module, args: tuple):
    return (getattr(module, INPUT_QUANTIZER_ATTR).inference(args[0]), *args[1:])


def _clip_input(module: nn.Module, args: tuple):
    clip = module.input_clip
    return (args[0].clamp(-clip, clip), *args[1:])


def attach_input_quantizer(linear: nn.Module, quantizer: FakeQuantizer) -> None:
    """Quantize `linear`'s input with `quantizer` on every forward (a child module plus a pre-hook)."""
    setattr(linear, INPUT_QUANTIZER_ATTR, quantizer)
    linear.register_forward_pre_hook(_quantize_input)


def attach_input_clip(linear: nn.Module, clip: float | None) -> None:
    """Clip `linear`'s input to [-clip, clip] on every forward (nothing for None)."""
    linear.input_clip = clip
    if clip is not None:
        linear.register_forward_pre_hook(_clip_input)


def kernel_rounding_suffices(quantizer: FakeQuantizer) -> bool:
    """Whether an int8 kernel's own 8-bit input quantization can stand in for `quantizer` (8-bit min-max)."""
    return quantizer.bits == 8 and quantizer.method in ("minmax", "asym_minmax")


def int8_available() -> bool:
    return any(engine in torch.backends.quantized.supported_engines for engine in ("x86", "fbgemm", "qnnpack"))


def int8_linear(codes: Tensor, scale: Tensor, bias: Tensor | None) -> nn.Module:
    """A dynamic int8 Linear whose weight is exactly `codes * scale` (codes: int8 [out, in]; scale: one per
    row, shape [out, 1], or one per tensor)."""
    from torch.ao.nn.quantized import dynamic as nnqd

    out_features, in_features = codes.shape
    codes = codes.to(torch.int8).contiguous()
    with warnings.catch_warnings():
        # PyTorch marks its quantized-tensor constructors as deprecated (moving to torchao); they still work.
        warnings.simplefilter("ignore")
        if scale.numel() == 1:
            weight = torch._make_per_tensor_quantized_tensor(codes, float(scale.reshape(())), 0)
        else:
            weight = torch._make_per_channel_quantized_tensor(
                codes, scale.reshape(-1).to(torch.float64), torch.zeros(out_features, dtype=torch.int64), 0)
        module = nnqd.Linear(in_features, out_features, bias_=bias is not None, dtype=torch.qint8)
        module.set_weight_bias(weight, None if bias is None else bias.detach().float().contiguous())
    return module
