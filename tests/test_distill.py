import pytest
import torch
from transformers import BartForConditionalGeneration

from dq_lightning.distill.layer_map import layer_map
from dq_lightning.distill.losses import attention_loss, hidden_states_loss, logits_loss
from dq_lightning.distill.loyalty import Loyalty, label_agreement, probability_loyalty
from dq_lightning.distill.student import copy_student
from dq_lightning.errors import UserError
from dq_lightning.models.presets import build_config


@pytest.mark.parametrize("teacher, student, strategy, expected", [
    (6, 6, "max_spacing", [0, 1, 2, 3, 4, 5]),
    (6, 3, "max_spacing", [0, 2, 5]),
    (6, 2, "max_spacing", [0, 5]),
    (6, 1, "max_spacing", [5]),
    (12, 3, "max_spacing", [0, 5, 11]),
    (12, 6, "max_spacing", [0, 2, 4, 6, 8, 11]),
    (12, 1, "max_spacing", [11]),
    (6, 3, "uniform", [1, 3, 5]),
    (12, 4, "uniform", [2, 5, 8, 11]),
    (6, 2, "first", [0, 1]),
    (12, 3, "last", [9, 10, 11]),
    (12, 3, [0, 6, 11], [0, 6, 11]),
])
def test_layer_maps(teacher, student, strategy, expected):
    assert layer_map(teacher, student, strategy) == expected


@pytest.mark.parametrize("teacher, student, strategy, message", [
    (6, 7, "max_spacing", "may not be deeper"),
    (6, 3, [0, 2], "has 2 entries but the student has 3"),
    (6, 2, [0, 6], "layer 6 is outside the teacher's 6 layers"),
    (6, 2, [3, 1], "strictly increasing"),
    (6, 2, "middle", "not a strategy"),
])
def test_layer_map_errors_name_the_setting(teacher, student, strategy, message):
    with pytest.raises(UserError, match=message) as error:
        layer_map(teacher, student, strategy, flag="model.decoder_layer_map")
    assert "model.decoder_layer_map" in str(error.value)


def tiny_pair(seed=0, layers=4):
    torch.manual_seed(seed)
    config = build_config("micro", vocab_size=120, encoder_layers=layers, decoder_layers=layers, dropout=0.0)
    return BartForConditionalGeneration._from_config(config, attn_implementation="eager").eval()


def batch_with_padding():
    input_ids = torch.tensor([[0, 10, 11, 12, 13, 2], [0, 20, 21, 2, 1, 1]])
    attention_mask = (input_ids != 1).long()
    labels = torch.tensor([[0, 30, 31, 2], [0, 40, 2, -100]])
    return input_ids, attention_mask, labels


def forward(model, input_ids, attention_mask, labels):
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels.clamp(min=1))
    return model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                 output_hidden_states=True, output_attentions=True)


def all_losses(student_out, teacher_out, attention_mask, decoder_mask, enc_map, dec_map):
    return {
        "logits": logits_loss(student_out.logits, teacher_out.logits, decoder_mask),
        "kl": logits_loss(student_out.logits, teacher_out.logits, decoder_mask, kind="kl", temperature=2.0),
        "enc_hidden": hidden_states_loss(student_out.encoder_hidden_states, teacher_out.encoder_hidden_states,
                                         enc_map, attention_mask),
        "dec_hidden": hidden_states_loss(student_out.decoder_hidden_states, teacher_out.decoder_hidden_states,
                                         dec_map, decoder_mask),
        "enc_attn": attention_loss(student_out.encoder_attentions, teacher_out.encoder_attentions, enc_map,
                                   attention_mask, attention_mask),
        "dec_attn": attention_loss(student_out.decoder_attentions, teacher_out.decoder_attentions, dec_map,
                                   decoder_mask, decoder_mask),
        "cross_attn": attention_loss(student_out.cross_attentions, teacher_out.cross_attentions, dec_map,
                                     decoder_mask, attention_mask),
    }


