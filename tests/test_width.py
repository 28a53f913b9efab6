"""Thinner students extracted from the micro teacher (dq_lightning.distill.width): widths, importance, slices."""

import copy

import pytest
import torch
from transformers import AutoTokenizer, MBartForConditionalGeneration

from dq_lightning.distill.student import TeacherAndStudent, copy_student, load_teacher
from dq_lightning.distill.width import Units, Widths, WidthSpec, extract, importance, random_importance
from dq_lightning.errors import UserError
from dq_lightning.models.presets import build_config

TEXTS = [("The committee met on Tuesday to discuss the new budget for the city's schools.", "Budget talks."),
         ("Heavy rain flooded several roads in the north of the county overnight.", "Roads flooded."),
         ("A local bakery won a national prize for its sourdough bread this year.", "Bakery wins prize."),
         ("Scientists found a new species of frog in the rainforest last month.", "New frog found.")]


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return load_teacher(str(teacher_dir))


@pytest.fixture(scope="module")
def batches(teacher_dir):
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    result = []
    for pair in (TEXTS[:2], TEXTS[2:]):
        batch = tokenizer([source for source, _ in pair], text_target=[target for _, target in pair],
                          padding=True, return_tensors="pt")
        batch["labels"][batch["labels"] == tokenizer.pad_token_id] = -100
        result.append(dict(batch))
    return result


def forward(model, batch, **kwargs):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                     **kwargs)


@pytest.mark.parametrize("text", ["1", "heads=2,ffn=64,d_model=32"])
def test_full_width_extraction_is_the_teacher(text, teacher, batches):
    spec = WidthSpec.parse(text, teacher.config)
    assert spec.is_full
    student, kept = extract(teacher, spec, importance(teacher, batches))
    assert torch.equal(kept.hidden, torch.arange(32))
    for batch in batches:
        ours, theirs = forward(student, batch), forward(teacher, batch)
        assert torch.equal(ours.logits, theirs.logits)
        assert torch.equal(ours.logits.argmax(-1), theirs.logits.argmax(-1))  # label loyalty 1
    generated = [model.generate(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"],
                                max_length=8, num_beams=2) for model in (student, teacher)]
    assert torch.equal(*generated)
    assert student.model.shared.weight.data_ptr() != teacher.model.shared.weight.data_ptr()


@pytest.mark.parametrize("text, widths", [("0.5", Widths(16, 1, 1, 32, 32)), ("heads=1", Widths(16, 1, 1, 64, 64)),
                                          ("d_model=16,ffn=20", Widths(16, 1, 1, 20, 20)),
                                          ("0.3", Widths(16, 1, 1, 19, 19)), ("ffn=8", Widths(32, 2, 2, 8, 8))])
def test_widths_of_a_spec(text, widths, teacher):
    assert WidthSpec.parse(text, teacher.config).student == widths


def test_extracted_student_is_the_teachers_kept_slices_and_runs(teacher, batches):
    spec = WidthSpec.parse("0.5", teacher.config)
    student, kept = extract(teacher, spec, random_importance(teacher, seed=3))
    hidden, config = kept.hidden, student.config
    assert (config.d_model, config.encoder_attention_heads, config.decoder_ffn_dim) == (16, 1, 32)
    assert student.lm_head.weight is student.model.shared.weight
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight[:, hidden])
    assert torch.equal(student.final_logits_bias, teacher.final_logits_bias)
    layer, teacher_layer = student.model.decoder.layers[2], teacher.model.decoder.layers[2]
    neurons = kept.neurons["model.decoder.layers.2"]
    assert torch.equal(layer.fc1.weight, teacher_layer.fc1.weight[neurons][:, hidden])
    assert torch.equal(layer.fc2.weight, teacher_layer.fc2.weight[hidden][:, neurons])
    head = int(kept.heads["model.decoder.layers.2.encoder_attn"][0])
    rows = slice(16 * head, 16 * head + 16)
    assert torch.equal(layer.encoder_attn.v_proj.weight, teacher_layer.encoder_attn.v_proj.weight[rows][:, hidden])
    assert torch.equal(layer.encoder_attn.out_proj.weight, teacher_layer.encoder_attn.out_proj.weight[hidden][:, rows])
    assert torch.equal(layer.final_layer_norm.bias, teacher_layer.final_layer_norm.bias[hidden])
    outputs = forward(student, batches[0], output_attentions=True, output_hidden_states=True)
    batch, length = batches[0]["input_ids"].shape
    assert outputs.logits.shape == (batch, batches[0]["labels"].size(1), teacher.config.vocab_size)
    assert outputs.encoder_attentions[0].shape == (batch, 1, length, length)
    assert outputs.encoder_hidden_states[-1].shape == (batch, length, 16)
    assert torch.isfinite(outputs.loss)
    generated = student.generate(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"],
                                 max_length=8, num_beams=2)
    assert generated.shape[0] == batch and int(generated.max()) < teacher.config.vocab_size


