"""prepare / convert on small BART and mBART models."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BartForConditionalGeneration, MBartForConditionalGeneration

from dq_lightning.distill.recipe import recipe_quant_config
from dq_lightning.errors import UserError
from dq_lightning.models.presets import build_config
from dq_lightning.quant import (ConvertedEmbedding, ConvertedLinear, QuantConfig, QuantEmbedding, QuantLinear,
                                collect_stats, convert, holds_codes, in_form_of, is_prepared, prepare, set_observe,
                                set_quantization_enabled)

VOCAB = 512


# mBART at micro size: its scaled embedding and pre-LayerNorm layout, built in milliseconds.
MICRO_MBART = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                   decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)


def bart(preset: str = "micro", seed: int = 0) -> BartForConditionalGeneration:
    torch.manual_seed(seed)
    if preset == "tiny-mbart":
        return MBartForConditionalGeneration(build_config(preset, vocab_size=VOCAB, **MICRO_MBART)).eval()
    return BartForConditionalGeneration(build_config(preset, vocab_size=VOCAB)).eval()


def batch(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 11), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :9].contiguous())


def linears(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


# -- reference implementations, written from the formulas independently of the library ------------------------
def twn_rows(w: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(w)
    for i, row in enumerate(w):
        delta = 0.7 * row.abs().mean()
        kept = row.abs() > delta
        alpha = row.abs()[kept].mean()
        out[i] = torch.where(row > delta, alpha, torch.where(row < -delta, -alpha, torch.zeros_like(row)))
    return out


def symmetric(x: torch.Tensor, bits: int, clip: float) -> torch.Tensor:
    x = x.clamp(-clip, clip)
    scale = x.abs().max() / (2 ** (bits - 1) - 1)
    return torch.round(x / scale) * scale


# -- the swap -----------------------------------------------------------------------------------------------
def test_prepare_swaps_every_linear_and_the_token_embedding_keeping_the_tie_and_the_parameters():
    model = bart()
    params_before = dict(model.named_parameters())
    keys_before = set(model.state_dict())
    n_linears = len(linears(model))
    prepare(model, recipe_quant_config("dq_lightning", "2-2-8"))

    quant_linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quant_linears) == n_linears  # 2*6 encoder + 2*10 decoder + LM head
    for module in (model.model.shared, model.model.encoder.embed_tokens, model.model.decoder.embed_tokens):
        assert isinstance(module, QuantEmbedding)
    token = model.model.shared.weight
    assert model.lm_head.weight is token and model.model.decoder.embed_tokens.weight is token
    # One quantizer for the tied matrix, used by every lookup and by the LM head.
    assert model.lm_head.weight_quantizer is model.model.shared.weight_quantizer
    assert model.model.encoder.embed_tokens.weight_quantizer is model.model.shared.weight_quantizer
    assert model.lm_head.weight_quantizer.bits == 2
    assert dict(model.named_parameters()).keys() == params_before.keys()
    assert all(p is params_before[name] for name, p in model.named_parameters())
    assert set(model.state_dict()) == keys_before


def test_prepare_leaves_positional_embeddings_and_layernorms_untouched():
    model = bart()
    untouched = {name: m for name, m in model.named_modules()
                 if isinstance(m, nn.LayerNorm) or name.endswith("embed_positions")}
    assert len(untouched) == 2 + 2 + 2 * 2 + 2 * 3  # positions, embedding LNs, 2 encoder and 2 decoder layers
    values = {name: copy.deepcopy(m.state_dict()) for name, m in untouched.items()}
    classes = {name: type(m) for name, m in untouched.items()}
    prepare(model, recipe_quant_config("dq_lightning", "2-2-8"))
    modules = dict(model.named_modules())
    for name, module in untouched.items():
        assert modules[name] is module and type(module) is classes[name]
        for key, value in module.state_dict().items():
            assert torch.equal(value, values[name][key])
    assert not any(isinstance(m, nn.Module) and hasattr(m, "weight_quantizer") for m in untouched.values())


def test_mbart_keeps_its_embedding_scale():
    model = bart("tiny-mbart")
    reference = copy.deepcopy(model)
    prepare(model, recipe_quant_config("dq_lightning", "8-8-8"))
    embedding = model.model.encoder.embed_tokens
    assert isinstance(embedding, QuantEmbedding)
    assert embedding.embed_scale == pytest.approx(math.sqrt(model.config.d_model))
    set_quantization_enabled(model, False)
    ids = batch()["input_ids"]
    assert torch.equal(embedding(ids), reference.model.encoder.embed_tokens(ids))


def test_disabled_quantization_is_the_full_precision_model():
    model = bart()
    reference = copy.deepcopy(model)
    prepare(model, recipe_quant_config("dq_lightning", "2-2-8"))
    with torch.no_grad():
        assert not torch.equal(model(**batch()).logits, reference(**batch()).logits)
        set_quantization_enabled(model, False)
        assert torch.equal(model(**batch()).logits, reference(**batch()).logits)


def test_quant_linear_forward_equals_manual_fake_quantization():
    torch.manual_seed(2)
    linear = nn.Linear(24, 10)
    x = torch.randn(3, 5, 24) * 2
    module = QuantLinear.from_float(linear, recipe_quant_config("dq_lightning", "2-2-8"))
    expected = F.linear(symmetric(x, 8, 2.5), twn_rows(linear.weight.detach()), linear.bias)
    torch.testing.assert_close(module(x), expected)


def test_prepared_model_forward_equals_manual_fake_quantization():
    model = bart()
    reference = copy.deepcopy(model)
    prepare(model, recipe_quant_config("dq_lightning", "2-2-8"))
    with torch.no_grad():
        # Ternary weights, ternary tied embedding (shared by both lookups and the LM head) ...
        for module in linears(reference).values():
            module.weight.copy_(twn_rows(module.weight))
        # ... and every Linear's input quantized to 8 bits with the 2.5 clip.
        for module in linears(reference).values():
            module.register_forward_pre_hook(lambda m, args: (symmetric(args[0], 8, 2.5),))
        torch.testing.assert_close(model(**batch()).logits, reference(**batch()).logits, rtol=0, atol=1e-5)


CONVERT_CONFIGS = {
    "2-2-8": recipe_quant_config("dq_lightning", "2-2-8"),
    "8-8-8": recipe_quant_config("dq_lightning", "8-8-8"),
    "2-8-8": recipe_quant_config("dq_lightning", "2-8-8"),
    "4-4-8-lsq": recipe_quant_config("dq_lightning", "4-4-8", weight_method="lsq", embedding_method="lsq", act_method="lsq"),
    "3-3-4-tensor-asym": recipe_quant_config("dq_lightning", "3-3-4", weight_granularity="tensor", act_method="asym_minmax"),
    "2-2-8-attention": recipe_quant_config("dq_lightning", "2-2-8", attention_quant="asym_probs"),
}


@pytest.mark.parametrize("name", list(CONVERT_CONFIGS))
@pytest.mark.parametrize("preset", ["micro", "tiny-mbart"])
def test_convert_then_dequantize_equals_the_fake_quantized_forward_exactly(name, preset):
    model = bart(preset)
    prepare(model, CONVERT_CONFIGS[name])
    model.train()
    model(**batch(seed=3)).logits.sum().backward()  # LSQ activation steps initialise on the first batch
    model.eval()
    with torch.no_grad():
        fake = model(**batch()).logits
        lm_weight = model.lm_head.weight_quantizer(model.lm_head.weight)
        convert(model)
        converted = model(**batch()).logits
    assert torch.equal(converted, fake)
    assert isinstance(model.lm_head, ConvertedLinear) and isinstance(model.model.shared, ConvertedEmbedding)
    assert model.lm_head.packed is model.model.encoder.embed_tokens.packed  # the tie survives conversion
    assert model.lm_head.packed.codes.dtype == torch.int8
    assert torch.equal(model.lm_head.packed.dequantize(), lm_weight)
    assert not any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())


@pytest.mark.parametrize("saved", ["latent", "converted"])
@pytest.mark.parametrize("current", ["plain", "prepared", "converted"])
def test_a_model_in_the_form_of_a_state_loads_it_and_computes_the_saved_models_outputs(current, saved):
    config = CONVERT_CONFIGS["2-2-8"]
    source = prepare(bart(seed=5), config).eval()
    if saved == "converted":
        convert(source)
    state = source.state_dict()
    model = bart(seed=6)  # other weights: only the loaded state may decide the outputs
    if current != "plain":
        prepare(model, config)
    if current == "converted":
        convert(model)
    fresh_models = []

    def fresh():
        fresh_models.append(bart(seed=7))
        return fresh_models[-1]

    restored = in_form_of(model, config, state, fresh)
    assert holds_codes(state) == (saved == "converted")
    # Only a converted model meeting latent weights is replaced: its own latent weights are gone.
    assert (restored is not model) == (current == "converted" and saved == "latent")
    restored.load_state_dict(state, strict=True)  # raises on a missing or unexpected key
    with torch.no_grad():
        assert torch.equal(restored.eval()(**batch()).logits, source(**batch()).logits)


@pytest.mark.parametrize("name", ["2-2-8", "4-4-8-lsq", "2-2-8-attention"])
def test_gradients_reach_the_latent_weights(name):
    model = bart()
    prepare(model, CONVERT_CONFIGS[name])
    model.train()
    b = batch()
    model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["decoder_input_ids"]).loss.backward()
    for module in model.modules():
        if isinstance(module, (QuantLinear, QuantEmbedding)):
            assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    steps = [p for n, p in model.named_parameters() if n.endswith(".step")]
    assert bool(steps) == (name == "4-4-8-lsq")
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in steps)


def test_an_optimizer_built_before_prepare_trains_the_latent_weights():
    model = bart()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    prepare(model, recipe_quant_config("dq_lightning", "8-8-8"))
    fc1 = model.model.encoder.layers[0].fc1
    before = fc1.weight.detach().clone()
    b = batch()
    model.train()
    model(input_ids=b["input_ids"], labels=b["decoder_input_ids"]).loss.backward()
    optimizer.step()
    assert not torch.equal(fc1.weight.detach(), before)


def test_attention_inputs_are_quantized_on_request():
    plain, quantized = bart(), bart()
    prepare(plain, recipe_quant_config("dq_lightning", "8-8-8"))
    prepare(quantized, recipe_quant_config("dq_lightning", "8-8-8", attention_quant="asym_probs"))
    assert quantized.config._attn_implementation == "dq_quant_eager"
    set_observe(quantized, True)
    with torch.no_grad():
        out = quantized(**batch(), output_attentions=True)
        assert not torch.equal(out.logits, plain(**batch()).logits)
    stats = collect_stats(quantized)
    for role in ("q", "k", "v", "p"):
        assert f"quant/encoder.layers.0.self_attn/{role}_scale" in stats
        assert f"quant/decoder.layers.1.encoder_attn/{role}_scale" in stats
    # Attention maps (for attention distillation) are still returned, on the quantized probability grid.
    probs = out.encoder_attentions[0]
    assert probs.shape[-1] == probs.shape[-2] and torch.unique(probs).numel() <= 256


def test_statistics_are_recorded_only_when_observing():
    model = bart()
    prepare(model, recipe_quant_config("dq_lightning", "2-2-8", weight_clip=0.05))
    with torch.no_grad():
        model(**batch())
    assert collect_stats(model) == {}
    set_observe(model, True)
    with torch.no_grad():
        model(**batch())
    set_observe(model, False)
    stats = collect_stats(model)
    assert stats["quant/encoder.layers.0.fc1/w_clipped_frac"] > 0  # init std 0.02 > clip 0.05 sometimes
    assert 0 < stats["quant/encoder.layers.0.fc1/a_scale"] <= 2.5 / 127
    assert "quant/shared/w_scale" in stats
    for group in ("weight", "embedding", "act"):
        assert f"quant/{group}/clipped_frac_max" in stats
    assert collect_stats(model) == {}  # cleared once collected


def test_prepare_is_idempotent_and_refuses_another_config():
    model = bart()
    config = recipe_quant_config("dq_lightning", "2-2-8")
    prepare(model, config)
    fc1 = model.model.encoder.layers[0].fc1
    prepare(model, recipe_quant_config("dq_lightning", "2-2-8"))
    assert model.model.encoder.layers[0].fc1 is fc1 and is_prepared(model)
    with pytest.raises(UserError, match="already prepared for 2-2-8"):
        prepare(model, recipe_quant_config("dq_lightning", "8-8-8"))


def test_model_without_quantizable_layer_is_refused():
    with pytest.raises(UserError, match="no quantizable layer"):
        prepare(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), QuantConfig())


def test_convert_needs_a_prepared_model():
    with pytest.raises(UserError, match="prepare"):
        convert(bart())


def test_quant_linear_round_trips_to_a_float_linear_sharing_the_parameters():
    linear = nn.Linear(8, 4)
    quantized = QuantLinear.from_float(linear, recipe_quant_config("dq_lightning", "4-4-8"))
    back = quantized.to_float()
    assert type(back) is nn.Linear and back.weight is linear.weight and back.bias is linear.bias
    x = torch.randn(2, 8)
    assert torch.equal(back(x), linear(x))


@pytest.mark.parametrize("name", ["2-2-8", "4-4-8-lsq"])
def test_evaluation_quantizes_each_weight_once_until_a_training_step_changes_it(name):
    """Beam search runs the decoder once per generated token: without autograd the fake-quantized weights are
    kept, with exactly the values of quantizing again, and recomputed after the weights (or LSQ steps) move."""
    model = bart()
    prepare(model, CONVERT_CONFIGS[name])
    model.eval()
    calls = []
    for module in linears(model).values():
        if module.weight_quantizer is not None:
            module.weight_quantizer.register_forward_hook(lambda m, args, out: calls.append(m))
    quantized = [m for m in linears(model).values() if m.weight_quantizer is not None]

    def logits(grad: bool) -> torch.Tensor:
        with torch.set_grad_enabled(grad):
            return model(**batch()).logits.detach()

    fresh = logits(grad=True)  # computes every weight anew
    state = copy.deepcopy(model.state_dict())
    calls.clear()
    with torch.inference_mode():
        first = model(**batch()).logits
    assert len(calls) == len(quantized)
    second = logits(grad=False)
    assert len(calls) == len(quantized)  # the second evaluation quantized nothing again
    assert torch.equal(first, fresh) and torch.equal(second, fresh)

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(**batch(), labels=batch()["decoder_input_ids"]).loss.backward()
    optimizer.step()
    model.eval()
    after = logits(grad=False)
    assert not torch.equal(after, second)
    assert torch.equal(after, logits(grad=True))  # what quantizing the updated weights gives

    logits(grad=False)
    model.load_state_dict(state)  # weights changed in place with no training forward in between
    assert torch.equal(logits(grad=False), fresh)
