"""Fake quantizers: straight-through gradients, grids, TWN and LSQ formulas, config validation."""

import math

import pytest
import torch

from dq_lightning.distill.recipe import recipe_quant_config
from dq_lightning.errors import UserError
from dq_lightning.quant.quantizers import make_activation_quantizer
from dq_lightning.quant import (AsymMinMaxQuantizer, LSQQuantizer, MinMaxQuantizer, QuantConfig, TernaryQuantizer,
                                make_weight_quantizer, parse_wea)


def quantizer(method: str, bits: int, granularity: str, clip=None, weight=None):
    if method == "ternary":
        return TernaryQuantizer(granularity, clip)
    if method == "minmax":
        return MinMaxQuantizer(bits, granularity, clip)
    if method == "asym_minmax":
        return AsymMinMaxQuantizer(bits, granularity, clip)
    return LSQQuantizer(bits, granularity, weight=weight)


# -- straight-through estimator ---------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: MinMaxQuantizer(8, "tensor", clip=1.0),
    lambda: MinMaxQuantizer(2, "row", clip=1.0),
    lambda: AsymMinMaxQuantizer(4, "tensor", clip=1.0),
    lambda: TernaryQuantizer("row", clip=1.0),
], ids=["minmax8", "minmax2-row", "asym4", "ternary"])
def test_ste_gradient_is_identity_inside_the_clip_range_and_zero_from_the_clip_outward(make):
    torch.manual_seed(0)
    x = (torch.linspace(-2, 2, 81).reshape(3, 27)).requires_grad_()
    upstream = torch.randn(3, 27)
    make()(x).backward(upstream)
    inside = x.detach().abs() < 1.0
    assert inside.any() and (~inside).any()
    assert torch.equal(x.grad[inside], upstream[inside])
    assert torch.equal(x.grad[~inside], torch.zeros_like(x.grad[~inside]))


@pytest.mark.parametrize("method", ["minmax", "ternary", "asym_minmax"])
def test_ste_gradient_without_clip_is_exactly_the_identity(method):
    torch.manual_seed(1)
    x = torch.randn(8, 64, requires_grad=True)
    upstream = torch.randn(8, 64)
    quantizer(method, 2 if method == "ternary" else 4, "row")(x).backward(upstream)
    assert torch.equal(x.grad, upstream)


def test_lsq_input_gradient_is_identity_inside_its_range_and_zero_outside():
    q = LSQQuantizer(3, "tensor")  # codes -4..3
    with torch.no_grad():
        q.step.fill_(0.5)
        q.initialized.fill_(True)
    x = torch.tensor([-3.0, -2.0, -0.4, 0.0, 1.2, 1.5, 1.6, 4.0], requires_grad=True)
    q(x).backward(torch.ones_like(x))
    # Representable range: [-4 * 0.5, 3 * 0.5] = [-2.0, 1.5].
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


# -- grids ----------------------------------------------------------------------------------------------------
CASES = [(m, b, g) for g in ("row", "tensor") for m, bits in
         (("minmax", (2, 3, 4, 8)), ("ternary", (2,)), ("lsq", (2, 3, 4, 8)), ("asym_minmax", (2, 3, 4, 8)))
         for b in bits]


@pytest.mark.parametrize("method,bits,granularity", CASES)
def test_b_bit_tensor_has_at_most_2_to_the_b_values_per_scale_group(method, bits, granularity):
    torch.manual_seed(2)
    w = torch.randn(6, 1000) * torch.linspace(0.1, 3, 6).unsqueeze(1)
    if method == "lsq" and granularity == "row":
        q = LSQQuantizer(bits, "row", weight=w)
    else:
        q = quantizer(method, bits, granularity, weight=w)
    out = q(w).detach()
    groups = list(out) if granularity == "row" else [out]
    for group in groups:
        distinct = torch.unique(group).numel()
        assert 2 <= distinct <= 2**bits
    if method == "minmax" and bits == 8:
        # A 1000-value Gaussian row uses most of the 255 symmetric levels: the grid is really 8-bit.
        assert torch.unique(groups[0]).numel() > 64


def test_minmax_values_are_integer_multiples_of_the_scale_and_the_max_is_exact():
    torch.manual_seed(3)
    w = torch.randn(5, 40)
    q = MinMaxQuantizer(4, "row")
    out = q(w).detach()
    scale = w.abs().amax(dim=1, keepdim=True) / 7
    torch.testing.assert_close(out / scale, torch.round(w / scale))
    torch.testing.assert_close(out.abs().amax(dim=1), w.abs().amax(dim=1))


def test_asymmetric_quantizer_keeps_zero_exact_and_uses_the_full_grid_on_one_signed_input():
    x = torch.relu(torch.linspace(-1, 3, 401))
    q = AsymMinMaxQuantizer(4, "tensor")
    out = q(x)
    assert torch.equal(out[x == 0], torch.zeros_like(out[x == 0]))
    assert torch.unique(out).numel() == 16
    assert (out - x).abs().max() <= 3 / 15 / 2 + 1e-6


