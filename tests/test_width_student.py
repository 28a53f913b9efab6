"""Thinner DQ students end to end (issue 15): model.width in DQStudentModule, the objective at the teacher's
kept units, checkpoints, export and the size accounting, on the micro teacher (d_model 32, 2 heads, ffn 64)."""

import math
import struct
from types import SimpleNamespace

import pytest
import torch

import dq_lightning.distill.student as student_factory
from dq_lightning.distill.losses import attention_loss, hidden_states_loss
from dq_lightning.distill.objective import DQObjective, ObjectiveConfig
from dq_lightning.distill.width import Units
from dq_lightning.export import export_student, load_packed
from dq_lightning.export.checkpoint import load_student
from dq_lightning.export.manifest import WEIGHTS
from dq_lightning.modules.student import DQStudentModule
from dq_lightning.quant import is_prepared, use_deployed_head
from tests.conftest import run_cli
from tests.test_bad_input_data import ENV, QUICK, one_error
from tests.test_export import _inputs
from tests.test_student import QUICK_GENERATION, datamodule, trainer

THIN = dict(bits="2-2-8", depth="4-2", width="0.5", generation=QUICK_GENERATION, lr=1e-2)


def fitted(tmp_path, teacher_dir, shared_data, cache_dir, steps=2, **settings):
    module = DQStudentModule(teacher=str(teacher_dir), **{**THIN, **settings})
    fit = trainer(tmp_path, max_steps=steps, enable_checkpointing=True, limit_val_batches=0)
    fit.fit(module, datamodule=datamodule(shared_data, cache_dir, teacher_dir))
    return module, fit, next(tmp_path.rglob("*.ckpt"))


def optimized_numel(fit) -> int:
    return sum(p.numel() for group in fit.optimizers[0].param_groups for p in group["params"])


