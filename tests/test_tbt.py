"""Recipe tbt (TBT, Liu et al. ACL 2023): its quantizers against the formulas written out here, independently of
the library (forward, straight-through and step-size gradients), the student they make, the recipe table, the
logits loss, 1-bit packing and size, and where a 1-bit or learned-step setting is refused."""

import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BartForConditionalGeneration

from dq_lightning.distill.objective import DQObjective
from dq_lightning.distill.recipe import recipe_quant_config, resolve
from dq_lightning.errors import UserError
from dq_lightning.export.packing import pack, packed_numel, unpack
from dq_lightning.models.presets import build_config
from dq_lightning.quant import QuantEmbedding, QuantLinear, convert, prepare, use_deployed_head
from dq_lightning.quant.modules import AttentionInputQuantizer
from dq_lightning.quant.quantizers import (AsymMinMaxQuantizer, BinaryQuantizer, ElasticQuantizer, MinMaxQuantizer,
                                           TBTTernaryQuantizer, make_activation_quantizer, make_weight_quantizer)
from dq_lightning.size import model_size

VOCAB = 512


# -- the formulas, on plain tensors ---------------------------------------------------------------------------
def binary_formula(w: torch.Tensor, per_row: bool) -> torch.Tensor:
    """sign(w) times the mean |w| of its row (or of the matrix); a zero counts as +."""
    scale = w.abs().mean(dim=1, keepdim=True) if per_row else w.abs().mean()
    return torch.where(w >= 0, 1.0, -1.0) * scale


def tbt_ternary_formula(w: torch.Tensor, per_row: bool) -> torch.Tensor:
    """scale = 4/3 of the mean |w|; codes round(clamp(w / scale, -1, 1))."""
    scale = 4 / 3 * (w.abs().mean(dim=1, keepdim=True) if per_row else w.abs().mean())
    return torch.round(torch.clamp(w / scale, -1, 1)) * scale


def elastic_formula(x: torch.Tensor, step: torch.Tensor, bits: int, unsigned: bool):
    """Forward value, d value / d x (as a mask) and d value / d step (elementwise) of TBT's elastic quantizer,
    and its gradient scale."""
    if unsigned:
        low, high = 0, (2 if bits == 2 else 2**bits - 1)
        shift = x.min() if bits > 1 else torch.zeros(())
    else:
        low, high = (-1, 1) if bits <= 2 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        shift = torch.zeros(())
    v = (x - shift) / step
    inside = ((v >= low) & (v <= high)).float()
    if bits == 1 and not unsigned:
        value, d_step = torch.sign(x) * step, torch.sign(x)
    else:
        value = torch.round(torch.clamp(v, low, high)) * step + shift
        d_step = inside * (torch.round(v) - v) + (v < low).float() * low + (v > high).float() * high
    return value, inside, d_step, 1 / math.sqrt(x.numel() * high)


# -- weights ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_row", [True, False], ids=["row", "tensor"])
@pytest.mark.parametrize("method,formula", [("binary", binary_formula), ("tbt_ternary", tbt_ternary_formula)])
def test_weight_quantizer_forward_is_the_formula_and_its_gradient_the_identity(method, formula, per_row):
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 1, 6)[:, None]
    w[2, :5] = 0.0  # exact zeros: a binary code has no zero
    latent = w.clone().requires_grad_()
    quantizer = make_weight_quantizer(1 if method == "binary" else 2, method, "row" if per_row else "tensor")
    out = quantizer(latent)
    torch.testing.assert_close(out, formula(w, per_row), rtol=1e-6, atol=0)
    upstream = torch.randn(6, 40, generator=torch.Generator().manual_seed(1))
    out.backward(upstream)
    assert torch.equal(latent.grad, upstream)  # TBT's weight STE: q.detach() - w.detach() + w
    levels = [torch.unique(row).numel() for row in (out if per_row else out.reshape(1, -1))]
    assert max(levels) <= (2 if method == "binary" else 3)