def test_importance_is_deterministic_and_leaves_the_model_as_it_was(teacher, batches):
    first, second = importance(teacher, batches), importance(teacher, batches)
    for a, b in zip(units_tensors(first), units_tensors(second)):
        assert torch.equal(a, b)
        assert (a > 0).all()
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert len(first.heads) == 4 + 4 * 2 and len(first.neurons) == 8


def test_head_scores_are_the_head_mask_gradient(teacher, batches):
    """Michel et al.'s |d loss / d head_mask|, from an explicit mask on the heads' outputs (transformers 5 has
    no head_mask argument), per batch and summed: what `importance` reads off out_proj's input."""
    path = "model.decoder.layers.1.encoder_attn"
    attention = teacher.get_submodule(path)
    expected = torch.zeros(2)
    for batch in batches:
        mask = torch.ones(2, requires_grad=True)
        handle = attention.out_proj.register_forward_pre_hook(
            lambda module, inputs: (inputs[0] * mask.repeat_interleave(16),))
        try:
            teacher(**batch).loss.backward()
        finally:
            handle.remove()
        expected += mask.grad.abs()
    torch.testing.assert_close(importance(teacher, batches).heads[path], expected)


def units_tensors(units: Units):
    return [units.hidden, *units.heads.values(), *units.neurons.values()]


# Units of the constructed teacher whose outputs are exactly zero, hence of importance exactly 0.
DEAD_DIMS = list(range(0, 32, 2))
DEAD_HEADS = {"model.encoder.layers.1.self_attn": 0, "model.decoder.layers.0.encoder_attn": 1}
DEAD_NEURONS = {"model.encoder.layers.2": list(range(32, 64)), "model.decoder.layers.3": list(range(0, 64, 2))}


@pytest.fixture(scope="module")
def damaged(teacher):
    """A copy of the teacher with the units above silenced: zero LayerNorm weight and bias at the dead
    dimensions (every residual state is 0 there), zero value rows of the dead heads, zero fc1 rows (GELU(0) is
    0) of the dead neurons."""
    model = copy.deepcopy(teacher)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight[DEAD_DIMS] = 0
                module.bias[DEAD_DIMS] = 0
        for path, head in DEAD_HEADS.items():
            v_proj = model.get_submodule(path).v_proj
            v_proj.weight[16 * head:16 * head + 16] = 0
            v_proj.bias[16 * head:16 * head + 16] = 0
        for path, neurons in DEAD_NEURONS.items():
            fc1 = model.get_submodule(path).fc1
            fc1.weight[neurons] = 0
            fc1.bias[neurons] = 0
    return model


def test_impt_keeps_the_units_that_matter(damaged, batches):
    scores = importance(damaged, batches)
    spec = WidthSpec.parse("0.5", damaged.config)
    alive_dims = [d for d in range(32) if d not in DEAD_DIMS]
    assert (scores.hidden[DEAD_DIMS] == 0).all() and (scores.hidden[alive_dims] > 0).all()
    student, kept = extract(damaged, spec, scores)
    assert kept.hidden.tolist() == alive_dims
    for path, head in DEAD_HEADS.items():
        assert scores.heads[path][head] == 0 and scores.heads[path][1 - head] > 0
        assert kept.heads[path].tolist() == [1 - head]
    for path, neurons in DEAD_NEURONS.items():
        assert kept.neurons[path].tolist() == [n for n in range(64) if n not in neurons]
    rand = random_importance(damaged, seed=0).keep(spec)
    assert rand.hidden.tolist() != alive_dims


def test_rand_is_seeded(teacher):
    spec = WidthSpec.parse("0.5", teacher.config, method="rand")
    first, again, other = (random_importance(teacher, seed).keep(spec) for seed in (0, 0, 1))
    assert all(torch.equal(a, b) for a, b in zip(units_tensors(first), units_tensors(again)))
    assert not all(torch.equal(a, b) for a, b in zip(units_tensors(first), units_tensors(other)))
    assert first.hidden.numel() == 16 and first.neurons["model.encoder.layers.0"].numel() == 32


