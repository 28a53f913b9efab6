"""Packed export: bit packing, export -> load_packed reproducing the fake-quantized student token for token,
the int8 path, refusal of tampered directories and of non-student checkpoints, and the CLI."""

import json
import shutil
import struct
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
from transformers import BartForConditionalGeneration, GenerationConfig

from dq_lightning.data.datamodule import XSumDataModule
from dq_lightning.modules.student import DQStudentModule
from dq_lightning.errors import UserError
from dq_lightning.export import export_student, load_packed
from dq_lightning.export.manifest import MANIFEST, WEIGHTS
from dq_lightning.export.packing import code_range, pack, packed_numel, unpack
from dq_lightning.export.predict import load_model, routes_here, source_length
from dq_lightning.models.tokenizer import load_tokenizer
from dq_lightning.quant import prepare, use_deployed_head
from dq_lightning.quant.quantizers import LSQQuantizer, MinMaxQuantizer, TernaryQuantizer
from dq_lightning.modules.teacher import TeacherModule
from tests.conftest import PROJECT_ROOT, run_cli

GENERATION = {"num_beams": 2, "max_length": 10, "min_length": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


# -- packing ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("numel", [0, 1, 3, 5, 7, 9, 13, 1001])
def test_pack_unpack_round_trip_is_exact(bits, numel):
    low, high = code_range(bits)
    generator = torch.Generator().manual_seed(bits * 1000 + numel)
    codes = torch.randint(low, high + 1, (numel,), generator=generator)
    if bits == 1:  # one bit holds a sign: -1 or +1, no zero
        codes = torch.where(codes >= 0, 1, -1)
    if numel >= 2:
        codes[0], codes[1] = low, high  # both ends of the range
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    slack = 2 if bits in (2, 3, 4, 8) else 6  # the supported widths waste at most two bytes per tensor
    assert packed.numel() == packed_numel(numel, bits) <= -(-numel * bits // 8) + slack
    restored = unpack(packed, bits, numel)
    assert restored.dtype == torch.int8 and torch.equal(restored.long(), codes)


def test_packing_density_and_the_codes_of_real_quantizers():
    weight = torch.randn(7, 13)  # 91 values: not a multiple of 4 or 8
    cases = [(2, TernaryQuantizer("row"), {-1, 0, 1}), (3, MinMaxQuantizer(3, "row"), None),
             (4, MinMaxQuantizer(4, "tensor"), None), (8, MinMaxQuantizer(8, "row"), None),
             (2, LSQQuantizer(2, "row", weight=weight), None), (4, LSQQuantizer(4, "tensor", weight=weight), None)]
    for bits, quantizer, allowed in cases:
        codes = quantizer.codes(weight, quantizer.qparams(weight))
        if allowed is not None:
            assert set(codes.unique().tolist()) <= allowed
        packed = pack(codes, bits)
        assert torch.equal(unpack(packed, bits, codes.numel()).reshape(codes.shape).float(), codes), quantizer
    assert pack(torch.ones(91), 2).numel() == 23  # ternary: four per byte
    assert pack(torch.ones(91), 3).numel() == 36  # eight per three bytes
    assert pack(torch.ones(91), 4).numel() == 46
    assert pack(torch.ones(91), 8).numel() == 91
    assert pack(torch.ones(91), 1).numel() == 12  # binary: eight per byte


def test_packing_refuses_what_it_cannot_represent():
    with pytest.raises(ValueError, match="do not fit in 2 bits"):
        pack(torch.tensor([0, 2]), 2)
    with pytest.raises(ValueError, match="do not fit in 8 bits"):
        pack(torch.tensor([-129]), 8)
    with pytest.raises(ValueError, match="integer codes"):
        pack(torch.tensor([0.5]), 4)
    with pytest.raises(ValueError, match="cannot hold exactly 5 codes"):
        unpack(torch.zeros(3, dtype=torch.uint8), 2, 5)


# -- students -----------------------------------------------------------------------------------------------
def _datamodule(shared_data, cache_dir, teacher_dir):
    return XSumDataModule(data_dir=str(shared_data / "xsum"), tokenizer=str(teacher_dir), max_train_samples=8,
                          max_eval_samples=4, max_source_length=64, max_target_length=16, batch_size=4,
                          cache_dir=str(cache_dir))


def _save_untrained(module: DQStudentModule, path):
    """A checkpoint as Lightning lays it out, of a student prepared but not trained."""
    prepare(module.model, module.quant_config)
    state = {f"model.{key}": value for key, value in module.model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": dict(module.hparams), "global_step": 0}, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(teacher_dir, shared_data, cache_dir, tmp_path_factory):
    """{name: checkpoint path}: a 2-2-8 student fitted two steps with pl.Trainer, an untrained 8-8-8 one, an
    untrained 4-4-8 one with LSQ activations and quantized attention inputs, a recipe tbt student with binary
    weights and embedding and 4-bit elastic activations fitted two steps (its learned steps initialised and
    trained), and an untrained dq-bart 1-1-8 one (binary per tensor)."""
    root = tmp_path_factory.mktemp("students")
    fitted = {}
    for name, settings in (("2-2-8 fitted", dict(bits="2-2-8", depth="4-2")),
                           ("1-1-4 tbt fitted", dict(bits="1-1-4", depth="2-1", recipe="tbt"))):
        module = DQStudentModule(teacher=str(teacher_dir), lr=1e-2, generation=GENERATION, **settings)
        directory = root / name.replace(" ", "_")
        trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=str(directory), limit_val_batches=0,
                             num_sanity_val_steps=0)
        trainer.fit(module, datamodule=_datamodule(shared_data, cache_dir, teacher_dir))
        fitted[name] = next(directory.rglob("*.ckpt"))
    lsq = DQStudentModule(teacher=str(teacher_dir), bits="4-4-8", depth="2-1", generation=GENERATION,
                          quant_settings={"attention_quant": "asym_probs", "act_method": "lsq"})
    return {
        **fitted,
        "8-8-8": _save_untrained(DQStudentModule(teacher=str(teacher_dir), bits="8-8-8", depth="4-2",
                                                 generation=GENERATION), root / "888.ckpt"),
        "4-4-8 lsq attention": _save_untrained(lsq, root / "448.ckpt"),
        "1-1-8 dq-bart": _save_untrained(DQStudentModule(teacher=str(teacher_dir), bits="1-1-8", depth="2-2",
                                                         generation=GENERATION), root / "118.ckpt"),
    }


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    """{name: export directory} for every checkpoint."""
    root = tmp_path_factory.mktemp("exports")
    return {name: (export_student(path, root / name.replace(" ", "_")), root / name.replace(" ", "_"))[1]
            for name, path in checkpoints.items()}


def _fake_quantized_student(checkpoint_path):
    """The prepared student of a checkpoint, rebuilt here independently of the export code."""
    checkpoint = torch.load(checkpoint_path, weights_only=True, map_location="cpu")
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
    module = DQStudentModule(**hparams)
    prepare(module.model, module.quant_config)
    module.model.load_state_dict({k[len("model."):]: v for k, v in checkpoint["state_dict"].items()
                                  if k.startswith("model.")})
    use_deployed_head(module.model, True)  # what export ships for a student trained with a full-precision head
    return module.model.eval()


def _inputs(shared_data, teacher_dir, count=6):
    tokenizer = load_tokenizer(str(teacher_dir))
    texts = [json.loads(line)["document"] for line in (shared_data / "xsum" / "test.jsonl").open()][:count]
    return tokenizer(texts, truncation=True, max_length=48, padding=True, return_tensors="pt")


@pytest.mark.parametrize("name", ["2-2-8 fitted", "8-8-8", "4-4-8 lsq attention", "1-1-4 tbt fitted",
                                  "1-1-8 dq-bart"])
def test_exported_student_generates_the_fake_quantized_students_tokens(name, checkpoints, exported, shared_data,
                                                                      teacher_dir):
    student = _fake_quantized_student(checkpoints[name])
    model = load_packed(exported[name])
    assert type(model) is BartForConditionalGeneration
    assert model.lm_head.weight is model.model.shared.weight is model.model.encoder.embed_tokens.weight
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    batch = _inputs(shared_data, teacher_dir)
    with torch.no_grad():
        for settings in ({"num_beams": 1}, {"num_beams": 2}):
            expected = student.generate(**batch, **settings, max_length=10, min_length=2)
            actual = model.generate(**batch, **settings, max_length=10, min_length=2)
            assert torch.equal(expected, actual), settings
        assert torch.equal(student(**batch, decoder_input_ids=expected).logits,
                           model(**batch, decoder_input_ids=expected).logits)
    assert model.generation_config.num_beams == GENERATION["num_beams"]


def test_a_checkpoint_of_a_converted_student_exports_the_same_model(checkpoints, exported, shared_data,
                                                                    teacher_dir, tmp_path):
    """QuantizeOnForward converts the student when fit ends; a checkpoint saved after that holds int8 codes."""
    from dq_lightning.quant import convert

    checkpoint = torch.load(checkpoints["8-8-8"], weights_only=True, map_location="cpu")
    student = _fake_quantized_student(checkpoints["8-8-8"])
    converted = convert(_fake_quantized_student(checkpoints["8-8-8"]))
    checkpoint["state_dict"] = {f"model.{k}": v for k, v in converted.state_dict().items()}
    assert any(key.endswith(".packed.codes") for key in checkpoint["state_dict"])
    torch.save(checkpoint, tmp_path / "converted.ckpt")
    model = load_packed(export_student(tmp_path / "converted.ckpt", tmp_path / "out") and tmp_path / "out")
    batch = _inputs(shared_data, teacher_dir)
    with torch.no_grad():
        assert torch.equal(student.generate(**batch, num_beams=2, max_length=10),
                           model.generate(**batch, num_beams=2, max_length=10))


def test_export_is_packed_at_the_accounted_size(exported):
    manifest = json.loads((exported["2-2-8 fitted"] / MANIFEST).read_text())
    fc1 = manifest["weights"]["model.encoder.layers.0.fc1.weight"]
    assert (fc1["bits"], fc1["method"], fc1["shape"]) == (2, "ternary", [64, 32])
    assert manifest["tensors"][fc1["codes"]] ["shape"] == [64 * 32 // 4]  # four ternary codes per byte
    assert manifest["aliases"]["lm_head.weight"] == "model.shared.weight"
    # A dq-bart student trains with the full-precision head; the export ships (and says so) the E-bit one.
    assert manifest["recipe"] == "dq-bart" and manifest["lm_head"]["trained"] == "full_precision"
    assert manifest["lm_head"]["deployed"].startswith("tied token embedding at 2 bits")
    size = manifest["size"]
    header = struct.unpack("<Q", (exported["2-2-8 fitted"] / WEIGHTS).open("rb").read(8))[0]
    # Payload (file minus the safetensors header) within 1% of the strict accounting (at most 2 pad bytes per
    # tensor); the micro model's header is a large share of its tiny file, a real model's a negligible one.
    assert abs(size["weights_bytes"] - 8 - header - size["strict_bytes"]) <= 0.01 * size["strict_bytes"]
    eight = json.loads((exported["8-8-8"] / MANIFEST).read_text())
    assert eight["tensors"]["model.shared.weight.codes"]["dtype"] == "int8"


def test_a_one_bit_export_packs_eight_codes_a_byte_and_keeps_its_learned_steps(checkpoints, exported):
    directory = exported["1-1-4 tbt fitted"]
    manifest = json.loads((directory / MANIFEST).read_text())
    assert manifest["recipe"] == "tbt" and manifest["notation"] == "1-1-4"
    fc1 = manifest["weights"]["model.encoder.layers.0.fc1.weight"]
    assert (fc1["bits"], fc1["method"], fc1["shape"]) == (1, "binary", [64, 32])
    assert manifest["tensors"][fc1["codes"]]["shape"] == [64 * 32 // 8]
    shared = manifest["weights"]["model.shared.weight"]
    assert (shared["bits"], shared["method"]) == (1, "binary")
    size = manifest["size"]
    header = struct.unpack("<Q", (directory / WEIGHTS).open("rb").read(8))[0]
    assert abs(size["weights_bytes"] - 8 - header - size["strict_bytes"]) <= 0.01 * size["strict_bytes"]
    # Every quantized input keeps the step it learned: fc2's unsigned, the others signed; attention operands too.
    activation = manifest["activation_quantizers"]
    assert activation["model.encoder.layers.0.fc2"]["method"] == "elastic_unsigned"
    assert activation["model.encoder.layers.0.fc1"]["method"] == "elastic"
    trained = torch.load(checkpoints["1-1-4 tbt fitted"], weights_only=True, map_location="cpu")["state_dict"]
    stored = load_file(directory / WEIGHTS)
    for name in ("model.encoder.layers.0.fc2.input_quantizer.step",
                 "model.decoder.layers.0.encoder_attn.attention_input_quantizer.probs.step"):
        assert torch.equal(stored[name], trained[f"model.{name}"]) and stored[name].item() != 1.0
    model = load_packed(directory)
    assert model.model.encoder.layers[0].fc2.input_quantizer.step.item() == trained[
        "model.model.encoder.layers.0.fc2.input_quantizer.step"].item()


def test_int8_path_runs_a_one_bit_student_on_its_sign_codes(exported, shared_data, teacher_dir):
    int8 = load_packed(exported["1-1-4 tbt fitted"], int8=True)
    fc1 = int8.model.encoder.layers[0].fc1
    assert isinstance(fc1, DynamicInt8Linear)
    assert set(fc1.weight().int_repr().unique().tolist()) == {-1, 1}
    assert set(int8.model.shared.packed.codes.unique().tolist()) <= {-1, 1}
    with torch.no_grad():
        generated = int8.generate(**_inputs(shared_data, teacher_dir), num_beams=1, max_length=10)
    assert generated.shape[0] == 6


def test_a_fitted_student_loads_from_its_checkpoint_outside_a_trainer(checkpoints, teacher_dir, tmp_path):
    path = checkpoints["2-2-8 fitted"]
    with pytest.raises(UserError, match="model.teacher=.*records no task"):  # no DataModule, no task known
        DQStudentModule.load_from_checkpoint(path, map_location="cpu")
    teacher = shutil.copytree(teacher_dir, tmp_path / "teacher")
    (teacher / "dq_lightning.json").write_text(json.dumps({"task": "xsum"}))  # as a trained teacher records it
    module = DQStudentModule.load_from_checkpoint(path, map_location="cpu", teacher=str(teacher))
    saved = torch.load(path, weights_only=True, map_location="cpu")["state_dict"]
    loaded = module.state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in saved.items() if name in loaded)
    assert (module.quant_config.w_bits, len(module.model.model.decoder.layers)) == (2, 2)


def test_export_records_the_source_length_the_student_was_trained_with(exported):
    fitted = json.loads((exported["2-2-8 fitted"] / MANIFEST).read_text())
    assert fitted["task"]["max_source_length"] == 64  # its DataModule's
    model, _, task = load_model(str(exported["2-2-8 fitted"]), False, None)
    assert source_length(model, task, None) == 64 and source_length(model, task, 32) == 32
    # Saved without a DataModule, of a teacher that names no task: the model's positions bound the sources.
    untrained, _, task = load_model(str(exported["8-8-8"]), False, None)
    assert untrained.dq_export["task"] is None
    assert source_length(untrained, task, None) == untrained.config.max_position_embeddings


def test_int8_path_runs_quantized_linears_and_mostly_agrees(exported, shared_data, teacher_dir):
    fp32 = load_packed(exported["8-8-8"])
    int8 = load_packed(exported["8-8-8"], int8=True)
    assert isinstance(int8.lm_head, DynamicInt8Linear)
    assert isinstance(int8.model.decoder.layers[0].fc1, DynamicInt8Linear)
    assert int8.model.shared.packed.codes.dtype == torch.int8  # the embedding looks rows up in its codes
    assert int8.model.shared.packed is int8.model.encoder.embed_tokens.packed
    batch = _inputs(shared_data, teacher_dir)
    with torch.no_grad():
        generated = fp32.generate(**batch, num_beams=1, max_length=10)
        a = fp32(**batch, decoder_input_ids=generated).logits
        b = int8(**batch, decoder_input_ids=generated).logits
        # generate() must run the int8 modules too (not a cached fp32 path): greedy output teacher-forced back
        # through the int8 forward predicts each next generated token.
        config = int8.config  # plain greedy: the task's min_length / no-repeat rules would override argmax
        greedy = GenerationConfig(max_length=10, num_beams=1, do_sample=False, pad_token_id=config.pad_token_id,
                                  eos_token_id=config.eos_token_id, bos_token_id=config.bos_token_id,
                                  decoder_start_token_id=config.decoder_start_token_id)
        int8.generation_config = greedy  # replaced, not merged: none of the task's decoding rules applies
        int8_generated = int8.generate(**batch)
        forced = int8(**batch, decoder_input_ids=int8_generated).logits.argmax(-1)
    pad = int8.config.pad_token_id
    next_tokens, predicted = int8_generated[:, 1:], forced[:, :-1]
    assert torch.equal(predicted[next_tokens != pad], next_tokens[next_tokens != pad])
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    assert (a - b).abs().max() < 0.1 * a.abs().max()


# -- bad input ----------------------------------------------------------------------------------------------
def _tensor_offset(path, name):
    """Byte offset of a tensor's data in a safetensors file."""
    with open(path, "rb") as handle:
        length = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(length))
    return 8 + length + header[name]["data_offsets"][0]


@pytest.fixture
def export_copy(exported, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(exported["2-2-8 fitted"], copy)
    return copy


def test_altered_tensor_is_refused_naming_it(export_copy):
    name = "model.decoder.layers.1.fc2.weight.codes"
    offset = _tensor_offset(export_copy / WEIGHTS, name)
    data = bytearray((export_copy / WEIGHTS).read_bytes())
    data[offset] ^= 0x01
    (export_copy / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"tensor {name} in {WEIGHTS} is altered"):
        load_packed(export_copy)


def test_truncated_file_is_refused_naming_it(export_copy):
    data = (export_copy / WEIGHTS).read_bytes()
    (export_copy / WEIGHTS).write_bytes(data[: len(data) - 100])
    with pytest.raises(UserError, match=f"file {WEIGHTS} is truncated"):
        load_packed(export_copy)


@pytest.mark.parametrize("change", ["missing", "reshaped"])
def test_missing_or_reshaped_tensor_is_refused_naming_it(change, export_copy):
    name = "model.shared.weight.scale"  # one scale per token row in every recipe
    tensors = load_file(str(export_copy / WEIGHTS))
    rows = tensors[name].shape[0]
    if change == "missing":
        del tensors[name]
        message = f"tensor {name} is missing"
    else:
        tensors[name] = tensors[name].reshape(-1)
        message = f"tensor {name} in {WEIGHTS} is float32 \\[{rows}\\], the manifest records float32 \\[{rows}, 1\\]"
    save_file(tensors, str(export_copy / WEIGHTS))
    with pytest.raises(UserError, match=message):
        load_packed(export_copy)


def test_altered_or_missing_side_files_are_refused(export_copy):
    config = json.loads((export_copy / "config.json").read_text())
    config["decoder_layers"] = 1
    (export_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="file config.json is"):
        load_packed(export_copy)
    (export_copy / "config.json").unlink()
    with pytest.raises(UserError, match="file config.json is missing"):
        load_packed(export_copy)
    (export_copy / MANIFEST).unlink()
    with pytest.raises(UserError, match="not a packed export"):
        load_packed(export_copy)


def test_checkpoints_that_are_not_dq_students_are_refused(teacher_dir, tmp_path):
    teacher = TeacherModule(model="micro")
    model = BartForConditionalGeneration.from_pretrained(str(teacher_dir))
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": dict(teacher.hparams)}, tmp_path / "teacher.ckpt")
    with pytest.raises(UserError, match="not a DQ student checkpoint .*TeacherModule checkpoint"):
        export_student(tmp_path / "teacher.ckpt", tmp_path / "out")
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "dq_lightning.modules.teacher.TeacherModule",
                                                       "model": "micro"}}, tmp_path / "cli.ckpt")
    with pytest.raises(UserError, match="it holds a TeacherModule"):
        export_student(tmp_path / "cli.ckpt", tmp_path / "out")
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read it as a checkpoint"):
        export_student(tmp_path / "garbage.ckpt", tmp_path / "out")
    full_precision = DQStudentModule(teacher=str(teacher_dir), mode="distill_only")
    torch.save({"state_dict": {f"model.{k}": v for k, v in full_precision.model.state_dict().items()},
                "hyper_parameters": dict(full_precision.hparams)}, tmp_path / "fp.ckpt")
    with pytest.raises(UserError, match="not quantized; there is nothing to pack"):
        export_student(tmp_path / "fp.ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_predict_routing():
    assert routes_here(["--model", "."])
    assert routes_here(["--model=.", "--num-beams", "2"])
    assert routes_here(["--input", "-", "--model", "missing_dir"])
    assert not routes_here(["--config", "c.yaml", "--model", "."])
    assert not routes_here(["--model", "DQStudentModule", "--model.teacher", "x"])
    assert not routes_here([])


def test_cli_export_then_predict_from_stdin(checkpoints, shared_data, tmp_path):
    out = tmp_path / "packed"
    result = run_cli("export", "--ckpt", str(checkpoints["2-2-8 fitted"]), "--out", str(out),
                     env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "strict accounting" in result.stdout and (out / MANIFEST).exists()
    texts = [json.loads(line)["document"].replace("\n", " ") for line in
             (shared_data / "xsum" / "test.jsonl").open()][:3]
    stdin = "\n".join([texts[0], "", texts[1], texts[2]]) + "\n"
    result = subprocess.run([sys.executable, "-m", "dq_lightning", "predict", "--model", str(out), "--int8",
                             "--num-beams", "1", "--max-length", "8", "--batch-size", "2", "--threads", "1"],
                            input=stdin,
                            capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.split("\n")
    assert len(lines) == 5 and lines[1] == "" and lines[4] == ""  # one line per input, the empty one kept
    # A reader that stops early (`| head -n 1`): no traceback, the SIGPIPE status.
    predict = [sys.executable, "-m", "dq_lightning", "predict", "--model", str(out), "--num-beams", "1",
               "--max-length", "8", "--batch-size", "1", "--threads", "1", "--no-progress"]
    piped = subprocess.run(["bash", "-c", 'set -o pipefail; "$@" | head -n 1; echo "status ${PIPESTATUS[0]}" >&2',
                            "bash", *predict], input="\n".join(texts * 3) + "\n", capture_output=True, text=True,
                           cwd=PROJECT_ROOT, timeout=300)
    assert len(piped.stdout.split("\n")) == 2 and "Traceback" not in piped.stderr, piped.stderr[-2000:]
    assert "status 141" in piped.stderr, piped.stderr[-2000:]
    bad = run_cli("predict", "--model", str(tmp_path), "--input", "-")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --model") and "neither a packed export" in bad.stderr


# -- the manifest's own settings ------------------------------------------------------------------------------
def _edits(value, path=()):
    """(path, edited copy of `value`) for every field of a JSON value: each leaf changed, each key removed,
    a key added to each mapping and an item to each list."""
    if isinstance(value, dict):
        yield path + ("<added key>",), {**value, "added_by_test": 1}
        for key, item in value.items():
            yield path + (key, "<removed>"), {k: v for k, v in value.items() if k != key}
            for where, edited in _edits(item, path + (key,)):
                yield where, {**value, key: edited}
    elif isinstance(value, list):
        yield path + ("<added item>",), [*value, value[-1] if value else 0]
        for index, item in enumerate(value):
            for where, edited in _edits(item, path + (index,)):
                yield where, [*value[:index], edited, *value[index + 1:]]
    elif isinstance(value, bool):
        yield path, not value
    elif isinstance(value, (int, float)):
        yield path, value + 1 if value == value else 0.0
    elif isinstance(value, str):
        yield path, value + "x"
    else:  # None
        yield path, 0


@pytest.mark.parametrize("name", ["2-2-8 fitted", "4-4-8 lsq attention"])
def test_every_edited_field_of_the_manifest_is_refused(name, exported, tmp_path):
    """Not only the tensors and files: a manifest setting that changes the computation (an activation
    quantizer's clip, bits or method, the QuantConfig, the attention choice, the source length predict reads)
    loads as a different model unless the manifest's own content is checked. Every field is edited, one at a
    time, and each edit is refused; a field that changes nothing is refused alike (one rule, no list of
    fields to keep up to date)."""
    copy = tmp_path / "copy"
    shutil.copytree(exported[name], copy)
    original = json.loads((copy / MANIFEST).read_text())
    edits = list(_edits(original))
    assert len(edits) > 200 and any("activation_quantizers" in where for where, _ in edits)
    for where, edited in edits:
        (copy / MANIFEST).write_text(json.dumps(edited, indent=1))
        with pytest.raises(UserError) as refused:
            load_packed(copy)
        assert MANIFEST in str(refused.value) or "format version" in str(refused.value) \
            or "model class" in str(refused.value), where
    (copy / MANIFEST).write_text(json.dumps(original, sort_keys=True))  # another layout, the same content
    load_packed(copy)


def test_the_manifest_digest_is_what_stands_between_an_edited_setting_and_a_different_model(exported, tmp_path,
                                                                                          shared_data, teacher_dir):
    """The guard is needed: the same edit with the digest recomputed loads, and computes something else."""
    from dq_lightning.export.manifest import with_digest

    copy = tmp_path / "copy"
    shutil.copytree(exported["2-2-8 fitted"], copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    for entry in manifest["activation_quantizers"].values():
        entry["clip"] = 0.05  # every quantized Linear's input clipped hard
    (copy / MANIFEST).write_text(json.dumps(with_digest(manifest), indent=1))
    batch = _inputs(shared_data, teacher_dir, count=2)
    with torch.no_grad():
        edited = load_packed(copy)(**batch, decoder_input_ids=batch["input_ids"][:, :4]).logits
        kept = load_packed(exported["2-2-8 fitted"])(**batch, decoder_input_ids=batch["input_ids"][:, :4]).logits
    assert not torch.allclose(edited, kept)


def test_an_export_of_format_version_1_is_refused_with_what_to_do(export_copy):
    manifest = json.loads((export_copy / MANIFEST).read_text())
    manifest["version"] = 1
    manifest.pop("manifest_sha256")
    (export_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="version 1.*export the checkpoint again"):
        load_packed(export_copy)
