"""Checkpoints written before the student's settings were grouped keep loading with the settings they were trained
with: through LightningCLI's --ckpt_path, `load_from_checkpoint` and export's `load_student`."""

from __future__ import annotations

import json
import shutil

import lightning.pytorch as pl
import pytest
import torch

from dq_lightning.cli import CLI_OPTIONS, DQLightningCLI
from dq_lightning.compat import upgrade_student_hparams
from dq_lightning.export.checkpoint import load_student
from dq_lightning.modules.student import DQStudentModule

STUDENT = "dq_lightning.modules.student.DQStudentModule"


def old_hparams(teacher: str) -> dict:
    """The hyper-parameters DQStudentModule saved until the settings were grouped (copied from a checkpoint of
    commit 83c4f80, `DQStudentModule(bits="2-2-8", student_decoder_layers=1, hidden_weight=3.0,
    mask_padding=True, weight_granularity="row", quant_warmup_steps=5, weight_decay=0.02, eval_head="deployed",
    quant_settings={"act_clip": 2.0}, width="0.5", width_method="rand")`), as LightningCLI records them."""
    return {'teacher': teacher, 'mode': 'dq', 'recipe': 'dq-bart', 'w_bits': 2, 'e_bits': 2, 'a_bits': 8,
            'bits': '2-2-8', 'depth': None, 'student_encoder_layers': None, 'student_decoder_layers': 1,
            'layer_map': None, 'encoder_layer_map': None, 'decoder_layer_map': None, 'unsorted_layer_maps': False,
            'width': '0.5', 'width_method': 'rand', 'width_batches': 8, 'width_seed': 0, 'width_hidden': 'kept',
            'task_weight': 1.0, 'logits_weight': 1.0, 'hidden_weight': 3.0, 'attention_weight': 1.0,
            'final_encoder_weight': None, 'logits_loss': 'mse', 'temperature': 1.0, 'mask_padding': True,
            'attention_maps': None, 'weight_method': 'auto', 'weight_granularity': 'row', 'weight_clip': None,
            'quantize_lm_head': None, 'attention_quant': None,
            'quant_settings': {'embedding_method': None, 'act_method': None, 'embedding_granularity': None,
                               'act_granularity': None, 'act_clip': 2.0},
            'quant_warmup_steps': 5, 'eval_head': 'deployed', 'evaluate_teacher': False, 'lr': 3e-05,
            'weight_decay': 0.02, 'gradient_clip': None, 'warmup_ratio': 0.05, 'label_smoothing': 0.0,
            'generation': None, 'generate_on_validation': True, 'prediction_table_rows': 100,
            '_class_path': STUDENT}


def assert_trained_settings(module: DQStudentModule, teacher_layers: int) -> None:
    """What the old checkpoint's settings meant, read off the rebuilt module."""
    recipe = module.recipe
    assert (len(module.encoder_map), len(module.decoder_map)) == (teacher_layers, 1)
    assert module.quant_config.notation == "2-2-8"
    assert module.quant_config.weight_granularity == "row" and module.quant_config.act_clip == 2.0
    assert module.quant_config.weight_clip == 2.5  # unset in the old checkpoint: recipe dq-bart's
    assert recipe.objective.hidden_weight == 3.0 and recipe.objective.mask_padding is True
    assert recipe.objective.final_encoder_weight == 8.0  # dq-bart's
    assert recipe.quant_settings.warmup_steps == 5 and module.quantize.warmup_steps == 5
    assert recipe.optimizer.weight_decay == 0.02 and module.weight_decay == 0.02
    assert module.evaluation.eval_head == "deployed"
    assert module.factory.width.text == "0.5" and recipe.shape.width_method == "rand"


@pytest.fixture(scope="module")
def task_teacher(teacher_dir, tmp_path_factory):
    """The micro teacher as `make teacher` leaves one: recording its task, so that a student loads without a
    Trainer."""
    copy = tmp_path_factory.mktemp("teacher") / "hf"
    shutil.copytree(teacher_dir, copy)
    (copy / "dq_lightning.json").write_text(json.dumps({"task": "xsum"}))
    return copy


@pytest.fixture(scope="module")
def old_checkpoint(task_teacher, tmp_path_factory):
    """A student checkpoint whose hyper-parameters are in the old flat form, its weights a student's of that
    shape."""
    hparams = old_hparams(str(task_teacher))
    module = DQStudentModule(**{k: v for k, v in upgrade_student_hparams(hparams).items() if k != "_class_path"})
    path = tmp_path_factory.mktemp("old") / "old.ckpt"
    state = {f"model.{key}": value for key, value in module.model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": hparams, "module_class": STUDENT,
                "width_kept": module.factory.kept.to_state(), "pytorch-lightning_version": pl.__version__,
                "epoch": 0, "global_step": 0}, path)
    return path, module


def test_old_flat_settings_become_todays_groups(teacher_dir):
    upgraded = upgrade_student_hparams(old_hparams(str(teacher_dir)))
    assert upgraded["bits"] == "2-2-8" and upgraded["depth"] == "4-1"  # the teacher's 4 encoder layers
    assert upgraded["objective"]["hidden_weight"] == 3.0 and upgraded["shape"]["width_method"] == "rand"
    assert upgraded["quant_settings"] == {"weight_method": "auto", "weight_granularity": "row", "weight_clip": None,
                                          "quantize_lm_head": None, "attention_quant": None, "warmup_steps": 5,
                                          "embedding_method": None, "act_method": None,
                                          "embedding_granularity": None, "act_granularity": None, "act_clip": 2.0}
    assert not any(key in upgraded for key in ("w_bits", "student_decoder_layers", "task_weight", "weight_decay"))
    assert upgrade_student_hparams(upgraded) == upgraded  # today's hyper-parameters are left as they are


def test_export_rebuilds_an_old_checkpoint_with_its_settings(old_checkpoint):
    path, original = old_checkpoint
    module, _ = load_student(path)
    assert_trained_settings(module, teacher_layers=4)
    for (name, loaded), (_, saved) in zip(module.model.state_dict().items(), original.model.state_dict().items()):
        assert torch.equal(loaded, saved), name


def test_load_from_checkpoint_reads_an_old_checkpoint(old_checkpoint):
    path, _ = old_checkpoint
    assert_trained_settings(DQStudentModule.load_from_checkpoint(path, strict=False), teacher_layers=4)


class _ParsedOnly(DQLightningCLI):
    def before_instantiate_classes(self) -> None:
        raise _Parsed(self.config[self.config.subcommand]["model"]["init_args"])


class _Parsed(Exception):
    pass


def test_ckpt_path_of_an_old_checkpoint_parses_and_a_flag_overrides_one_setting_of_a_group(old_checkpoint):
    path, _ = old_checkpoint
    with pytest.raises(_Parsed) as parsed:
        _ParsedOnly(pl.LightningModule, pl.LightningDataModule, **CLI_OPTIONS, args=[
            "test", "--config", "experiments/xsum/dq-tiny.yaml", "--model.objective.task_weight=2",
            f"--ckpt_path={path}"])
    init_args = parsed.value.args[0]
    assert (init_args["bits"], init_args["depth"], init_args["width"]) == ("2-2-8", "4-1", "0.5")
    objective = init_args["objective"]
    assert objective["task_weight"] == 2  # given: the flag wins
    assert objective["hidden_weight"] == 3.0 and objective["mask_padding"] is True  # the checkpoint's
    assert init_args["quant_settings"]["warmup_steps"] == 5 and init_args["evaluation"]["eval_head"] == "deployed"
