"""The `dq-bart` recipe against the official DQ-BART code's formulas, written out here independently.

Sources (amazon-science/dq-bart @378683e): `quant/utils_quant.py` (SymQuantizer, TwnQuantizer, QuantizeLinear,
QuantizeEmbedding), `quant/modeling_bart_quant.py` (BartAttention: where q, k, v and the probabilities are
quantized), `run_summarization_no_trainer.py` ("R" below: `distill_mappings`, the training loss, the optimizer,
schedule, decoding and evaluation around it). Each reference below re-states one of them on plain tensors or as
the values it sets; the library must agree to float rounding.
"""

from __future__ import annotations

import math
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BartForConditionalGeneration

from dq_lightning.distill.layer_map import layer_map
from dq_lightning.errors import UserError
from dq_lightning.modules.seq2seq import add_eps_before_bias_correction
from dq_lightning.modules.student import DQStudentModule
from dq_lightning.models.presets import build_config
from dq_lightning.quant import QuantConfig, QuantEmbedding, QuantLinear, prepare
from dq_lightning.quant.modules import ATTENTION_QUANTIZER_ATTR, AttentionInputQuantizer, quantized_eager_attention
from tests.conftest import PROJECT_ROOT

CLIP = 2.5  # the official clip_val default, for weights and activations alike

