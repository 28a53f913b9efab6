"""The `dq-bart` recipe against the official DQ-BART code's formulas, written out here independently.

Sources (amazon-science/dq-bart): `quant/utils_quant.py` (SymQuantizer, TwnQuantizer, QuantizeLinear,
QuantizeEmbedding), `quant/modeling_bart_quant.py` (BartAttention: where q, k, v and the probabilities are
quantized), `run_summarization_no_trainer.py` (`distill_mappings` and the training loss). Each reference below
re-states one of them on plain tensors; the library must agree to float rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BartForConditionalGeneration

from dq_lightning.distill.layer_map import layer_map
from dq_lightning.modules.student import DQStudentModule
from dq_lightning.models.presets import build_config
from dq_lightning.quant import QuantConfig, QuantEmbedding, QuantLinear, prepare
from dq_lightning.quant.modules import ATTENTION_QUANTIZER_ATTR, AttentionInputQuantizer, quantized_eager_attention

CLIP = 2.5  # the official clip_val default, for weights and activations alike


# -- the official quantizers, re-stated ----------------------------------------------------------------------
def official_sym(x: torch.Tensor, bits: int, layerwise: bool = True) -> torch.Tensor:
    """SymQuantizer: clamp to +-clip, then max|x| per tensor (layerwise) or per row, s = (2^(b-1)-1)/max."""
    x = x.clamp(-CLIP, CLIP)
    top = x.abs().max() if layerwise else x.abs().amax(dim=-1, keepdim=True)
    s = (2 ** (bits - 1) - 1) / top
    return torch.round(x * s) / s


def official_twn(x: torch.Tensor, layerwise: bool = True) -> torch.Tensor:
    """TwnQuantizer: clamp to +-clip; threshold 0.7 * mean|x|; alpha = mean |x| over the kept entries."""
    x = x.clamp(-CLIP, CLIP)
    rows = x.reshape(1, -1) if layerwise else x
    out = torch.zeros_like(rows)
    for i, row in enumerate(rows):
        threshold = 0.7 * row.abs().mean()
        kept = row.abs() > threshold
        alpha = row.abs()[kept].mean()
        out[i] = alpha * (row > threshold).float() - alpha * (row < -threshold).float()
    return out.reshape(x.shape)


def official_weight(x: torch.Tensor, bits: int, layerwise: bool = True) -> torch.Tensor:
    return official_twn(x, layerwise) if bits == 2 else official_sym(x, bits, layerwise)


def official_ste_grad(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Backward of every official quantizer: the gradient passes, except where x >= clip or x <= -clip."""
    return torch.where((x >= CLIP) | (x <= -CLIP), torch.zeros_like(grad), grad)


def micro_bart(seed: int = 0) -> BartForConditionalGeneration:
    torch.manual_seed(seed)
    model = BartForConditionalGeneration(build_config("micro", vocab_size=300))
    return model.eval()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_linear_forward_and_gradient_match_the_official_quantize_linear(bits):
    model = prepare(micro_bart(), QuantConfig.dq_bart(bits, bits, 8))
    layer = model.model.encoder.layers[0].fc1
    assert isinstance(layer, QuantLinear)
    with torch.no_grad():  # spread the weights so that the clip at 2.5 matters
        layer.weight.mul_(40)
    x = (torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(3)) * 2).requires_grad_()
    out = layer(x)

    weight = layer.weight.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    expected = F.linear(official_sym(x_ref, 8), official_weight(weight, bits)) + layer.bias
    torch.testing.assert_close(out, expected.detach(), rtol=1e-5, atol=1e-6)
    assert (weight.abs() >= CLIP).any() and (x_ref.abs() >= CLIP).any()

    upstream = torch.randn_like(out)
    out.backward(upstream)
    # The official backward: d/dW of linear(xq, Wq) taken with respect to Wq and passed through the STE mask.
    xq, wq = official_sym(x_ref, 8).detach(), official_weight(weight, bits).detach()
    grad_wq = upstream.reshape(-1, upstream.size(-1)).T @ xq.reshape(-1, xq.size(-1))
    grad_xq = upstream @ wq
    torch.testing.assert_close(layer.weight.grad, official_ste_grad(weight, grad_wq), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, official_ste_grad(x_ref, grad_xq), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 8])