def test_binary_weight_gradient_is_masked_beyond_a_clip_and_a_zero_row_stays_zero():
    w = torch.tensor([[0.5, -3.0, 0.2, 2.6], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    quantizer = BinaryQuantizer("row", clip=2.5)
    out = quantizer(w)
    expected_scale = torch.tensor([0.5 + 2.5 + 0.2 + 2.5]) / 4  # |w| clipped at 2.5 before the mean
    torch.testing.assert_close(out[0], torch.tensor([1.0, -1.0, 1.0, 1.0]) * expected_scale)
    assert torch.equal(out[1], torch.zeros(4))  # the padding row of an embedding
    out.sum().backward()
    assert w.grad.tolist() == [[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]


def test_tbt_ternary_is_not_twn():
    """TBT's scale is 4/3 of the mean |w| and its threshold 2/3 of it; TWN's threshold is 0.7 of it and its
    scale the mean of the kept values: the same row gives different values."""
    w = torch.tensor([[0.1, 0.65, -0.9, 2.0, -0.05]])
    tbt = make_weight_quantizer(2, "tbt_ternary", "row")(w)
    twn = make_weight_quantizer(2, "ternary", "row")(w)
    mean = w.abs().mean()
    assert torch.equal(tbt.abs().unique(), torch.tensor([0.0, 4 / 3 * mean.item()]))
    assert not torch.equal(tbt, twn)


# -- activations ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("unsigned", [False, True], ids=["signed", "unsigned"])
def test_elastic_forward_and_gradients_are_tbts_formulas(bits, unsigned):
    generator = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 7, 16, generator=generator) * 2
    if unsigned:
        x = x.abs() - 0.3  # one-signed, as a GELU output, but with a negative minimum to shift by
    quantizer = make_activation_quantizer(bits, "elastic_unsigned" if unsigned else "elastic")
    assert isinstance(quantizer, ElasticQuantizer)
    quantizer(x)  # the first tensor initialises the step
    with torch.no_grad():
        quantizer.step.fill_(0.37)  # a step that leaves values on both sides of the range
    latent = x.clone().requires_grad_()
    upstream = torch.randn(2, 7, 16, generator=generator)
    out = quantizer(latent)
    out.backward(upstream)

    value, inside, d_step, grad_scale = elastic_formula(x, torch.tensor(0.37), bits, unsigned)
    torch.testing.assert_close(out, value, rtol=1e-6, atol=1e-6)
    assert 0 < inside.mean() < 1
    torch.testing.assert_close(latent.grad, upstream * inside)
    torch.testing.assert_close(quantizer.step.grad, (upstream * d_step).sum() * grad_scale, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits,unsigned,expected", [
    (2, False, lambda m: 2 * m / math.sqrt(1)), (4, False, lambda m: 2 * m / math.sqrt(7)),
    (1, False, lambda m: 2 * m), (2, True, lambda m: 4 * m / math.sqrt(3)), (4, True, lambda m: 4 * m / math.sqrt(15))])
def test_elastic_step_starts_at_tbts_initial_value(bits, unsigned, expected):
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(3))
    quantizer = ElasticQuantizer(bits, unsigned=unsigned)
    assert not quantizer.initialized
    quantizer(x)
    assert quantizer.initialized
    torch.testing.assert_close(quantizer.step.detach(), torch.tensor(expected(x.abs().mean().item())))


def test_elastic_at_eight_bits_is_min_max_as_in_tbts_code():
    signed, unsigned = make_activation_quantizer(8, "elastic", "tensor", 2.5), \
        make_activation_quantizer(8, "elastic_unsigned", "tensor", 2.5)
    assert type(signed) is MinMaxQuantizer and type(unsigned) is AsymMinMaxQuantizer
    assert signed.clip == unsigned.clip == 2.5


def test_unsigned_two_bit_softmax_probabilities_take_three_levels_from_their_minimum():
    probs = torch.softmax(torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(4)) * 3, dim=-1)
    quantizer = make_activation_quantizer(2, "elastic_unsigned")
    out = quantizer(probs).detach()
    step, low = quantizer.step.detach(), probs.min()
    codes = (out - low) / step
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-5)
    assert set(codes.round().unique().tolist()) <= {0.0, 1.0, 2.0}


@pytest.mark.parametrize("method,bits", [("elastic", 2), ("elastic_unsigned", 2), ("elastic", 1),
                                         ("elastic_unsigned", 4)])
def test_elastic_rebuilt_from_its_spec_and_state_computes_the_same_inference(method, bits):
    """What export stores (spec and state) and load_packed rebuilds: the learned step travels with it."""
    original = make_activation_quantizer(bits, method)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))
    original(x)
    with torch.no_grad():
        original.step.mul_(1.7)  # as if learned
    rebuilt = make_activation_quantizer(**asdict(original.spec))
    rebuilt.load_state_dict(original.state_dict())
    assert rebuilt.spec == original.spec and rebuilt.spec.method == method
    with torch.no_grad():
        assert torch.equal(rebuilt.inference(x), original(x))


# -- the student ----------------------------------------------------------------------------------------------
def micro_bart(seed: int = 0) -> BartForConditionalGeneration:
    torch.manual_seed(seed)
    return BartForConditionalGeneration(build_config("micro", vocab_size=VOCAB)).eval()


def batch(seed: int = 1):
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :9].contiguous())


