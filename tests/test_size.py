"""Size accounting and `python -m dq_lightning size`."""

import re

import pytest
import torch
from torch import nn
from transformers import BartForConditionalGeneration

from dq_lightning.__main__ import main as dq_main
from dq_lightning.models.presets import build_config
from dq_lightning.quant import QuantConfig, prepare
from dq_lightning.size import MIB, model_size
from dq_lightning.distill.recipe import recipe_quant_config


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = dq_main(["size", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def compression(out: str, column: int = 0) -> float:
    line = next(line for line in out.splitlines() if line.startswith("compression"))
    return float(re.findall(r"([\d.]+)x", line)[column])


@pytest.mark.parametrize("encoder,decoder,paper_ratio", [(6, 3, 16.5), (1, 1, 27.7)])
def test_cli_reproduces_the_paper_headline_ratios_for_bart_base(capsys, encoder, decoder, paper_ratio):
    code, out, err = run_cli(capsys, "--model-preset", "bart-base", "--w-bits", "2", "--e-bits", "2", "--a-bits",
                             "8", "--encoder-layers", str(encoder), "--decoder-layers", str(decoder))
    assert code == 0, err
    assert f"{paper_ratio}x" in out
    assert compression(out, 0) == paper_ratio
    assert compression(out, 1) < paper_ratio  # strict: scales, FP32 biases and the logits bias cost more


@pytest.mark.parametrize("encoder,decoder,paper_ratio", [(6, 3, 16.5), (1, 1, 27.7)])
def test_model_size_paper_convention_matches_the_paper(encoder, decoder, paper_ratio):
    report = model_size(build_config("bart-base"), "2-2-8", encoder_layers=encoder, decoder_layers=decoder)
    assert report.compression == pytest.approx(paper_ratio, abs=0.1)


def unique_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def test_fp32_teacher_counts_the_tied_embedding_once_and_compresses_1x():
    config = build_config("bart-base")
    report = model_size(config, "32-32-32")
    with torch.device("meta"):
        model = BartForConditionalGeneration(config)
    assert report.teacher_params == report.params == unique_parameters(model)
    assert report.size_mb == pytest.approx(unique_parameters(model) * 4 / MIB)
    assert report.compression == 1.0


def test_strict_convention_adds_scales_fp32_biases_and_buffers():
    config = build_config("micro", vocab_size=300)
    torch.manual_seed(0)
    model = BartForConditionalGeneration(config)
    project = recipe_quant_config("dq_lightning", "2-2-8")  # one scale per row everywhere
    paper = model_size(config, project, convention="paper")
    strict = model_size(config, project, convention="strict")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not model.lm_head]
    rows = sum(m.out_features for m in linears)
    biases = sum(m.bias.numel() for m in linears)
    vocab = model.model.shared.num_embeddings
    extra_bits = biases * (32 - 2) + rows * 32 + vocab * 32 + model.final_logits_bias.numel() * 32
    assert strict.size_bits - paper.size_bits == extra_bits
    assert strict.teacher_bits - paper.teacher_bits == model.final_logits_bias.numel() * 32
    official = model_size(config, "2-2-8", convention="strict")  # one scale per Linear, one per embedding row
    assert strict.size_bits - official.size_bits == (rows - len(linears)) * 32
    per_tensor = model_size(config, QuantConfig.from_notation("2-2-8", embedding_granularity="tensor"),
                            convention="strict")
    assert official.size_bits - per_tensor.size_bits == (vocab - 1) * 32


def test_size_of_a_prepared_student_uses_its_config_and_an_explicit_teacher():
    teacher_config = build_config("micro", vocab_size=300)
    student = BartForConditionalGeneration(build_config("micro", vocab_size=300, decoder_layers=1))
    prepare(student, recipe_quant_config("dq_lightning", "2-2-8", weight_method="lsq"))
    from_model = model_size(student, teacher=teacher_config)
    from_config = model_size(teacher_config, "2-2-8", decoder_layers=1)
    assert from_model.notation == "2-2-8"
    assert from_model.size_bits == from_config.size_bits  # LSQ steps are not counted as weights
    assert from_model.teacher_bits == from_config.teacher_bits
    assert (from_model.encoder_layers, from_model.decoder_layers) == (2, 1)


def test_cli_reads_a_local_model_directory(capsys, tmp_path):
    build_config("micro", vocab_size=300).save_pretrained(tmp_path)
    code, out, err = run_cli(capsys, "--model", str(tmp_path), "--bits", "8-8-8", "--convention", "paper")
    assert code == 0, err
    expected = model_size(build_config("micro", vocab_size=300), "8-8-8")
    assert f"{expected.compression:.1f}x" in out and "strict" not in out.split("\n\n")[1]


@pytest.mark.parametrize("argv,message", [
    (["--model-preset", "bart-base", "--w-bits", "5"], "--w-bits 5 is not supported"),
    (["--model-preset", "bart-base", "--encoder-layers", "7"], "--encoder-layers 7 must be between 1 and"),
    (["--model-preset", "nope"], "unknown model preset 'nope'"),
    (["--model", "/nonexistent/dir"], "--model /nonexistent/dir: no config.json"),
])
def test_cli_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("argv,message", [
    (["--bits", "2-2-8"], "one of the arguments --model-preset --model is required"),
    (["--model-preset", "bart-base", "--bits", "2-2"], "argument --bits"),
    (["--model-preset", "bart-base", "--bits", "2-2-8", "--w-bits", "2"], "not allowed with"),
    (["--model-preset", "bart-base", "--w-bits", "two"], "argument --w-bits"),
])
def test_cli_argument_errors_name_the_flag(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        dq_main(["size", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