def test_token_embedding_is_quantized_row_wise_and_the_head_stays_full_precision(bits):
    model = prepare(micro_bart(), QuantConfig.dq_bart(bits, bits, 8))
    embedding = model.model.shared
    assert isinstance(embedding, QuantEmbedding)
    with torch.no_grad():
        embedding.weight.mul_(60)
    ids = torch.tensor([[5, 17, 17, 299, 0]])
    # QuantizeEmbedding: layerwise False, i.e. one grid per row (token), clipped at 2.5 like the weights.
    expected = F.embedding(ids, official_weight(embedding.weight.detach(), bits, layerwise=False))
    scale = embedding.embed_scale or 1.0
    torch.testing.assert_close(embedding(ids) / scale, expected, rtol=1e-5, atol=1e-6)
    # One deliberate difference: the all-zero padding row. The official TwnQuantizer divides 0 by 0 there and
    # looks up NaN; here it stays zero.
    pad = torch.tensor([[embedding.padding_idx]])
    assert torch.equal(embedding(pad), torch.zeros(1, 1, embedding.embedding_dim))
    # The official QBart's lm_head is a plain nn.Linear on the tied, full-precision embedding.
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is embedding.weight
    # Positions stay full precision.
    assert type(model.model.encoder.embed_positions) is not QuantEmbedding


class _Attention(nn.Module):
    """What `quantized_eager_attention` reads from a BART attention module."""

    def __init__(self, config: QuantConfig):
        super().__init__()
        setattr(self, ATTENTION_QUANTIZER_ATTR, AttentionInputQuantizer(config))


@pytest.mark.parametrize("training", [False, True])
def test_attention_operands_are_quantized_where_the_official_attention_quantizes_them(training):
    """modeling_bart_quant.py BartAttention: q = q_proj(x) * scaling, then q, k and v each quantized
    (SymQuantizer, per tensor, clip 2.5, a bits); softmax; dropout; then the probabilities quantized."""
    a_bits, p = 4, 0.3
    module = _Attention(QuantConfig.dq_bart(8, 8, a_bits)).train(training)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 8, generator=g) * 3 for _ in range(3))
    mask = torch.zeros(2, 1, 5, 5)
    mask[1, :, :, 3:] = torch.finfo(torch.float32).min
    scaling = 8 ** -0.5

    torch.manual_seed(7)
    out, _ = quantized_eager_attention(module, q, k, v, mask, scaling=scaling, dropout=p)

    torch.manual_seed(7)  # the same dropout draw
    scores = official_sym(q * scaling, a_bits) @ official_sym(k, a_bits).transpose(2, 3) + mask
    probs = F.dropout(F.softmax(scores, dim=-1), p=p, training=training)
    expected = (official_sym(probs, a_bits) @ official_sym(v, a_bits)).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_official_layer_map_table():
    """`distill_mappings` of run_summarization_no_trainer.py, for a 6-layer (bart-base) stack."""
    official = {1: [5], 2: [0, 5], 3: [0, 2, 5], 4: [0, 2, 3, 5], 5: [0, 1, 3, 4, 5], 6: [0, 1, 2, 3, 4, 5]}
    assert {n: layer_map(6, n, "dq-bart") for n in range(1, 7)} == official


def _official_total_loss(student, teacher, task_loss, enc_map, dec_map):
    """The official training loss with its default weights (task, logits and hid weights 1): MSELoss (a mean
    over every element, padding included) on the logits; on every attention map against the mapped teacher
    layer; on every hidden state against teacher state 0 for the embeddings and map[i-1]+1 after; plus one
    MSE per example of the last encoder state (it zips over the batch)."""
    mse = nn.MSELoss()
    total = task_loss + mse(student.logits, teacher.logits)
    for mine, theirs, mapping in ((student.encoder_attentions, teacher.encoder_attentions, enc_map),
                                  (student.decoder_attentions, teacher.decoder_attentions, dec_map),
                                  (student.cross_attentions, teacher.cross_attentions, dec_map)):
        total = total + sum(mse(s, theirs[mapping[i]]) for i, s in enumerate(mine))
    for mine, theirs, mapping in ((student.encoder_hidden_states, teacher.encoder_hidden_states, enc_map),
                                  (student.decoder_hidden_states, teacher.decoder_hidden_states, dec_map)):
        total = total + sum(mse(s, theirs[0 if i == 0 else mapping[i - 1] + 1]) for i, s in enumerate(mine))
    total = total + sum(mse(s, t) for s, t in zip(student.encoder_last_hidden_state,
                                                   teacher.encoder_last_hidden_state))
    return total