def test_tbt_student_quantizes_where_tbts_model_does():
    model = prepare(micro_bart(), recipe_quant_config("tbt", "1-1-2"))
    layer = model.model.encoder.layers[0]
    assert isinstance(layer.fc1, QuantLinear) and isinstance(layer.fc1.weight_quantizer, BinaryQuantizer)
    assert layer.fc1.weight_quantizer.granularity == "row"
    signed, unsigned = layer.fc1.input_quantizer, layer.fc2.input_quantizer  # fc2 reads the GELU's output
    assert (signed.method, signed.qmin, signed.qmax) == ("elastic", -1, 1)
    assert (unsigned.method, unsigned.qmin, unsigned.qmax) == ("elastic_unsigned", 0, 2)
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert getattr(layer.self_attn, name).input_quantizer.method == "elastic"
    attention = layer.self_attn.attention_input_quantizer
    assert isinstance(attention, AttentionInputQuantizer)
    assert [q.method for q in (attention.query, attention.key, attention.value, attention.probs)] == \
        ["elastic", "elastic", "elastic", "elastic_unsigned"]
    assert attention.scale_query_first and attention.probs_after_dropout  # as DQ-BART's, which TBT keeps
    assert isinstance(model.model.shared, QuantEmbedding)
    assert isinstance(model.model.shared.weight_quantizer, BinaryQuantizer)
    assert type(model.lm_head) is nn.Linear  # TBT trains with a plain full-precision head
    two_bit = prepare(micro_bart(), recipe_quant_config("tbt", "2-2-8"))
    assert isinstance(two_bit.model.decoder.layers[0].fc1.weight_quantizer, TBTTernaryQuantizer)
    assert type(two_bit.model.decoder.layers[0].fc2.input_quantizer) is AsymMinMaxQuantizer  # min-max at 8