def test_full_depth_copy_equals_teacher():
    teacher = tiny_pair()
    student = copy_student(teacher, [0, 1, 2, 3], [0, 1, 2, 3])
    for (name, a), b in zip(teacher.state_dict().items(), student.state_dict().values()):
        assert torch.equal(a, b), name
    assert student.lm_head.weight is student.model.shared.weight  # still tied
    input_ids, attention_mask, labels = batch_with_padding()
    decoder_mask = labels != -100
    t, s = forward(teacher, input_ids, attention_mask, labels), forward(student, input_ids, attention_mask, labels)
    for name, value in all_losses(s, t, attention_mask, decoder_mask, [0, 1, 2, 3], [0, 1, 2, 3]).items():
        assert value.item() == 0.0, name
    loyalty = Loyalty()
    loyalty.update(s.logits, t.logits, decoder_mask)
    assert loyalty.compute()["label_loyalty"] == 1.0
    assert loyalty.compute()["prob_loyalty"] == pytest.approx(1.0, abs=1e-3)


def test_shallow_copy_takes_the_mapped_layers_and_generates_with_cache():
    teacher = tiny_pair()
    student = copy_student(teacher, [0, 3], [3])
    assert student.config.encoder_layers == 2 and student.config.decoder_layers == 1
    assert torch.equal(student.model.encoder.layers[1].fc1.weight, teacher.model.encoder.layers[3].fc1.weight)
    assert torch.equal(student.model.decoder.layers[0].fc1.weight, teacher.model.decoder.layers[3].fc1.weight)
    assert student.model.decoder.layers[0].self_attn.layer_idx == 0
    assert len(teacher.model.decoder.layers) == 4  # the teacher is untouched
    input_ids = torch.tensor([[0, 10, 11, 12, 2]])
    with_cache = student.generate(input_ids, max_length=8, num_beams=1, do_sample=False, use_cache=True)
    without = student.generate(input_ids, max_length=8, num_beams=1, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)


def test_losses_between_different_models_are_positive_and_ignore_padding():
    teacher, other = tiny_pair(0), tiny_pair(1)
    input_ids, attention_mask, labels = batch_with_padding()
    decoder_mask = labels != -100
    t, s = forward(teacher, input_ids, attention_mask, labels), forward(other, input_ids, attention_mask, labels)
    losses = all_losses(s, t, attention_mask, decoder_mask, [0, 1, 2, 3], [0, 1, 2, 3])
    for name, value in losses.items():
        assert value.item() > 0, name

    # Scribble over every padded position of the student's outputs: no loss may move.
    def scribble(tensors, mask):
        out = []
        for x in tensors:
            x = x.clone()
            x[~mask.bool()] = 1e3
            out.append(x)
        return tuple(out)

    s.logits[~decoder_mask] = 1e3
    s.encoder_hidden_states = scribble(s.encoder_hidden_states, attention_mask)
    s.decoder_hidden_states = scribble(s.decoder_hidden_states, decoder_mask)

    def scribble_attention(maps, query_mask, key_mask):
        out = []
        for a in maps:
            a = a.clone()
            a[(~query_mask.bool())[:, None, :, None].expand_as(a)] = 1e3
            a[(~key_mask.bool())[:, None, None, :].expand_as(a)] = 1e3
            out.append(a)
        return tuple(out)

    s.encoder_attentions = scribble_attention(s.encoder_attentions, attention_mask, attention_mask)
    s.decoder_attentions = scribble_attention(s.decoder_attentions, decoder_mask, decoder_mask)
    s.cross_attentions = scribble_attention(s.cross_attentions, decoder_mask, attention_mask)
    scribbled = all_losses(s, t, attention_mask, decoder_mask, [0, 1, 2, 3], [0, 1, 2, 3])
    for name in losses:
        assert scribbled[name].item() == pytest.approx(losses[name].item(), rel=1e-6), name


def test_attention_loss_refuses_sdpa_models():
    config = build_config("micro", vocab_size=120, dropout=0.0)
    model = BartForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()
    input_ids, attention_mask, labels = batch_with_padding()
    out = forward(model, input_ids, attention_mask, labels)
    with pytest.raises(ValueError, match="eager"):
        attention_loss(out.encoder_attentions, out.encoder_attentions, [0, 1], attention_mask, attention_mask)


def test_loyalty_functions():
    teacher = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]]])
    same_top = torch.tensor([[[5.0, 1.0, 1.0], [0.0, 1.0, 0.5]]])
    assert label_agreement(same_top, teacher).tolist() == [[1.0, 1.0]]
    assert probability_loyalty(teacher, teacher).flatten().tolist() == pytest.approx([1.0, 1.0], abs=1e-3)
    far = torch.tensor([[[-50.0, 50.0, -50.0], [50.0, -50.0, -50.0]]])
    near_one_hot_teacher = teacher * 50
    assert probability_loyalty(far, near_one_hot_teacher).max() < 0.01