# -- ternary (TWN) ---------------------------------------------------------------------------------------------
W = torch.tensor([[0.1, -0.5, 0.9, -0.05],
                  [1.0, 1.0, -1.0, 0.0]])


def test_ternary_per_row_follows_the_twn_formula():
    # Row 0: delta = 0.7 * mean(0.1, 0.5, 0.9, 0.05) = 0.27125; kept |w| = 0.5, 0.9 -> alpha = 0.7.
    # Row 1: delta = 0.7 * 0.75 = 0.525; kept 1, 1, 1 -> alpha = 1.
    expected = torch.tensor([[0.0, -0.7, 0.7, 0.0],
                             [1.0, 1.0, -1.0, 0.0]])
    torch.testing.assert_close(TernaryQuantizer("row")(W), expected)


def test_ternary_per_tensor_follows_the_twn_formula():
    # delta = 0.7 * 4.55 / 8 = 0.398125; kept 0.5, 0.9, 1, 1, 1 -> alpha = 4.4 / 5 = 0.88.
    a = 0.88
    expected = torch.tensor([[0.0, -a, a, 0.0],
                             [a, a, -a, 0.0]])
    torch.testing.assert_close(TernaryQuantizer("tensor")(W), expected)


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_ternary_values_are_minus_alpha_zero_plus_alpha(granularity):
    torch.manual_seed(4)
    w = torch.randn(7, 300) * 0.05
    q = TernaryQuantizer(granularity)
    alpha, delta = q.qparams(w)
    out = q(w).detach()
    alpha = alpha.expand_as(out) if granularity == "row" else alpha
    assert torch.all((out == 0) | (out == alpha) | (out == -alpha))
    magnitude = w.abs()
    mean = magnitude.mean(dim=1, keepdim=True) if granularity == "row" else magnitude.mean()
    torch.testing.assert_close(delta, 0.7 * mean)
    assert torch.equal(out != 0, magnitude > delta)


# -- LSQ ------------------------------------------------------------------------------------------------------
def test_lsq_step_initialisation_and_gradient_formula():
    w = torch.tensor([[0.3, 2.0, -5.0]])
    q = LSQQuantizer(3, "tensor", weight=w)  # qmin -4, qmax 3
    torch.testing.assert_close(q.step.detach(), 2 * w.abs().mean() / math.sqrt(3))
    with torch.no_grad():
        q.step.fill_(1.0)
    q(w).sum().backward()
    # d/ds: round(v) - v inside (0.3 -> -0.3, 2.0 -> 0), qmin outside (-5 -> -4); scaled by 1/sqrt(3 * 3).
    torch.testing.assert_close(q.step.grad, torch.tensor(-4.3 / 3))


def test_lsq_step_learns_on_a_toy_problem():
    torch.manual_seed(5)
    x = torch.randn(4096)
    q = LSQQuantizer(3, "tensor")
    q(x)  # initialises the step from the data
    with torch.no_grad():
        q.step.mul_(8)  # start far too coarse
    optimizer = torch.optim.Adam(q.parameters(), lr=0.05)
    losses = []
    for _ in range(150):
        optimizer.zero_grad()
        loss = (q(x) - x).pow(2).mean()
        loss.backward()
        if not losses:
            assert q.step.grad is not None and q.step.grad.item() > 0  # too coarse: the gradient shrinks it
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    # A 3-bit grid on N(0, 1) is best with a step near 0.5-0.6; training got there from 8x too large.
    assert 0.3 < q.step.item() < 0.9


def test_per_row_lsq_has_one_step_per_row():
    w = torch.randn(5, 16)
    q = LSQQuantizer(4, "row", weight=w)
    assert q.step.shape == (5, 1)
    q(w).sum().backward()
    assert q.step.grad.shape == (5, 1)


# -- configuration ------------------------------------------------------------------------------------------------
def test_quant_config_defaults_are_the_official_recipe():
    config = QuantConfig.from_notation("2-8-8")
    assert config == QuantConfig.dq_bart(2, 8, 8) == QuantConfig(w_bits=2, e_bits=8, a_bits=8)
    assert (config.w_bits, config.e_bits, config.a_bits) == (2, 8, 8)
    assert config.resolved_weight_method == "ternary"
    assert config.resolved_embedding_method == "minmax"
    assert (config.weight_granularity, config.embedding_granularity) == ("tensor", "row")
    assert config.weight_clip == config.act_clip == 2.5
    assert not config.quantize_lm_head and config.attention_quant == "dq-bart"
    assert config.notation == "2-8-8"
    assert QuantConfig.from_notation("2-2-8").resolved_embedding_method == "ternary"