def numel(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights once


@pytest.fixture(scope="module")
def rand_run(teacher_dir, shared_data, cache_dir, tmp_path_factory):
    return fitted(tmp_path_factory.mktemp("rand"), teacher_dir, shared_data, cache_dir, shape={"width_method": "rand"})


@pytest.fixture(scope="module")
def impt_run(teacher_dir, shared_data, cache_dir, tmp_path_factory):
    return fitted(tmp_path_factory.mktemp("impt"), teacher_dir, shared_data, cache_dir, shape={"width_method": "impt"})


@pytest.mark.parametrize("mode", ["dq", "quant_only", "distill_only"])
def test_thinner_rand_student_trains_in_every_mode(mode, teacher_dir, shared_data, cache_dir, tmp_path):
    module, fit, checkpoint = fitted(tmp_path, teacher_dir, shared_data, cache_dir, mode=mode,
                                     shape={"width_method": "rand"})
    config = module.model.config
    assert (config.d_model, config.encoder_attention_heads, config.decoder_ffn_dim) == (16, 1, 32)
    assert optimized_numel(fit) == numel(module.factory.new_student())  # the thinner student's, nothing else
    terms = module.last_loss_terms
    assert set(terms) >= ({"task"} if mode == "quant_only" else {"task", "logits", "hidden", "attention"})
    assert all(math.isfinite(float(value)) for value in terms.values()), terms
    assert torch.equal(torch.load(checkpoint, weights_only=True)["width_kept"]["hidden"], module.factory.kept.hidden)


def test_impt_scores_in_configure_model_before_the_optimizer(impt_run):
    module, fit, _ = impt_run
    assert module.factory.width_scores is not None and module.model.config.d_model == 16
    assert optimized_numel(fit) == numel(module.factory.new_student())
    assert is_prepared(module.model)


def _validate(teacher_dir, shared_data, cache_dir, tmp_path, **settings):
    module = DQStudentModule(teacher=str(teacher_dir), generation=QUICK_GENERATION, **settings)
    return trainer(tmp_path).validate(module, datamodule=datamodule(shared_data, cache_dir, teacher_dir))[0]


@pytest.mark.parametrize("width", ["1", "heads=2,ffn=64,d_model=32"])
def test_full_width_gives_todays_losses_exactly(width, teacher_dir, shared_data, cache_dir, tmp_path):
    settings = dict(bits="2-2-8", depth="4-2")
    today = _validate(teacher_dir, shared_data, cache_dir, tmp_path / "none", **settings)
    full = _validate(teacher_dir, shared_data, cache_dir, tmp_path / "full", width=width, shape={"width_method": "rand"},
                     **settings)
    for key in ("val/loss_hidden", "val/loss_attention", "val/loss_final_encoder", "val/loss_logits",
                "val/size_mb", "val/size_mb_strict"):
        assert full[key] == today[key], key


def test_full_width_full_depth_full_precision_student_is_the_teacher(teacher_dir, shared_data, cache_dir,
                                                                    tmp_path):
    results = _validate(teacher_dir, shared_data, cache_dir, tmp_path, mode="distill_only", width="1",
                        shape={"width_method": "rand"})
    for term in ("logits", "hidden", "attention"):
        assert results[f"val/loss_{term}"] == 0.0, term
    assert results["val/label_loyalty"] == 1.0


def test_hidden_and_attention_losses_compare_the_teachers_kept_units():
    """Student layer i (copied from teacher layer map[i]) against the teacher's kept dimensions and the kept
    heads of layer map[i]: zero when the student's tensors are exactly those slices, not otherwise."""
    generator = torch.Generator().manual_seed(0)
    teacher_states = [torch.randn(2, 3, 8, generator=generator) for _ in range(4)]
    teacher_maps = [torch.rand(2, 4, 3, 3, generator=generator) for _ in range(3)]
    layer_map, dims, heads = [0, 2], torch.tensor([1, 4, 6]), [torch.tensor([0, 3]), torch.tensor([1, 2])]
    student_states = [teacher_states[t][..., dims] for t in (0, 1, 3)]
    student_maps = [teacher_maps[t][:, heads[s]] for s, t in enumerate(layer_map)]
    assert hidden_states_loss(student_states, teacher_states, layer_map, None, dims) == 0
    assert attention_loss(student_maps, teacher_maps, layer_map, None, None, heads) == 0
    mask = torch.ones(2, 3)
    assert attention_loss(student_maps, teacher_maps, layer_map, mask, mask, heads) == 0
    assert attention_loss(student_maps, teacher_maps, layer_map, None, None, heads[::-1]) > 0
    assert hidden_states_loss(student_states, teacher_states, layer_map, None, dims.flip(0)) > 0


def test_objective_takes_each_student_layers_heads_by_attention_path():
    """`Units.heads` is keyed by the layer-copied student's paths: layer i there is student layer i."""
    maps = [torch.rand(1, 2, 3, 3) for _ in range(4)]
    kept = Units(torch.arange(4), {f"model.{stack}.layers.{i}.{name}": torch.tensor([i % 2])
                                   for stack, name in (("encoder", "self_attn"), ("decoder", "self_attn"),
                                                       ("decoder", "encoder_attn")) for i in range(2)}, {})
    states = [torch.rand(1, 3, 8) for _ in range(5)]
    teacher = SimpleNamespace(logits=torch.zeros(1, 3, 5), encoder_hidden_states=states,
                              decoder_hidden_states=states, encoder_last_hidden_state=states[-1],
                              encoder_attentions=maps, decoder_attentions=maps, cross_attentions=maps)
    student_maps = [maps[t][:, [s % 2]] for s, t in enumerate([1, 3])]
    student_states = [state[..., :4] for state in (states[0], states[2], states[4])]
    student = SimpleNamespace(logits=torch.zeros(1, 3, 5), encoder_hidden_states=student_states,
                              decoder_hidden_states=student_states, encoder_last_hidden_state=student_states[-1],
                              encoder_attentions=student_maps, decoder_attentions=student_maps,
                              cross_attentions=student_maps)
    _, terms = DQObjective(ObjectiveConfig())(student, teacher, torch.zeros(1, 3, dtype=torch.long),
                                              torch.ones(1, 3), [1, 3], [1, 3], kept=kept)
    assert all(terms[name] == 0 for name in ("logits", "hidden", "attention", "final_encoder")), terms


def _reloaded(checkpoint):
    """The student as export reads it back (`load_student`: rebuilt from the hyper-parameters, then from the
    checkpoint's stored units), fake-quantized, in eval mode."""
    return load_student(checkpoint)[0].model


def test_checkpoint_of_a_thinner_student_reloads_the_same_student_without_scoring(impt_run, shared_data,
                                                                                teacher_dir, monkeypatch):
    module, _, checkpoint = impt_run
    monkeypatch.setattr(student_factory, "importance", lambda *args: pytest.fail("scored again"))
    reloaded = _reloaded(checkpoint)
    assert reloaded.config.d_model == 16
    stored = torch.load(checkpoint, weights_only=True)["width_kept"]
    assert Units.from_state(stored).equals(module.factory.kept)
    use_deployed_head(reloaded, True)
    batch = _inputs(shared_data, teacher_dir, count=3)
    # Converted when fit ended, with the deployed E-bit head: in eval the fake-quantized numbers of that head.
    trained = module.model.eval()
    with torch.no_grad():
        decoder_input_ids = torch.full((3, 4), trained.config.decoder_start_token_id)
        assert torch.allclose(reloaded(**batch, decoder_input_ids=decoder_input_ids).logits,
                              trained(**batch, decoder_input_ids=decoder_input_ids).logits, atol=1e-5)


def test_test_with_ckpt_path_uses_the_stored_units(impt_run, teacher_dir, shared_data, cache_dir, tmp_path,
                                                   monkeypatch):
    _, _, checkpoint = impt_run
    monkeypatch.setattr(student_factory, "importance", lambda *args: pytest.fail("scored again"))
    module = DQStudentModule(teacher=str(teacher_dir), **{**THIN, "shape": {"width_method": "impt"}})
    results = trainer(tmp_path, limit_test_batches=1).test(
        module, datamodule=datamodule(shared_data, cache_dir, teacher_dir), ckpt_path=str(checkpoint))[0]
    assert math.isfinite(results["test/loss"])
    stored = Units.from_state(torch.load(checkpoint, weights_only=True)["width_kept"])
    assert stored.equals(module.factory.kept) and module.model.config.d_model == 16


def test_export_of_a_thinner_student_loads_and_generates_the_fake_quantized_tokens(rand_run, shared_data,
                                                                                  teacher_dir, tmp_path):
    module, _, checkpoint = rand_run
    manifest = export_student(checkpoint, tmp_path / "packed")
    model = load_packed(tmp_path / "packed")
    assert model.config.d_model == 16 and model.config.encoder_ffn_dim == 32
    student = _reloaded(checkpoint)
    use_deployed_head(student, True)  # what export ships for a student trained with a full-precision head
    batch = _inputs(shared_data, teacher_dir)
    with torch.no_grad():
        for beams in (1, 2):
            assert torch.equal(student.generate(**batch, num_beams=beams, max_length=10, min_length=2),
                               model.generate(**batch, num_beams=beams, max_length=10, min_length=2)), beams
    # The size accounting counts the thinner student: within 5% of the packed weights (file minus header).
    header = struct.unpack("<Q", (tmp_path / "packed" / WEIGHTS).open("rb").read(8))[0]
    payload = manifest["size"]["weights_bytes"] - 8 - header
    accounted = module.size_metrics()["size_mb_strict"] * 2**20
    assert abs(payload - accounted) <= 0.05 * payload
    assert manifest["size"]["strict_bytes"] == pytest.approx(accounted)
    full = DQStudentModule(teacher=str(teacher_dir), bits="2-2-8", depth="4-2").size_metrics()
    assert module.size_metrics()["size_mb"] < 0.6 * full["size_mb"]


@pytest.mark.parametrize("width, message", [("heads=7", "larger than the teacher"),
                                            ("2", "the ratio must be in (0, 1]")])
def test_bad_width_is_one_error_line_naming_the_flag(width, message, teacher_dir, shared_data, cache_dir,
                                                     tmp_path):
    result = run_cli("fit", "--config", "experiments/xsum/dq-tiny.yaml", f"--data.cache_dir={cache_dir}",
                     f"--data.data_dir={shared_data / 'xsum'}", f"--trainer.default_root_dir={tmp_path / 'run'}",
                     f"--model.teacher={teacher_dir}", *QUICK, f"--model.width={width}", env=ENV)
    one_error(result, "model.width", message)


def test_projection_starts_as_the_kept_dimensions_and_trains_with_the_student(teacher_dir, shared_data, cache_dir,
                                                                             tmp_path):
    """width_hidden=projection: a Linear from the student's width to the teacher's, outside the student (not
    exported), started so that student dimension i lands on the teacher dimension it was extracted from, then
    optimized with the student; its checkpoint reloads and exports like any thinner student's."""
    module = DQStudentModule(teacher=str(teacher_dir), **THIN,
                             shape={"width_method": "rand", "width_hidden": "projection"})
    module._start_projection()
    kept = module.factory.kept.hidden
    states = torch.randn(2, 3, module.model.config.d_model)
    projected = module.hidden_projection(states)
    assert projected.shape[-1] == module.teacher.config.d_model
    assert torch.equal(projected[..., kept], states)
    dropped = [d for d in range(module.teacher.config.d_model) if d not in set(kept.tolist())]
    assert dropped and torch.count_nonzero(projected[..., dropped]) == 0
    # At the start, the hidden loss through the projection is the kept loss plus the teacher's dropped energy.
    teacher_states = [torch.randn(2, 3, module.teacher.config.d_model) for _ in range(2)]
    student_states = [t[..., kept] + 0.1 for t in teacher_states]
    through = hidden_states_loss(student_states, teacher_states, [0], None, project=module.hidden_projection)
    at_kept = hidden_states_loss(student_states, teacher_states, [0], None, kept)
    energy = sum(((t[..., dropped]) ** 2).sum(-1).mean() / module.teacher.config.d_model for t in teacher_states)
    width = module.teacher.config.d_model
    assert through.item() == pytest.approx(at_kept.item() * len(kept) / width + energy.item(), rel=1e-4)

    trained, fit, checkpoint = fitted(tmp_path, teacher_dir, shared_data, cache_dir, steps=3,
                                      shape={"width_method": "rand", "width_hidden": "projection"})
    assert any(p is trained.hidden_projection.weight for g in fit.optimizers[0].param_groups for p in g["params"])
    assert not torch.equal(trained.hidden_projection.weight, module.hidden_projection.weight)  # it learned
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert torch.equal(state["hidden_projection.weight"], trained.hidden_projection.weight.detach())
    manifest = export_student(checkpoint, tmp_path / "packed")
    assert not any("hidden_projection" in name for name in manifest["tensors"])