# The official script's loop, as its defaults and branches set it (R = run_summarization_no_trainer.py).
PER_DEVICE_TRAIN_BATCH = 8  # R:179-182
PER_DEVICE_EVAL_BATCH = 4  # R:183-186
LEARNING_RATE = 3e-5  # R:187-190
WEIGHT_DECAY = 0.0  # R:191
ACCUMULATION = 2  # R:197-200
WARMUP_RATIO = 0.05  # R:207-210; "linear" schedule, R:201-206, built at R:610-615
# transformers.AdamW (R:44, 592) at its defaults in transformers 4.17.0 (the official requirements.txt:1).
ADAMW = {"betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0, "correct_bias": True}
# Decoding: R:646-651 passes four settings, per dataset (R:315-324); generate() reads the rest from the model
# config, which the student takes from the teacher (R:448-454): bart-base's no_repeat_ngram_size 3 and
# early_stopping true.
GENERATION = {"xsum": {"length_penalty": 1.0, "max_length": 62, "min_length": 11, "num_beams": 6,
                       "no_repeat_ngram_size": 3, "early_stopping": True},
              "cnn_dailymail": {"length_penalty": 2.0, "max_length": 142, "min_length": 56, "num_beams": 4,
                                "no_repeat_ngram_size": 3, "early_stopping": True}}


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


def _official_total_loss(student, teacher, task_loss, enc_map, dec_map, weights=(1.0, 1.0, 1.0), maps=None):
    """The official training loss of one per-device micro-batch (R:677-726), at `weights` (task, logits, hid:
    1, 1, 1 by default, R:333-335; `--weighted` 1, 0.8, 3, R:328-330): MSELoss (a mean over every element,
    padding included) on the logits; on every attention map against the mapped teacher layer; on every hidden
    state against teacher state 0 for the embeddings and map[i-1]+1 after; plus one MSE per example of the last
    encoder state (it zips over the micro-batch, R:691-693); hid weighs every intermediate term. `maps`: the
    student's (encoder, decoder, cross) attention maps, if not its returned ones."""
    task_weight, logits_weight, hid_weight = weights
    mse = nn.MSELoss()
    encoder_maps, decoder_maps, cross_maps = maps or (student.encoder_attentions, student.decoder_attentions,
                                                      student.cross_attentions)
    intermediate = 0.0
    for mine, theirs, mapping in ((encoder_maps, teacher.encoder_attentions, enc_map),
                                  (decoder_maps, teacher.decoder_attentions, dec_map),
                                  (cross_maps, teacher.cross_attentions, dec_map)):
        intermediate = intermediate + sum(mse(s, theirs[mapping[i]]) for i, s in enumerate(mine))
    for mine, theirs, mapping in ((student.encoder_hidden_states, teacher.encoder_hidden_states, enc_map),
                                  (student.decoder_hidden_states, teacher.decoder_hidden_states, dec_map)):
        intermediate = intermediate + sum(mse(s, theirs[0 if i == 0 else mapping[i - 1] + 1])
                                          for i, s in enumerate(mine))
    intermediate = intermediate + sum(mse(s, t) for s, t in zip(student.encoder_last_hidden_state,
                                                                 teacher.encoder_last_hidden_state))
    return task_weight * task_loss + logits_weight * mse(student.logits, teacher.logits) + hid_weight * intermediate


def _moved_student(module: DQStudentModule) -> DQStudentModule:
    """`module` with its student moved off its teacher's weights, so that every distillation term counts."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in module.model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return module


def _padded_batch(vocab: int, rows: int = PER_DEVICE_TRAIN_BATCH, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of `rows` examples, some of them padded (sources and labels)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, vocab, (rows, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    attention_mask[2, 4:] = 0
    labels = torch.randint(4, vocab, (rows, 6), generator=g)
    labels[0, 4:] = -100
    labels[2, 2:] = -100
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def _reference_outputs(module: DQStudentModule, batch: dict[str, torch.Tensor]):
    """The student's outputs (with its task loss) and the teacher's on `batch`, as the official loop asks them."""
    labels = batch["labels"]
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  decoder_input_ids=module.model.prepare_decoder_input_ids_from_labels(labels=labels),
                  output_attentions=True, output_hidden_states=True)
    with torch.no_grad():
        return module.model(**inputs, labels=labels), module.teacher(**inputs)


@pytest.mark.parametrize("bits, depth", [("2-2-8", "4-2"), ("8-8-8", "2-3")])
def test_training_loss_on_a_padded_batch_equals_the_official_loss(teacher_dir, bits, depth):
    """On a micro-batch of the official per-device size, in eval mode (no dropout: both passes see the same
    network); the train-mode test below draws dropout."""
    module = _moved_student(DQStudentModule(teacher=str(teacher_dir), bits=bits, depth=depth))
    module.eval()
    batch = _padded_batch(module.model.config.vocab_size)
    with torch.no_grad():
        loss = module._step(batch, "train")
    student, teacher = _reference_outputs(module, batch)
    expected = _official_total_loss(student, teacher, student.loss, module.encoder_map, module.decoder_map)
    terms = module.last_loss_terms
    assert set(terms) == {"task", "logits", "hidden", "final_encoder", "attention"}
    assert expected - student.loss > 0.1 and all(value > 1e-4 for value in terms.values())
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)


@pytest.fixture(scope="module")
def dropout_teacher_dir(teacher_dir, tmp_path_factory):
    """The micro teacher with dropout on (its attention's included), so that train mode draws dropout."""
    import json

    copy = tmp_path_factory.mktemp("dropout_teacher") / "hf"
    shutil.copytree(teacher_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(dropout=0.1, attention_dropout=0.3, activation_dropout=0.1)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_training_loss_in_train_mode_distills_the_attention_maps_before_dropout(dropout_teacher_dir, monkeypatch):
    """Train mode, dropout drawn: the official attention returns its softmax before dropout
    (quant/modeling_bart_quant.py:279-284, 307) and the loss distills that map. The maps before dropout are
    caught here as they enter dropout, independently of what the student returns."""
    module = _moved_student(DQStudentModule(teacher=str(dropout_teacher_dir), bits="2-2-8", depth="4-2"))
    module.train()
    assert not module.teacher.training  # the frozen teacher never draws dropout (R:643)
    batch = _padded_batch(module.model.config.vocab_size)
    torch.manual_seed(7)
    with torch.no_grad():
        loss = module._step(batch, "train")

    entering, leaving = [], []
    dropout = F.dropout

    def catching(input, p=0.5, training=True, inplace=False):
        output = dropout(input, p, training, inplace)
        # The student's attention probabilities (batch, heads, queries, keys); states are 3-D, and the teacher's
        # forward (eval mode) passes training=False.
        if input.dim() == 4 and training:
            entering.append(input.detach().clone())
            leaving.append(output.detach().clone())
        return output

    monkeypatch.setattr(torch.nn.functional, "dropout", catching)
    torch.manual_seed(7)  # the same dropout draws as the step's
    student, teacher = _reference_outputs(module, batch)
    monkeypatch.undo()
    encoder_layers, decoder_layers = len(module.encoder_map), len(module.decoder_map)
    assert len(entering) == encoder_layers + 2 * decoder_layers
    assert all(not torch.equal(before, after) for before, after in zip(entering, leaving))  # dropout drew
    # BART runs encoder self-attention layer by layer, then each decoder layer's self- and cross-attention.
    maps = (entering[:encoder_layers], entering[encoder_layers::2], entering[encoder_layers + 1::2])
    expected = _official_total_loss(student, teacher, student.loss, module.encoder_map, module.decoder_map,
                                    maps=maps)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    after_dropout = (leaving[:encoder_layers], leaving[encoder_layers::2], leaving[encoder_layers + 1::2])
    distilling_after = _official_total_loss(student, teacher, student.loss, module.encoder_map,
                                            module.decoder_map, maps=after_dropout)
    assert not torch.isclose(distilling_after, loss, rtol=1e-3)


def _mean_over_micro_batches(step, batch: dict[str, torch.Tensor], devices: int, per_device: int,
                             accumulation: int) -> torch.Tensor:
    """The objective of one optimizer step over `batch` split across `devices` x `accumulation` micro-batches of
    `per_device` examples: DDP averages the devices' gradients and accumulation adds each micro-batch's loss
    over `accumulation`, so the step follows the mean of the micro-batches' losses."""
    rows = batch["labels"].size(0)
    assert devices * per_device * accumulation == rows
    losses = [step({key: value[start:start + per_device] for key, value in batch.items()})
              for start in range(0, rows, per_device)]
    return torch.stack(losses).mean()


def test_the_final_encoder_weight_gives_one_objective_whatever_the_device_count(teacher_dir):
    """16 sequences per optimizer step laid out over 1, 2 or 4 devices (simulated: DDP's gradient mean is the
    mean over the micro-batches) give the objective of the official layout, 8 per device x 2 accumulated on one
    device; the official per-example sum (R:691-693) would change with the per-device batch. A full-precision
    student (distill_only): its outputs do not depend on the batch, a quantized one's activation scales do."""
    module = _moved_student(DQStudentModule(teacher=str(teacher_dir), mode="distill_only", depth="4-2"))
    module.eval()
    assert module.objective.config.final_encoder_weight == PER_DEVICE_TRAIN_BATCH
    g = torch.Generator().manual_seed(3)
    vocab = module.model.config.vocab_size
    batch = {"input_ids": torch.randint(4, vocab, (16, 10), generator=g),
             "attention_mask": torch.ones(16, 10, dtype=torch.long),
             "labels": torch.randint(4, vocab, (16, 5), generator=g)}

    def official_step(micro: dict[str, torch.Tensor]) -> torch.Tensor:
        student, teacher = _reference_outputs(module, micro)
        return _official_total_loss(student, teacher, student.loss, module.encoder_map, module.decoder_map)

    def our_step(micro: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return module._step(micro, "train")

    official = _mean_over_micro_batches(official_step, batch, 1, PER_DEVICE_TRAIN_BATCH, ACCUMULATION)
    for devices, per_device, accumulation in [(1, 16, 1), (1, 8, 2), (2, 4, 2), (2, 8, 1), (4, 4, 1), (4, 2, 2)]:
        ours = _mean_over_micro_batches(our_step, batch, devices, per_device, accumulation)
        torch.testing.assert_close(ours, official, rtol=1e-5, atol=0, msg=f"{devices} x {per_device} x {accumulation}")
    for per_device in (4, 16):  # the official sum itself moves with the per-device batch
        official_here = _mean_over_micro_batches(official_step, batch, 16 // per_device, per_device, 1)
        assert not torch.isclose(official_here, official, rtol=1e-3)


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
    rows = PER_DEVICE_TRAIN_BATCH
    input_ids, labels = torch.randint(4, 300, (rows, 9), generator=g), torch.randint(4, 300, (rows, 5), generator=g)
    mask = torch.ones_like(input_ids)
    mask[1, 6:] = 0
    labels[1, 3:] = -100

    def loss(recipe, ids, source_mask, targets, objective=None):
        with torch.no_grad():
            s, t = _outputs(student, ids, source_mask, targets), _outputs(teacher, ids, source_mask, targets)
        config = resolve(recipe, objective=objective or {}).objective_config("dq")
        value, _ = DQObjective(config)(s, t, targets, source_mask, *layers)
        return value, s, t

    official, s, t = loss("dq-bart", input_ids, mask, labels)
    torch.testing.assert_close(official, _official_total_loss(s, t, s.loss, *layers), rtol=1e-5, atol=0)
    # --weighted (R:286, 327-331): task 1, logits 0.8, hid 3 on every intermediate term.
    weighted, *_ = loss("dq-bart", input_ids, mask, labels, {"preset": "weighted"})
    expected = _official_total_loss(s, t, s.loss, *layers, weights=(1.0, 0.8, 3.0))
    torch.testing.assert_close(weighted, expected, rtol=1e-5, atol=0)
    assert not torch.isclose(weighted, official, rtol=1e-3)

    # More batch padding (pad tokens, masked out) changes the official unmasked means but not the masked ones.
    pad = student.config.pad_token_id
    wider_ids = torch.cat([input_ids, torch.full((rows, 4), pad)], dim=1)
    wider_mask = torch.cat([mask, torch.zeros(rows, 4, dtype=mask.dtype)], dim=1)
    wider_labels = torch.cat([labels, torch.full((rows, 3), -100)], dim=1)
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


# -- the loop around the loss: optimizer, schedule, teacher precision, presets, decoding, evaluation -------------
def _planned(module: DQStudentModule, batches: int, accumulation: int, epochs: int) -> DQStudentModule:
    """`module` as a Trainer of `epochs` over `batches` training batches per epoch, accumulating
    `accumulation`, would configure it (only what the optimizer and schedule read)."""
    module._trainer = SimpleNamespace(estimated_stepping_batches=math.ceil(batches / accumulation) * epochs,
                                      num_training_batches=batches, accumulate_grad_batches=accumulation,
                                      max_epochs=epochs, max_steps=-1)
    return module


def test_the_optimizer_is_the_official_adamw_on_every_trainable_parameter(teacher_dir):
    module = _planned(DQStudentModule(teacher=str(teacher_dir), bits="2-2-8", depth="2-1"), 100, 2, 3)
    configured = module.configure_optimizers()
    optimizer = configured["optimizer"]
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["lr"] == LEARNING_RATE
    for group in optimizer.param_groups:
        assert group["betas"] == ADAMW["betas"] and not group["amsgrad"]
        # R:581-592 splits bias/"LayerNorm.weight" from the rest, both groups at weight_decay 0 (R:191).
        assert group["weight_decay"] == WEIGHT_DECAY
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.model.parameters()}  # the whole student, the teacher not
    # eps 1e-6 added as transformers.AdamW adds it: torch's eps at step t is 1e-6 / sqrt(1 - 0.999^t).
    for parameter in module.model.parameters():
        parameter.grad = torch.randn_like(parameter) * 1e-5
    for step in (1, 2):
        optimizer.step()
        for group in optimizer.param_groups:
            assert group["eps"] == pytest.approx(ADAMW["eps"] / math.sqrt(1 - 0.999 ** step), rel=1e-12)


def _transformers_adamw_step(parameter: torch.Tensor, grad: torch.Tensor, state: dict, lr: float) -> None:
    """One step of transformers.AdamW (4.17) as its documentation and code define it: moments updated, then
    parameter -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps), then the decoupled weight decay."""
    beta1, beta2 = ADAMW["betas"]
    state["step"] = state.get("step", 0) + 1
    m = state.setdefault("m", torch.zeros_like(parameter))
    v = state.setdefault("v", torch.zeros_like(parameter))
    m.mul_(beta1).add_(grad, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
    parameter.sub_(step_size * m / (v.sqrt() + ADAMW["eps"]))
    parameter.sub_(lr * ADAMW["weight_decay"] * parameter)


def test_adamw_steps_as_the_official_transformers_adamw_across_a_resume():
    """Gradients of 1e-7 to 1e-5, where epsilon matters: torch's AdamW with the rescaled eps follows the
    official optimizer step for step, also after its state is saved and loaded into a new optimizer; torch's
    own placement of eps does not."""
    g = torch.Generator().manual_seed(0)
    start = torch.randn(64, generator=g, dtype=torch.float64)
    grads = [torch.randn(64, generator=g, dtype=torch.float64)
             * 10.0 ** -torch.randint(5, 8, (64,), generator=g).double()
             for _ in range(40)]
    reference, state = start.clone(), {}
    ours = nn.Parameter(start.clone())
    plain = nn.Parameter(start.clone())

    def optimizer_for(parameter, official):
        optimizer = torch.optim.AdamW([parameter], lr=LEARNING_RATE, eps=ADAMW["eps"], weight_decay=0.0)
        if official:
            add_eps_before_bias_correction(optimizer, ADAMW["eps"])
        return optimizer

    optimizer, torch_placement = optimizer_for(ours, True), optimizer_for(plain, False)
    for step, grad in enumerate(grads):
        if step == 20:  # a resume: a new optimizer, the saved state loaded into it
            saved = optimizer.state_dict()
            optimizer = optimizer_for(ours, True)
            optimizer.load_state_dict(saved)
        _transformers_adamw_step(reference, grad, state, LEARNING_RATE)
        for parameter, opt in ((ours, optimizer), (plain, torch_placement)):
            parameter.grad = grad.clone()
            opt.step()
    torch.testing.assert_close(ours.detach(), reference, rtol=1e-10, atol=1e-14)
    assert (plain.detach() - reference).abs().max() > 1e-3 * (reference - start).abs().max()


def test_the_schedule_is_the_official_linear_warmup_and_decay(teacher_dir):
    """R:604-615: ceil(batches / accumulation) x epochs optimizer steps, int(0.05 x that) of linear warm-up
    from 0, then linear decay to 0."""
    batches, epochs = 101, 3
    module = _planned(DQStudentModule(teacher=str(teacher_dir), bits="2-2-8", depth="2-1"), batches,
                      ACCUMULATION, epochs)
    configured = module.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    assert configured["lr_scheduler"]["interval"] == "step"
    total = epochs * math.ceil(batches / ACCUMULATION)
    warmup = int(WARMUP_RATIO * total)
    for step in range(total + 1):
        official = LEARNING_RATE * (step / warmup if step < warmup else max(0.0, (total - step) / (total - warmup)))
        assert optimizer.param_groups[0]["lr"] == pytest.approx(official, abs=1e-15), step
        optimizer.step()
        scheduler.step()


def _flat_outputs(outputs) -> list[torch.Tensor]:
    """Every tensor a forward returned: logits, states, attention maps (the KV cache aside)."""
    tensors = []
    for value in outputs.values():
        tensors += list(value) if isinstance(value, tuple) else [value]
    return [tensor for tensor in tensors if isinstance(tensor, torch.Tensor)]


def test_the_teacher_runs_in_float32_under_bf16_autocast(teacher_dir, monkeypatch):
    """R:595-598: accelerate prepares the student only; the teacher's forward is float32 even when the student's
    runs in mixed precision. Here: exactly its float32 outputs inside a bf16 autocast, also as the loss gets them."""
    module = DQStudentModule(teacher=str(teacher_dir), bits="2-2-8", depth="2-1")
    assert module.recipe.objective.teacher_precision == "fp32"
    batch = _padded_batch(module.model.config.vocab_size, rows=4)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  decoder_input_ids=module.model.prepare_decoder_input_ids_from_labels(labels=batch["labels"]))
    cpu = torch.device("cpu")
    float32 = _flat_outputs(module.factory.teacher_outputs(inputs, cpu, True))
    given = {}
    forward = module.objective.forward

    def catching(student, teacher, *args, **kwargs):
        given["teacher"] = teacher
        return forward(student, teacher, *args, **kwargs)

    monkeypatch.setattr(module.objective, "forward", catching)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        mixed = _flat_outputs(module.factory.teacher_outputs(inputs, cpu, True))
        module._step(batch, "train")
    for outputs in (mixed, _flat_outputs(given["teacher"])):
        assert len(outputs) == len(float32)
        for ours, reference in zip(outputs, float32):
            assert ours.dtype == torch.float32 and torch.equal(ours, reference)
    # The other choice, a named setting: the teacher in the trainer's autocast.
    rounded = DQStudentModule(teacher=str(teacher_dir), bits="2-2-8", depth="2-1",
                              objective={"teacher_precision": "autocast"})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = rounded.factory.teacher_outputs(inputs, cpu, False).logits
    reference = module.factory.teacher_outputs(inputs, cpu, False).logits
    assert not torch.allclose(logits.float(), reference, rtol=1e-4, atol=1e-5)  # computed in bf16


def test_the_official_presets_weighted_and_new_distill_map(teacher_dir):
    from dq_lightning.distill.recipe import resolve

    # --weighted (R:286, 327-331): task 1, logits 0.8, hid 3 on every intermediate term, the final encoder's
    # per-device sum of 8 examples included (R:723-726); a weight also set explicitly is taken as given.
    weighted = resolve("dq-bart", objective={"preset": "weighted"}).objective_config("dq")
    assert (weighted.task_weight, weighted.logits_weight, weighted.hidden_weight, weighted.attention_weight,
            weighted.final_encoder_weight) == (1.0, 0.8, 3.0, 3.0, 3.0 * PER_DEVICE_TRAIN_BATCH)
    assert resolve("dq-bart", objective={"preset": "weighted", "logits_weight": 0.5}).objective.logits_weight == 0.5
    with pytest.raises(UserError, match="model.objective.preset"):
        resolve("dq-bart", objective={"preset": "heavy"})
    # --new_distill_map (R:97, 436-437): the decoder's map {1: {0: 0}}, the encoder's the usual table; the script
    # takes it with a 1-layer decoder only (R:292-293).
    assert layer_map(6, 1, "dq-bart-new", stack="decoder") == [0]
    assert layer_map(6, 3, "dq-bart-new", stack="encoder") == [0, 2, 5]
    with pytest.raises(UserError, match="model.shape.layer_map=dq-bart-new"):
        layer_map(6, 2, "dq-bart-new", stack="decoder")
    module = DQStudentModule(teacher=str(teacher_dir), bits="2-2-8", depth="2-1", shape={"layer_map": "dq-bart-new"})
    assert (module.encoder_map, module.decoder_map) == (layer_map(4, 2, "dq-bart"), [0])
    assert DQStudentModule(teacher=str(teacher_dir), bits="2-2-8", depth="2-1").decoder_map == [3]


@pytest.mark.parametrize("task", ["xsum", "cnn_dailymail"])
def test_the_paper_configs_decode_evaluate_and_select_as_the_official_script(task, teacher_dir):
    """The shipped experiments/<task>/dq-paper.yaml, composed as `fit` reads it: its student decodes with the
    official settings, evaluates 4 per device on the whole validation split and keeps the best by ROUGE-Lsum
    (R:778-823); 16 sequences per step, lr 3e-5, 5% warm-up."""
    from dq_lightning.data.tasks import get_task
    from dq_lightning.models.tokenizer import load_tokenizer
    from dq_lightning.sweep.check_cli import CheckCLI

    cli = CheckCLI.build_once(instantiate=False)
    cli.parse_arguments(cli.parser, ["fit", "--config", str(PROJECT_ROOT / "experiments" / task / "dq-paper.yaml")])
    config = cli.config["fit"]
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    assert model["recipe"] == "dq-bart" and model["lr"] == LEARNING_RATE
    assert model["optimizer"]["warmup_ratio"] == WARMUP_RATIO
    assert config["global_batch_size"] == PER_DEVICE_TRAIN_BATCH * ACCUMULATION
    assert data["eval_batch_size"] == PER_DEVICE_EVAL_BATCH and data["max_val_samples"] is None
    assert (data["max_source_length"], data["max_target_length"]) == (1024, 128)  # R:123-127, 140-145
    monitors = {callback["init_args"].get("monitor") for callback in config["trainer"]["callbacks"]}
    assert monitors == {None, "val/rougeLsum"}
    if task == "cnn_dailymail":
        assert config["trainer"]["max_epochs"] == 20  # the official README's command, --num_train_epochs 20

    student = DQStudentModule(teacher=str(teacher_dir), bits="2-2-8", depth="2-1", generation=model["generation"])
    student.attach(load_tokenizer(str(teacher_dir)), get_task(task))
    decoding = student.model.generation_config
    assert {key: getattr(decoding, key) for key in GENERATION[task]} == GENERATION[task]