def test_scaled_embeddings_keep_their_balance_with_positions():
    """mBART multiplies the token embedding by sqrt(d_model): a narrower student's embedding output must still
    be the teacher's embedding sum at the kept dimensions, renormalised."""
    torch.manual_seed(0)
    config = build_config("micro-mbart", vocab_size=100, dropout=0.0, attn_implementation="eager")
    teacher = MBartForConditionalGeneration(config).eval()
    student, kept = extract(teacher, WidthSpec.parse("0.5", config), random_importance(teacher, seed=0))
    seen = {}
    for name, model in (("teacher", teacher), ("student", student)):
        model.model.encoder.layernorm_embedding.register_forward_hook(
            lambda module, inputs, output, name=name: seen.update({name: (inputs[0], output)}))
        with torch.no_grad():
            model(input_ids=torch.tensor([[5, 17, 42, 2]]), decoder_input_ids=torch.tensor([[2, 5]]))
    norm = student.model.encoder.layernorm_embedding
    expected = torch.nn.functional.layer_norm(seen["teacher"][0][..., kept.hidden], (16,), norm.weight, norm.bias)
    assert student.model.encoder.embed_tokens.embed_scale == 4.0
    torch.testing.assert_close(seen["student"][1], expected, atol=2e-3, rtol=0)


@pytest.mark.parametrize("text, message", [
    ("heads=3,d_model=32", "3 heads do not divide d_model 32"),
    ("heads=1,d_model=32", "keeps the teacher's encoder head_dim 16"),
    ("heads=3", "d_model 48 is larger than the teacher's 32"),
    ("ffn=65", "encoder_ffn 65 is larger than the teacher's 64"),
    ("d_model=64", "d_model 64 is larger"),
    ("d_model=24", "d_model 24 is not a whole number"),
    ("heads=0", "must be a positive integer"),
    ("ffn=0", "encoder_ffn 0 must be a positive integer"),
    ("0", "the ratio must be in (0, 1]"),
    ("1.5", "the ratio must be in (0, 1]"),
    ("-0.5", "the ratio must be in (0, 1]"),
    ("nan", "the ratio must be in (0, 1]"),
    ("half", "neither a ratio"),
    ("", "neither a ratio"),
    ("heads=two", "heads='two' is not a positive integer"),
    ("heads=1.0", "is not a positive integer"),
    ("ffn=-3", "is not a positive integer"),
    ("width=16", "unknown key 'width'"),
    ("heads=1,heads=1", "heads is given twice"),
])
def test_bad_width_is_one_user_error(text, message, teacher):
    with pytest.raises(UserError) as error:
        WidthSpec.parse(text, teacher.config)
    assert str(error.value).startswith("model.width=")
    assert message in str(error.value)


def test_bad_method_is_a_user_error(teacher):
    with pytest.raises(UserError, match=r"model\.width=0\.5: .*model\.width_method.*'big'"):
        WidthSpec.parse("0.5", teacher.config, method="big")


def test_teacher_and_student_builds_a_thinner_student(teacher_dir, batches):
    factory = TeacherAndStudent(str(teacher_dir), decoder_layers=2, width="0.5", width_method="rand", width_seed=1)
    student = factory.new_student()
    assert (student.config.d_model, student.config.decoder_layers, student.config.encoder_ffn_dim) == (16, 2, 32)
    assert student.training and all(p.requires_grad for p in student.parameters())
    kept = factory.kept
    assert sorted(kept.neurons) == [f"model.{stack}.layers.{i}" for stack, n in (("decoder", 2), ("encoder", 4))
                                    for i in range(n)]
    factory.new_student()
    assert torch.equal(factory.kept.hidden, kept.hidden)
    assert torch.isfinite(student(**batches[0]).loss)


def test_teacher_and_student_extracts_by_importance_once_scored(teacher_dir, batches):
    factory = TeacherAndStudent(str(teacher_dir), encoder_layers=2, width="heads=1")
    with pytest.raises(RuntimeError, match="score_width"):
        factory.new_student()
    factory.score_width(batches)
    factory.new_student()
    layers = copy_student(factory.teacher, factory.encoder_map, factory.decoder_map)
    expected = importance(layers, batches).keep(factory.width)
    assert torch.equal(factory.kept.hidden, expected.hidden)
    assert factory.kept.heads.keys() == expected.heads.keys()


def test_teacher_and_student_refuses_a_bad_width(teacher_dir):
    with pytest.raises(UserError, match=r"^model\.width=ffn=128: encoder_ffn 128 is larger"):
        TeacherAndStudent(str(teacher_dir), width="ffn=128")