def test_the_project_recipe_differs_only_where_it_says():
    official, project = recipe_quant_config("dq-bart", "2-2-8"), recipe_quant_config("dq_lightning", "2-2-8")
    assert official == QuantConfig.dq_bart(2, 2, 8)
    differing = {f for f in official.to_dict() if getattr(official, f) != getattr(project, f)}
    assert differing == {"weight_granularity", "weight_clip", "quantize_lm_head", "attention_quant"}
    assert (project.weight_granularity, project.weight_clip) == ("row", None)
    assert project.quantize_lm_head and project.attention_quant == "off"
    # A recipe only sets defaults: a single field can still be changed.
    assert recipe_quant_config("dq-bart", "2-2-8", weight_granularity="row").weight_granularity == "row"
    with pytest.raises(UserError, match="recipe='dq_bart' is not a recipe; choose from dq-bart, dq_lightning"):
        recipe_quant_config("dq_bart")


@pytest.mark.parametrize("settings,message", [
    (dict(w_bits=5), "w_bits=5 is not supported; choose from 1, 2, 3, 4, 8, 32"),
    (dict(w_bits=0), "w_bits=0 is not supported"),
    (dict(e_bits=1, embedding_method="minmax"), "e_bits=1 needs embedding_method binary, auto or tbt"),
    (dict(w_bits=1, weight_method="ternary"), "weight_method='ternary' needs w_bits=2"),
    (dict(w_bits=1, weight_method="lsq"), "w_bits=1 needs weight_method binary, auto or tbt"),
    (dict(w_bits=2, weight_method="binary"), "weight_method='binary' needs w_bits=1"),
    (dict(w_bits=4, weight_method="tbt_ternary"), "weight_method='tbt_ternary' needs w_bits=2"),
    (dict(a_bits=1), "a_bits=1 needs act_method='elastic'"),
    (dict(act_method="elastic", act_granularity="row"), "act_method='elastic' learns one step per activation"),
    (dict(act_method="lsq", unsigned_ffn_attn=True), "unsigned_ffn_attn=true needs act_method minmax"),
    (dict(unsigned_ffn_attn="yes"), "unsigned_ffn_attn='yes' must be true or false"),
    (dict(a_bits=16), "a_bits=16"),
    (dict(w_bits=4, weight_method="ternary"), "weight_method='ternary' needs w_bits=2"),
    (dict(e_bits=8, embedding_method="ternary"), "embedding_method='ternary' needs e_bits=2"),
    (dict(act_clip=-1.0), "act_clip=-1.0 must be a positive number"),
    (dict(weight_clip=0.0), "weight_clip=0.0"),
    (dict(weight_method="bwn"), "weight_method='bwn'"),
    (dict(weight_granularity="channel"), "weight_granularity='channel'"),
    (dict(embedding_granularity="channel"), "embedding_granularity='channel'"),
    (dict(attention_quant="probs"), "attention_quant='probs' is not supported; choose from off, dq-bart"),
    (dict(quantize_lm_head="yes"), "quantize_lm_head='yes' must be true or false"),
    (dict(act_method="lsq", act_granularity="row"), "act_granularity='tensor'"),
])
def test_bad_quant_config_names_the_setting(settings, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        QuantConfig(**settings)


def test_parse_wea():
    assert parse_wea("2-2-8") == (2, 2, 8)
    assert parse_wea("32-8-8") == (32, 8, 8)
    with pytest.raises(UserError, match="W-E-A"):
        parse_wea("2-2")
    with pytest.raises(UserError, match="a_bits=7"):
        parse_wea("2-2-7")


def test_full_precision_builds_no_quantizer():
    assert make_weight_quantizer(32, "minmax") is None


@pytest.mark.parametrize("bits,method,granularity,clip", [
    (8, "minmax", "tensor", 2.5), (4, "asym_minmax", "row", None), (8, "lsq", "tensor", None)])
def test_activation_quantizer_rebuilt_from_its_spec_computes_the_same(bits, method, granularity, clip):
    from dataclasses import asdict

    original = make_activation_quantizer(bits, method, granularity, clip)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0)) * 3
    original(x)  # an LSQ step is initialised from its first batch: the state to carry over
    rebuilt = make_activation_quantizer(**asdict(original.spec))
    rebuilt.load_state_dict(original.state_dict())
    assert rebuilt.spec == original.spec
    assert torch.equal(rebuilt(x), original(x))


@pytest.mark.parametrize("build", [
    lambda: make_activation_quantizer(8, "minmax", "tensor", 2.5),
    lambda: make_activation_quantizer(4, "asym_minmax", "row", None),
    lambda: make_activation_quantizer(8, "lsq", "tensor", None),
    lambda: make_weight_quantizer(2, "ternary", "row"),
    lambda: make_weight_quantizer(4, "minmax", "tensor", 2.5),
], ids=["minmax", "asym_minmax", "lsq", "ternary", "weight minmax"])
def test_inference_computes_the_quantizers_forward_exactly(build):
    """Deployed models (converted students, loaded exports) quantize their inputs with `inference`: it must be
    the training forward's numbers bit for bit, and keep the gradient when one is asked for."""
    quantizer = build()
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0)) * 3
    expected = quantizer(x)  # also initialises an LSQ step from its first batch
    with torch.no_grad():
        assert torch.equal(quantizer.inference(x), expected)
    leaf = x.clone().requires_grad_(True)
    quantizer.inference(leaf).sum().backward()
    assert leaf.grad is not None and torch.equal(quantizer(x), expected)