@pytest.mark.parametrize("bits, depth", [("2-2-8", "4-2"), ("8-8-8", "2-3")])
def test_training_loss_on_a_padded_batch_equals_the_official_loss(teacher_dir, bits, depth):
    module = DQStudentModule(teacher=str(teacher_dir), bits=bits, depth=depth)
    module.eval()  # no dropout draw, so both passes see the same network
    torch.manual_seed(1)
    with torch.no_grad():  # move the student off its teacher's weights, so that every distillation term counts
        for parameter in module.model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    g = torch.Generator().manual_seed(0)
    vocab = module.model.config.vocab_size
    input_ids = torch.randint(4, vocab, (3, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    attention_mask[2, 4:] = 0
    labels = torch.randint(4, vocab, (3, 6), generator=g)
    labels[0, 4:] = -100
    labels[2, 2:] = -100
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    with torch.no_grad():
        loss = module._step(batch, "train")

        inputs = dict(input_ids=input_ids, attention_mask=attention_mask,
                      decoder_input_ids=module.model.prepare_decoder_input_ids_from_labels(labels=labels),
                      output_attentions=True, output_hidden_states=True)
        student = module.model(**inputs, labels=labels)
        teacher = module.teacher(**inputs)
    expected = _official_total_loss(student, teacher, student.loss, module.encoder_map, module.decoder_map)
    terms = module.last_loss_terms
    assert set(terms) == {"task", "logits", "hidden", "final_encoder", "attention"}
    assert expected - student.loss > 0.1 and all(value > 1e-4 for value in terms.values())
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)


def _eager_pair():
    config = build_config("micro", vocab_size=300)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    teacher = BartForConditionalGeneration(config).eval()
    torch.manual_seed(1)
    student = prepare(BartForConditionalGeneration(config).eval(), QuantConfig.dq_bart(2, 2, 8))
    return teacher, student


def _outputs(model, input_ids, attention_mask, labels):
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels.clamp(min=1))
    return model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                 labels=labels, output_attentions=True, output_hidden_states=True)


def test_objective_without_lightning_official_value_and_masked_variant_ignores_padding():
    from dq_lightning.distill.objective import DQObjective
    from dq_lightning.distill.recipe import resolve

    teacher, student = _eager_pair()
    layers = list(range(student.config.encoder_layers)), list(range(student.config.decoder_layers))
    g = torch.Generator().manual_seed(2)
    input_ids, labels = torch.randint(4, 300, (2, 9), generator=g), torch.randint(4, 300, (2, 5), generator=g)
    mask = torch.ones_like(input_ids)
    mask[1, 6:] = 0
    labels[1, 3:] = -100

    def loss(recipe, ids, source_mask, targets):
        with torch.no_grad():
            s, t = _outputs(student, ids, source_mask, targets), _outputs(teacher, ids, source_mask, targets)
        value, _ = DQObjective(resolve(recipe).objective_config("dq"))(s, t, targets, source_mask, *layers)
        return value, s, t

    official, s, t = loss("dq-bart", input_ids, mask, labels)
    torch.testing.assert_close(official, _official_total_loss(s, t, s.loss, *layers), rtol=1e-5, atol=0)

    # More batch padding (pad tokens, masked out) changes the official unmasked means but not the masked ones.
    pad = student.config.pad_token_id
    wider_ids = torch.cat([input_ids, torch.full((2, 4), pad)], dim=1)
    wider_mask = torch.cat([mask, torch.zeros(2, 4, dtype=mask.dtype)], dim=1)
    wider_labels = torch.cat([labels, torch.full((2, 3), -100)], dim=1)
    masked, *_ = loss("dq_lightning", input_ids, mask, labels)
    masked_wider, *_ = loss("dq_lightning", wider_ids, wider_mask, wider_labels)
    official_wider, *_ = loss("dq-bart", wider_ids, wider_mask, wider_labels)
    torch.testing.assert_close(masked_wider, masked, rtol=1e-4, atol=1e-6)
    assert not torch.isclose(official_wider, official, rtol=1e-3)


@pytest.mark.parametrize("eval_head", ["trained", "deployed"])
def test_eval_head_picks_the_head_validation_and_test_use(teacher_dir, eval_head):
    module = DQStudentModule(teacher=str(teacher_dir), bits="2-2-8", depth="2-1",
                             evaluation={"eval_head": eval_head})
    prepare(module.model, module.quant_config)
    token = module.model.model.shared
    for start in (module.on_validation_start, module.on_test_start):
        start()
        head = module.model.lm_head
        if eval_head == "deployed":  # the E-bit token embedding, what export ships, its input not quantized
            assert isinstance(head, QuantLinear) and head.input_quantizer is None
            assert head.weight_quantizer is token.weight_quantizer and head.weight is token.weight
        else:
            assert type(head) is nn.Linear and head.weight is token.weight
        module.on_validation_end()  # training goes on with the full-precision head
        assert type(module.model.lm_head) is nn.Linear and module.model.lm_head.weight is token.weight
