"""ONNX graphs of a BART/mBART model (`build_graphs`), written node by node so that the quantized parts are
what the student trained with.

Three graphs, run by `dq_lightning.export.onnx_runtime`:

- `encoder.onnx`: input_ids, attention_mask -> last_hidden_state;
- `cross.onnx`: encoder_hidden_states -> each decoder layer's cross-attention key and value, as the decoder
  reads them: integer codes and their scale when the attention operands are quantized (a cross-attention key or
  value is the same tensor at every decoding step, so its codes are computed once instead of at every step;
  beam reordering only permutes identical rows of one example, so the per-tensor grid is unchanged);
- `decoder.onnx`: one decoding step (input_ids [batch, 1]), the self-attention keys and values of the steps
  before (empty at the first step), the cross-attention operands and the encoder mask -> logits and this
  step's keys and values.

Quantized parts:

- a quantized weight is an int8 initializer holding the exported codes (transposed to [in, out]) with its
  FP32 scale per output column: the codes are never rounded again;
- a Linear whose input the student quantizes runs as an integer MatMul (`MatMulIntegerToFloat`, int32
  accumulation) on the codes of the input, computed as the student computes them:
  symmetric min-max `scale = max(min(max|x|, clip), 1e-8) / qmax`, `codes = clip(round(x / scale), -qmax,
  qmax)` (Div, Round and Clip, the same float operations as PyTorch, round half to even in both), per tensor
  or per row; an LSQ quantizer with its learned step. Activation codes travel as uint8 `code + 128` with zero
  point 128 and wide weight codes likewise, the operand types ONNX Runtime's AVX2 kernels run fast and exactly
  (its int8 x int8 kernel is several times slower there, and uint8 x int8 sums pairs into int16, which only
  narrow weight codes such as ternary ones cannot overflow); an asymmetric quantizer is computed in float
  (fake-quantized) before a float MatMul, since its zero point has no int8 x int8 form;
- attention operands (recipe dq-bart: query after scaling, key, value, probabilities) the same way, with
  integer MatMuls for the two attention products;
- a Linear whose input is not quantized (the tied LM head of the dq-bart recipe) multiplies by the
  dequantized codes: `Cast(codes) * scale` of initializers, which ONNX Runtime folds into one float matrix
  when the session is created (the file keeps the int8 codes).

A full-precision model (the teacher) is the same graphs with float initializers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from dq_lightning.errors import UserError
from dq_lightning.export.deploy_source import DeploySource

OPSET = 17
FLOAT, UINT8, INT8, INT16, INT64 = 1, 2, 3, 5, 7  # onnx.TensorProto element types
OFFSET = 128  # activation codes travel as uint8 code + 128 (zero point 128)
MS_DOMAIN = "com.microsoft"
MIN_RANGE = 1e-8  # dq_lightning.quant.quantizers._MIN_RANGE


class Builder:
    """A graph under construction: nodes, initializers, inputs and outputs, with unique value names."""

    def __init__(self, name: str):
        self.name = name
        self.nodes: list = []
        self.initializers: dict[str, Any] = {}
        self.inputs: list = []
        self.outputs: list = []
        self._count = 0
        self._constants: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def initializer(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        if name not in self.initializers:
            # Not np.ascontiguousarray: it makes a 0-d array (a scalar scale) 1-d.
            self.initializers[name] = numpy_helper.from_array(np.array(array, order="C", copy=True), name)
        return name

    def const(self, value, dtype=np.float32) -> str:
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            self._constants[key] = self.initializer(self.fresh("const"), array)
        return self._constants[key]

    def op(self, op_type: str, *inputs: str, outputs: int = 1, domain: str = "", **attributes):
        from onnx import helper

        names = [self.fresh(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, domain=domain or None, **attributes))
        return names[0] if outputs == 1 else names

    def input(self, name: str, elem_type: int, shape: list) -> str:
        from onnx import helper

        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: list) -> None:
        from onnx import helper

        self.nodes.append(helper.make_node("Identity", [value], [name]))
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def model(self):
        from onnx import helper

        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, list(self.initializers.values()))
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid(MS_DOMAIN, 1)],
                                  producer_name="dq_lightning")
        model.ir_version = 8
        return model


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().contiguous().numpy()


class Quantized:
    """A quantized operand: integer `codes` (a value name; uint8 holding code + 128) and its `scale`, whose
    `layout` is "tensor" (a scalar), "row" (one per row: shape [..., rows, 1]) or "column" ([..., 1, columns], a
    transposed row layout); or, for a quantizer with no integer-MatMul form, `value`, the fake-quantized float
    tensor."""

    def __init__(self, codes: str | None = None, scale: str | None = None, layout: str = "tensor",
                 value: str | None = None):
        self.codes, self.scale, self.layout, self.value = codes, scale, layout, value

    @property
    def integer(self) -> bool:
        return self.codes is not None


class BartGraphs:
    """Writes the three graphs of one model; each method adds its nodes to `self.g`, the current builder."""

    def __init__(self, source: DeploySource):
        self.source = source
        self.model = source.model
        self.config = source.model.config
        self.pre_norm = self.config.model_type == "mbart"
        self.heads_encoder = self.config.encoder_attention_heads
        self.heads_decoder = self.config.decoder_attention_heads
        self.g: Builder = Builder("unset")
        self.float_min = float(torch.finfo(torch.float32).min)
        self.names: dict[int, str] = {}
        for name, tensor in [*self.model.named_parameters(remove_duplicate=False),
                             *self.model.named_buffers(remove_duplicate=False)]:
            self.names.setdefault(id(tensor), name)

    # -- quantizers -------------------------------------------------------------------------------------------
    def quantize(self, x: str, quantizer) -> Quantized:
        """`quantizer.inference(x)` (see `dq_lightning.quant.quantizers`) as graph nodes."""
        g = self.g
        method = quantizer.method
        row = quantizer.granularity == "row"
        if method == "minmax":
            qmax = quantizer.qmax
            high = g.op("ReduceMax", g.op("Abs", x), axes=[-1], keepdims=1) if row else \
                g.op("ReduceMax", g.op("Abs", x), keepdims=0)
            if quantizer.clip is not None:
                high = g.op("Min", high, g.const(quantizer.clip))
            scale = g.op("Div", g.op("Max", high, g.const(MIN_RANGE)), g.const(float(qmax)))
            codes = g.op("Clip", g.op("Round", g.op("Div", x, scale)), g.const(-float(qmax)), g.const(float(qmax)))
            return Quantized(self._offset(codes), scale, "row" if row else "tensor")
        if method == "lsq":
            if not bool(quantizer.initialized):
                # PyTorch would set the step from the first tensor it quantizes; a fixed graph cannot.
                raise UserError("an LSQ activation quantizer of this student never quantized a tensor (its step "
                                "was never set, the student is untrained); export a trained checkpoint")
            step = quantizer.step.detach().clamp(min=MIN_RANGE)
            scale = g.const(_numpy(step))
            codes = g.op("Clip", g.op("Round", g.op("Div", x, scale)), g.const(float(quantizer.qmin)),
                         g.const(float(quantizer.qmax)))
            return Quantized(self._offset(codes), scale)
        if method == "asym_minmax":
            return Quantized(value=self._asymmetric(x, quantizer, row))
        # The tbt recipe's elastic learned-step quantizers (and any later kind) have no graph form here yet: refused
        # before anything is written, rather than exported as a different model.
        raise UserError(f"--format onnx: this student's {method} activation quantizers have no ONNX form (only "
                        f"minmax, lsq and asym_minmax have); run it with `predict --model <packed export>` (torch "
                        f"or int8 runtime) instead")

    def _offset(self, codes: str) -> str:
        """Signed integer codes (held in a float tensor, in [-128, 127]) as uint8 `code + 128`: exact, and the
        form ONNX Runtime's fast int8 kernels take on AVX2 (uint8 activations with a zero point; its int8 x int8
        kernel is several times slower there)."""
        return self.g.op("Cast", self.g.op("Add", codes, self.g.const(float(OFFSET))), to=UINT8)

    def _asymmetric(self, x: str, quantizer, row: bool) -> str:
        """`AsymMinMaxQuantizer.inference` in float: the grid spans [min(x, 0), max(x, 0)] with a zero point."""
        g = self.g
        reduce = dict(axes=[-1], keepdims=1) if row else dict(keepdims=0)
        low, high = g.op("ReduceMin", x, **reduce), g.op("ReduceMax", x, **reduce)
        clipped = x
        if quantizer.clip is not None:
            low, high = g.op("Max", low, g.const(-quantizer.clip)), g.op("Min", high, g.const(quantizer.clip))
            clipped = g.op("Clip", x, g.const(-quantizer.clip), g.const(quantizer.clip))
        low, high = g.op("Min", low, g.const(0.0)), g.op("Max", high, g.const(0.0))
        qmax = g.const(float(quantizer.qmax))
        scale = g.op("Div", g.op("Max", g.op("Sub", high, low), g.const(MIN_RANGE)), qmax)
        zero = g.op("Clip", g.op("Round", g.op("Div", g.op("Neg", low), scale)), g.const(0.0), qmax)
        codes = g.op("Clip", g.op("Add", g.op("Round", g.op("Div", clipped, scale)), zero), g.const(0.0), qmax)
        return g.op("Mul", g.op("Sub", codes, zero), scale)

    def dequantized(self, q: Quantized) -> str:
        if not q.integer:
            return q.value
        g = self.g
        return g.op("Mul", g.op("Sub", g.op("Cast", q.codes, to=FLOAT), g.const(float(OFFSET))), q.scale)

    def matmul(self, a: Quantized | str, b: Quantized | str) -> str:
        """a @ b (numpy matmul semantics) of two activations: an integer MatMul when both are int8 codes whose
        scales factor out of the sum (a per tensor or per row, b per tensor or per column), else a float MatMul
        of the dequantized operands."""
        g = self.g
        if isinstance(a, Quantized) and isinstance(b, Quantized) and a.integer and b.integer \
                and a.layout in ("tensor", "row") and b.layout in ("tensor", "column"):
            zero = g.const(OFFSET, np.uint8)
            product = g.op("Cast", g.op("MatMulInteger", a.codes, b.codes, zero, zero), to=FLOAT)
            if a.layout == b.layout == "tensor":
                return g.op("Mul", product, g.op("Mul", a.scale, b.scale))
            return g.op("Mul", g.op("Mul", product, a.scale), b.scale)
        a = self.dequantized(a) if isinstance(a, Quantized) else a
        b = self.dequantized(b) if isinstance(b, Quantized) else b
        return g.op("MatMul", a, b)

    # -- layers ------------------------------------------------------------------------------------------------
    def linear(self, x: str, module_name: str) -> str:
        """`module(x)` of the model's Linear `module_name`, with its input quantizer if it has one."""
        g = self.g
        module: nn.Linear = self.model.get_submodule(module_name)
        prefix = module_name
        bias = self.tensor(module.bias) if module.bias is not None else None
        codes = self.source.weight_codes(f"{module_name}.weight")
        quantizer = getattr(module, "input_quantizer", None)
        if codes is not None and quantizer is not None:
            q = self.quantize(x, quantizer)
            if q.integer:
                return self._integer_linear(q, codes, prefix, bias)
            x = q.value
        elif quantizer is not None:  # full-precision weight, quantized input (W = 32 bits)
            x = self.dequantized(self.quantize(x, quantizer))
        weight = self._float_weight(module, codes, prefix)
        y = g.op("MatMul", x, weight)
        return g.op("Add", y, bias) if bias is not None else y

    def _float_weight(self, module: nn.Linear, codes, prefix: str) -> str:
        """[in, out] weight for MatMul: the stored [out, in] matrix (float, or `Cast(codes) * scale`) behind a
        Transpose; ONNX Runtime folds both into one float initializer when it creates the session."""
        g = self.g
        if codes is None:
            return g.op("Transpose", self.tensor(module.weight), perm=[1, 0])
        stored, scale = self.codes(prefix, codes)
        return g.op("Transpose", g.op("Mul", g.op("Cast", stored, to=1), scale), perm=[1, 0])

    def _integer_linear(self, q: Quantized, codes, prefix: str, bias: str | None) -> str:
        g = self.g
        stored, scale = self.codes(prefix, codes)
        # Folded into a constant when the session is created. uint8 x int8 products are summed in pairs into
        # int16 on AVX2 (saturating): exact while 2 * 255 * max|code| fits, as for ternary and low-bit codes;
        # wider codes go in as uint8 + 128 (uint8 x uint8 is summed in int32).
        weight = g.op("Transpose", stored, perm=[1, 0])
        weight_zero = ""
        if 2 * 255 * int(codes[0].abs().max()) > 32767:
            weight = g.op("Cast", g.op("Add", g.op("Cast", weight, to=INT16), g.const(OFFSET, np.int16)), to=UINT8)
            weight_zero = g.const(OFFSET, np.uint8)
        column_scale = g.op("Reshape", scale, g.const([-1], np.int64))
        activation_zero = g.const(OFFSET, np.uint8)
        if q.layout == "tensor":
            inputs = [q.codes, weight, q.scale, column_scale, activation_zero, weight_zero] + ([bias] if bias else [])
            return g.op("MatMulIntegerToFloat", *inputs, domain=MS_DOMAIN)
        product = g.op("Cast", g.op("MatMulInteger", q.codes, weight, activation_zero, *([weight_zero] if weight_zero
                                                                                            else [])), to=FLOAT)
        y = g.op("Mul", g.op("Mul", product, q.scale), column_scale)
        return g.op("Add", y, bias) if bias is not None else y

    def codes(self, module_name: str, codes) -> tuple[str, str]:
        """Initializers of a packed weight's int8 codes [out, in] and scale ([out, 1] or a scalar), named by the
        stored weight they come from, so tied modules share them."""
        weight_codes, scale = codes
        owner = _codes_owner(self.source, module_name)
        return (self.g.initializer(f"{owner}.codes", _numpy(weight_codes)),
                self.g.initializer(f"{owner}.scale", _numpy(scale)))

    def tensor(self, tensor: torch.Tensor) -> str:
        """A float parameter or buffer of the model as an initializer, named by its first (state dict) name."""
        return self.g.initializer(self.names[id(tensor)], _numpy(tensor))

    def layer_norm(self, x: str, module_name: str) -> str:
        module = self.model.get_submodule(module_name)
        g = self.g
        return g.op("LayerNormalization", x, self.tensor(module.weight), self.tensor(module.bias), axis=-1,
                    epsilon=float(module.eps))

    def activation(self, x: str) -> str:
        name = self.config.activation_function
        g = self.g
        if name == "gelu":  # exact (erf) GELU, as torch.nn.functional.gelu
            erf = g.op("Erf", g.op("Div", x, g.const(math.sqrt(2.0))))
            return g.op("Mul", g.op("Mul", x, g.const(0.5)), g.op("Add", erf, g.const(1.0)))
        if name == "relu":
            return g.op("Relu", x)
        raise ValueError(f"activation {name!r} has no ONNX form here (gelu or relu)")

    def embed(self, ids: str, start: str, prefix: str) -> str:
        """Token embedding (int8 codes looked up and scaled per row) * embed_scale, plus learned positions from
        `start` (a scalar int64), then layernorm_embedding."""
        g = self.g
        stack = self.model.get_submodule(prefix)
        tokens = stack.embed_tokens
        codes = self.source.weight_codes(f"{prefix}.embed_tokens.weight")
        if codes is None:
            embedded = g.op("Gather", self.tensor(tokens.weight), ids)
        else:
            table, scale = self.codes(f"{prefix}.embed_tokens", codes)
            looked_up = g.op("Cast", g.op("Gather", table, ids), to=1)
            per_row = codes[1].numel() > 1
            embedded = g.op("Mul", looked_up, g.op("Gather", scale, ids) if per_row else scale)
        embed_scale = getattr(tokens, "embed_scale", None)
        if embed_scale is not None:
            embedded = g.op("Mul", embedded, g.const(float(embed_scale)))
        positions = stack.embed_positions
        length = g.op("Gather", g.op("Shape", ids), g.const(1, np.int64), axis=0)
        index = g.op("Add", g.op("Range", start, g.op("Add", start, length), g.const(1, np.int64)),
                     g.const(positions.offset, np.int64))
        hidden = g.op("Add", embedded, g.op("Gather", self.tensor(positions.weight), index))
        return self.layer_norm(hidden, f"{prefix}.layernorm_embedding")

    def heads(self, x: str, heads: int) -> str:
        """[batch, time, d_model] -> [batch, heads, time, head_dim]."""
        g = self.g
        split = g.op("Reshape", x, g.const([0, 0, heads, self.config.d_model // heads], np.int64))
        return g.op("Transpose", split, perm=[0, 2, 1, 3])

    def merge_heads(self, x: str) -> str:
        g = self.g
        return g.op("Reshape", g.op("Transpose", x, perm=[0, 2, 1, 3]), g.const([0, 0, self.config.d_model], np.int64))

    def attention(self, prefix: str, query_in: str, key, value, mask: str | None, heads: int) -> str:
        """Attention of module `prefix`: query from `query_in`; `key`/`value` are head-split float tensors, or
        `Quantized` operands already (cached cross-attention codes); `mask` additive, broadcast over heads."""
        g = self.g
        module = self.model.get_submodule(prefix)
        quant = getattr(module, "attention_input_quantizer", None)
        query = self.heads(self.linear(query_in, f"{prefix}.q_proj"), heads)
        scaling = g.const(float(module.scaling))
        if quant is None:
            scores = g.op("Mul", g.op("MatMul", query, g.op("Transpose", key, perm=[0, 1, 3, 2])), scaling)
        else:
            if quant.scale_query_first:
                q = self.quantize(g.op("Mul", query, scaling), quant.query)
            else:
                q = self.quantize(query, quant.query)
            k = key if isinstance(key, Quantized) else self.quantize(key, quant.key)
            scores = self.matmul(q, _transposed(g, k))
            if not quant.scale_query_first:
                scores = g.op("Mul", scores, scaling)
            value = value if isinstance(value, Quantized) else self.quantize(value, quant.value)
        if mask is not None:
            scores = g.op("Add", scores, mask)
        probs = g.op("Softmax", scores, axis=-1)
        if quant is not None:
            probs = self.quantize(probs, quant.probs)
        output = self.matmul(probs, value)
        return self.linear(self.merge_heads(output), f"{prefix}.out_proj")

    def key_value(self, states: str, prefix: str, heads: int) -> tuple[str, str]:
        return (self.heads(self.linear(states, f"{prefix}.k_proj"), heads),
                self.heads(self.linear(states, f"{prefix}.v_proj"), heads))

    def block(self, x: str, sublayer, norm: str) -> str:
        """A residual sub-layer: post-LN (BART) `norm(x + f(x))`, pre-LN (mBART) `x + f(norm(x))`."""
        if self.pre_norm:
            return self.g.op("Add", x, sublayer(self.layer_norm(x, norm)))
        return self.layer_norm(self.g.op("Add", x, sublayer(x)), norm)

    def feed_forward(self, prefix: str):
        return lambda h: self.linear(self.activation(self.linear(h, f"{prefix}.fc1")), f"{prefix}.fc2")

    def padding_mask(self, attention_mask: str) -> str:
        """[batch, source] 0/1 -> additive [batch, 1, 1, source]: 0 where attended, float32 min elsewhere (as
        transformers' eager mask)."""
        g = self.g
        keep = g.op("Cast", attention_mask, to=9)  # bool
        mask = g.op("Where", keep, g.const(0.0), g.const(self.float_min))
        return g.op("Unsqueeze", mask, g.const([1, 2], np.int64))


def _transposed(g: Builder, q: Quantized) -> Quantized:
    """The operand with its last two axes swapped (a key for query @ key^T)."""
    if not q.integer:
        return Quantized(value=g.op("Transpose", q.value, perm=[0, 1, 3, 2]))
    codes = g.op("Transpose", q.codes, perm=[0, 1, 3, 2])
    if q.layout == "tensor":
        return Quantized(codes, q.scale, "tensor")
    flipped = {"row": "column", "column": "row"}[q.layout]
    return Quantized(codes, g.op("Transpose", q.scale, perm=[0, 1, 3, 2]), flipped)


def _codes_owner(source: DeploySource, module_name: str) -> str:
    """The stored weight a (possibly tied) weight's codes come from, so tied modules share one initializer."""
    manifest = source.manifest or {}
    weight = f"{module_name}.weight"
    return manifest.get("aliases", {}).get(weight, weight).removesuffix(".weight")


# -- the three graphs --------------------------------------------------------------------------------------------


def cross_mode(source: DeploySource) -> str:
    """How the decoder receives cross-attention keys and values: "float" (not quantized), "codes" (int8 codes and
    scales) or "fake" (fake-quantized float values, for a quantizer with no int8 form)."""
    attention = source.model.get_submodule("model.decoder.layers.0.encoder_attn")
    quant = getattr(attention, "attention_input_quantizer", None)
    if quant is None:
        return "float"
    return "codes" if quant.key.method in ("minmax", "lsq") and quant.value.method in ("minmax", "lsq") else "fake"


def cross_scale_shape(quantizer) -> list:
    return ["batch", "heads", "source", 1] if quantizer.granularity == "row" else []


class _Graphs(BartGraphs):
    def encoder(self):
        g = self.g = Builder("encoder")
        ids = g.input("input_ids", INT64, ["batch", "source"])
        attention_mask = g.input("attention_mask", INT64, ["batch", "source"])
        hidden = self.embed(ids, g.const(0, np.int64), "model.encoder")
        mask = self.padding_mask(attention_mask)
        heads = self.heads_encoder
        for index in range(self.config.encoder_layers):
            prefix = f"model.encoder.layers.{index}"

            def self_attention(x, prefix=prefix):
                key, value = self.key_value(x, f"{prefix}.self_attn", heads)
                return self.attention(f"{prefix}.self_attn", x, key, value, mask, heads)

            hidden = self.block(hidden, self_attention, f"{prefix}.self_attn_layer_norm")
            hidden = self.block(hidden, self.feed_forward(prefix), f"{prefix}.final_layer_norm")
        if self.pre_norm:
            hidden = self.layer_norm(hidden, "model.encoder.layer_norm")
        g.output(hidden, "last_hidden_state", FLOAT, ["batch", "source", self.config.d_model])
        return g

    def cross(self):
        g = self.g = Builder("cross")
        states = g.input("encoder_hidden_states", FLOAT, ["batch", "source", self.config.d_model])
        mode = cross_mode(self.source)
        for index in range(self.config.decoder_layers):
            prefix = f"model.decoder.layers.{index}.encoder_attn"
            key, value = self.key_value(states, prefix, self.heads_decoder)
            quant = getattr(self.model.get_submodule(prefix), "attention_input_quantizer", None)
            for name, tensor, quantizer in (("key", key, quant and quant.key), ("value", value, quant and quant.value)):
                shape = ["batch", "heads", "source", "head_dim"]
                if mode == "float":
                    g.output(tensor, f"cross_{name}_{index}", FLOAT, shape)
                    continue
                q = self.quantize(tensor, quantizer)
                if mode == "codes":
                    g.output(q.codes, f"cross_{name}_{index}", UINT8, shape)
                    g.output(q.scale, f"cross_{name}_scale_{index}", FLOAT, cross_scale_shape(quantizer))
                else:
                    g.output(self.dequantized(q), f"cross_{name}_{index}", FLOAT, shape)
        return g

    def decoder(self):
        g = self.g = Builder("decoder")
        config, heads = self.config, self.heads_decoder
        head_dim = config.d_model // heads
        ids = g.input("input_ids", INT64, ["batch", 1])
        encoder_mask = self.padding_mask(g.input("encoder_attention_mask", INT64, ["batch", "source"]))
        mode = cross_mode(self.source)
        layers = []
        for index in range(config.decoder_layers):
            past = [g.input(f"past_{name}_{index}", FLOAT, ["batch", heads, "past", head_dim])
                    for name in ("key", "value")]
            quant = getattr(self.model.get_submodule(f"model.decoder.layers.{index}.encoder_attn"),
                            "attention_input_quantizer", None)
            cross = []
            for name in ("key", "value"):
                shape = ["batch", heads, "source", head_dim]
                if mode == "codes":
                    quantizer = getattr(quant, name)
                    codes = g.input(f"cross_{name}_{index}", UINT8, shape)
                    scale = g.input(f"cross_{name}_scale_{index}", FLOAT, cross_scale_shape(quantizer))
                    cross.append(Quantized(codes, scale, "row" if quantizer.granularity == "row" else "tensor"))
                elif mode == "fake":
                    cross.append(Quantized(value=g.input(f"cross_{name}_{index}", FLOAT, shape)))
                else:
                    cross.append(g.input(f"cross_{name}_{index}", FLOAT, shape))
            layers.append((past, cross))
        start = g.op("Gather", g.op("Shape", layers[0][0][0]), g.const(2, np.int64), axis=0)
        hidden = self.embed(ids, start, "model.decoder")
        presents = []
        for index, (past, cross) in enumerate(layers):
            prefix = f"model.decoder.layers.{index}"

            def self_attention(x, prefix=prefix, past=past):
                key, value = self.key_value(x, f"{prefix}.self_attn", heads)
                presents.append((key, value))
                full_key, full_value = (g.op("Concat", p, new, axis=2) for p, new in zip(past, (key, value)))
                return self.attention(f"{prefix}.self_attn", x, full_key, full_value, None, heads)

            def cross_attention(x, prefix=prefix, cross=cross):
                return self.attention(f"{prefix}.encoder_attn", x, cross[0], cross[1], encoder_mask, heads)

            hidden = self.block(hidden, self_attention, f"{prefix}.self_attn_layer_norm")
            hidden = self.block(hidden, cross_attention, f"{prefix}.encoder_attn_layer_norm")
            hidden = self.block(hidden, self.feed_forward(prefix), f"{prefix}.final_layer_norm")
        if self.pre_norm:
            hidden = self.layer_norm(hidden, "model.decoder.layer_norm")
        logits = self.linear(hidden, "lm_head")
        bias = getattr(self.model, "final_logits_bias", None)
        if bias is not None:
            logits = g.op("Add", logits, self.tensor(bias))
        g.output(logits, "logits", FLOAT, ["batch", 1, config.vocab_size])
        for index, (key, value) in enumerate(presents):
            g.output(key, f"present_key_{index}", FLOAT, ["batch", heads, 1, head_dim])
            g.output(value, f"present_value_{index}", FLOAT, ["batch", heads, 1, head_dim])
        return g


GRAPHS = ("encoder", "cross", "decoder")
SHARED_WEIGHTS = "weights.bin"
INLINE_BYTES = 1024  # smaller initializers (constants, scalar scales) stay inside each graph


@torch.no_grad()
def build_graphs(source: DeploySource) -> dict[str, Any]:
    """{graph name: onnx.ModelProto} of the three graphs, initializers still inline."""
    graphs = _Graphs(source)
    return {name: getattr(graphs, name)().model() for name in GRAPHS}


def save_graphs(models: dict[str, Any], directory) -> list[str]:
    """Write each graph as `<name>.onnx`, every initializer larger than `INLINE_BYTES` once, in the shared
    external-data file `weights.bin` (tied and repeated tensors, e.g. the token embedding the encoder and the
    decoder both read, are stored once); returns the files written."""
    import onnx
    from onnx.external_data_helper import set_external_data

    offsets: dict[str, tuple[int, int]] = {}
    with open(directory / SHARED_WEIGHTS, "wb") as weights:
        for model in models.values():
            for tensor in model.graph.initializer:
                if not tensor.HasField("raw_data"):
                    continue
                data = tensor.raw_data
                if len(data) <= INLINE_BYTES:
                    continue
                if tensor.name not in offsets:
                    weights.seek(0, 2)
                    position = -(-weights.tell() // 64) * 64  # aligned, so ONNX Runtime may map it
                    weights.write(b"\0" * (position - weights.tell()))
                    weights.write(data)
                    offsets[tensor.name] = (position, len(data))
                position, length = offsets[tensor.name]
                set_external_data(tensor, SHARED_WEIGHTS, offset=position, length=length)
                tensor.ClearField("raw_data")
    for name, model in models.items():
        onnx.save_model(model, str(directory / f"{name}.onnx"))
    return [SHARED_WEIGHTS, *(f"{name}.onnx" for name in models)]