def test_tbt_linear_forward_is_the_formula():
    model = prepare(micro_bart(), recipe_quant_config("tbt", "1-1-4"))
    fc2 = model.model.encoder.layers[1].fc2
    x = torch.randn(2, 5, fc2.in_features, generator=torch.Generator().manual_seed(2))
    fc2(x)  # initialises the input's step
    step = fc2.input_quantizer.step.detach()
    expected = F.linear(elastic_formula(x, step, 4, unsigned=True)[0], binary_formula(fc2.weight.detach(), True),
                        fc2.bias)
    with torch.no_grad():
        torch.testing.assert_close(fc2(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", ["1-1-4", "2-2-2", "1-1-1", "2-1-8"])
def test_tbt_student_converts_to_codes_that_compute_its_fake_quantized_forward_exactly(bits):
    model = prepare(micro_bart(), recipe_quant_config("tbt", bits))
    model.train()
    model(**batch(seed=3)).logits.sum().backward()  # every learned step initialises on the first batch
    steps = [p for n, p in model.named_parameters() if n.endswith(".step")]
    assert bool(steps) == (int(bits.split("-")[2]) <= 4)
    assert all(p.grad is not None for p in steps)
    model.eval()
    use_deployed_head(model, True)  # the head convert (and export) ships: the E-bit tied matrix
    with torch.no_grad():
        fake = model(**batch()).logits
        convert(model)
        assert torch.equal(model(**batch()).logits, fake)
    codes = model.model.encoder.layers[0].fc1.packed.codes
    assert set(codes.unique().tolist()) <= ({-1, 1} if bits.startswith("1") else {-1, 0, 1})


# -- the recipe -----------------------------------------------------------------------------------------------
def test_the_tbt_recipe_table():
    recipe = resolve("tbt")
    quant = recipe.quantizers((2, 2, 8))
    assert (quant.resolved_weight_method, quant.resolved_embedding_method) == ("tbt_ternary", "tbt_ternary")
    assert recipe.quantizers((1, 1, 8)).resolved_weight_method == "binary"
    assert (quant.weight_granularity, quant.embedding_granularity, quant.weight_clip) == ("row", "row", None)
    assert (quant.act_method, quant.unsigned_ffn_attn, quant.attention_quant) == ("elastic", True, "tbt")
    assert not quant.quantize_lm_head and quant.act_clip == 2.5
    objective = recipe.objective_config("dq")
    assert (objective.logits_loss, objective.temperature, objective.mask_padding) == ("kl", 1.0, False)
    assert objective.task_weight == objective.logits_weight == objective.hidden_weight == 1.0
    assert objective.attention_weight == objective.final_encoder_weight == 1.0
    assert recipe.objective.attention_maps == "before_dropout"
    assert recipe.shape.layer_map == "dq-bart"
    assert (recipe.optimizer.weight_decay, recipe.optimizer.gradient_clip) == (0.0, 0.0)
    # Each choice is a setting of its own.
    assert resolve("tbt", quant_settings={"act_method": "minmax"}).quantizers((2, 2, 8)).act_method == "minmax"
    assert resolve("dq-bart", objective={"logits_loss": "kl"}).objective_config("dq").logits_loss == "kl"
    assert resolve("dq-bart").objective_config("dq").logits_loss == "mse"


def test_tbt_logits_loss_has_the_gradient_of_tbts_distribution_loss():
    """TBT's DistributionLoss: -sum softmax(teacher) * log_softmax(student), averaged over every position,
    padding included. The recipe's KL differs from it by the teacher's entropy, a constant."""
    generator = torch.Generator().manual_seed(5)
    student = torch.randn(2, 6, 30, generator=generator, requires_grad=True)
    teacher = torch.randn(2, 6, 30, generator=generator)
    labels = torch.randint(0, 30, (2, 6), generator=generator)
    labels[1, 4:] = -100
    objective = DQObjective(resolve("tbt").objective_config("dq"))
    terms = objective.config
    assert terms.logits_loss == "kl" and not terms.mask_padding
    from dq_lightning.distill.losses import logits_loss

    ours = logits_loss(student, teacher, None, terms.logits_loss, terms.temperature)
    soft_ce = -(teacher.softmax(-1) * student.log_softmax(-1)).sum(-1).mean()
    entropy = -(teacher.softmax(-1) * teacher.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(ours, soft_ce - entropy)
    (grad_ours,) = torch.autograd.grad(ours, student)
    (grad_theirs,) = torch.autograd.grad(soft_ce, student)
    torch.testing.assert_close(grad_ours, grad_theirs)


# -- packing and size -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("numel", [0, 1, 7, 8, 9, 1001])
def test_binary_codes_pack_eight_to_a_byte_and_round_trip(numel):
    codes = torch.where(torch.rand(numel, generator=torch.Generator().manual_seed(numel)) < 0.5, -1, 1)
    packed = pack(codes, 1)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_numel(numel, 1) == -(-numel // 8)
    assert torch.equal(unpack(packed, 1, numel).long(), codes.long())
    quantizer = BinaryQuantizer("row")
    weight = torch.randn(5, 13)
    weight_codes = quantizer.codes(weight, quantizer.qparams(weight))
    assert torch.equal(unpack(pack(weight_codes, 1), 1, 65).reshape(5, 13).float(), weight_codes)
    with pytest.raises(ValueError, match="1-bit codes are signs"):
        pack(torch.tensor([1, 0, -1]), 1)


def test_one_bit_size_accounting():
    """Binary weights and embedding count one bit a value. TBT's README gives bart-base (6-6) 39.6 at 2-2-8 and
    23.2 at 1-1-8 (MiB); the paper convention here counts about 0.5 MiB less at every width (8-8-8: 137.6 vs its
    138.1), and the step from two bits to one, one bit per weight, bias and embedding value, is TBT's 16.4."""
    config = build_config("bart-base")
    one = model_size(config, "1-1-8", convention="paper")
    two = model_size(config, "2-2-8", convention="paper")
    weights = next(g for g in one.groups if g.name == "linear weights")
    assert weights.bits == 1 and weights.size_bits == weights.params
    assert round(two.size_mb - one.size_mb, 1) == round(39.6 - 23.2, 1)
    assert abs(one.size_mb - 23.2) < 0.03 * 23.2
    strict = model_size(config, recipe_quant_config("tbt", "1-1-4"), convention="strict")
    steps = next(g for g in strict.groups if g.name == "activation steps")
    # One step per quantized Linear input (the full-precision head's input is not quantized) and four per
    # attention module (query, key, value, probabilities): 6 x (4 + 2) + 6 x (8 + 2) Linears, 18 attentions.
    assert steps.params == 6 * 6 + 6 * 10 + 4 * 18
    eight = model_size(config, recipe_quant_config("tbt", "1-1-8"), convention="strict")
    assert not any(g.name == "activation steps" for g in eight.groups)  # min-max at 8 bits: nothing learned


# -- refusals -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe,bits,message", [
    ("dq-bart", "2-2-1", "a_bits=1 needs act_method='elastic'"),
    ("dq_lightning", "1-1-1", "a_bits=1 needs act_method='elastic'"),
    ("tbt", "0-2-8", "w_bits=0 is not supported"),
])
def test_bit_widths_a_recipe_cannot_take_are_refused_naming_the_setting(recipe, bits, message):
    with pytest.raises(UserError, match=message):
        recipe_quant_config(recipe, bits)


def test_a_supernet_refuses_the_tbt_recipe_for_its_learned_steps(teacher_dir):
    from dq_lightning.modules.supernet import DQSupernetModule

    with pytest.raises(UserError, match="model.quant_settings.act_method=elastic.*recipe tbt"):
        DQSupernetModule(teacher=str(teacher_dir), grid=["2-2-8 4-2", "8-8-8 4-2"], recipe="tbt")
