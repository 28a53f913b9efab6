"""Runtime exports (`export --format onnx|ctranslate2`, `predict --runtime ...`): the trained quantizers as ONNX
nodes, the exported codes as the runtimes' int8 weights, generations equal to the fake-quantized student's where
the runtime expresses its quantizers, mBART's languages, and bad input refused with one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from dq_lightning.errors import UserError
from dq_lightning.export import export_student, load_packed
from dq_lightning.export.deploy import DEPLOY_MANIFEST, export_runtime
from dq_lightning.export.deploy_source import read_source
from dq_lightning.export.onnx_graph import Builder, BartGraphs, FLOAT
from dq_lightning.export.onnx_runtime import load_onnx_model
from dq_lightning.modules.student import DQStudentModule
from dq_lightning.quant import prepare
from dq_lightning.quant.quantizers import AsymMinMaxQuantizer, LSQQuantizer, MinMaxQuantizer
from tests.conftest import PROJECT_ROOT, load_benchmark, run_cli
from tests.test_export import GENERATION, _inputs, _save_untrained


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def students(teacher_dir, shared_data, tmp_path_factory):
    """{name: packed export} of untrained students covering the quantizers: dq-bart at 2-2-8 (ternary per-tensor
    weights, attention operands quantized, full-precision-trained head) and 8-8-8, dq_lightning at 2-2-8 (per-row
    weights, quantized head input), and 4-4-8 with LSQ activations and asymmetric attention probabilities."""
    root = tmp_path_factory.mktemp("deploy_students")
    settings = {"2-2-8": dict(bits="2-2-8", depth="4-2"), "8-8-8": dict(bits="8-8-8", depth="4-2"),
                "2-2-8 dq_lightning": dict(bits="2-2-8", depth="4-2", recipe="dq_lightning"),
                "4-4-8 lsq": dict(bits="4-4-8", depth="2-1",
                                  quant_settings={"act_method": "lsq", "attention_quant": "asym_probs"})}
    exports = {}
    for name, kwargs in settings.items():
        slug = name.replace(" ", "_")
        module = DQStudentModule(teacher=str(teacher_dir), generation=GENERATION, **kwargs)
        if name == "4-4-8 lsq":  # LSQ steps are set from the first tensors quantized, as at a fit's first step
            prepare(module.model, module.quant_config)
            with torch.no_grad():
                module.model(**_inputs(shared_data, teacher_dir, count=4), decoder_input_ids=torch.ones(4, 3).long())
        checkpoint = _save_untrained(module, root / f"{slug}.ckpt")
        export_student(checkpoint, root / slug)
        exports[name] = root / slug
    return exports


def _run_graph(builder: Builder, feeds: dict):
    session = ort_session_from_model(builder.model())
    return session.run(None, feeds)


def ort_session_from_model(model):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


# -- the quantizers as ONNX nodes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("quantizer", [MinMaxQuantizer(8, "tensor", 2.5), MinMaxQuantizer(8, "row", None),
                                       MinMaxQuantizer(4, "tensor", 0.7), LSQQuantizer(8, "tensor"),
                                       AsymMinMaxQuantizer(8, "tensor", 2.5), AsymMinMaxQuantizer(4, "row", None)],
                         ids=lambda q: f"{q.method}-{q.bits}-{q.granularity}-{q.clip}")
def test_onnx_quantizer_equals_the_trained_quantizer_bit_for_bit(quantizer):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 17, 40, generator=generator) * 1.5
    x[0, 0, :4] = torch.tensor([4.0, -4.0, 0.5, -0.5])  # beyond the clips, and values on a rounding tie
    with torch.no_grad():
        expected = quantizer.inference(x)  # LSQ initialises its step from the first tensor it sees
    graphs = BartGraphs.__new__(BartGraphs)
    graphs.g = builder = Builder("quantizer")
    q = graphs.quantize(builder.input("x", FLOAT, list(x.shape)), quantizer)
    builder.output(graphs.dequantized(q), "y", FLOAT, list(x.shape))
    if q.integer:
        builder.output(q.codes, "codes", 2, list(x.shape))  # uint8: code + 128
    outputs = _run_graph(builder, {"x": x.numpy()})
    assert np.array_equal(outputs[0], expected.numpy())  # the same float operations: equal, not close
    if q.integer:
        assert quantizer.method in ("minmax", "lsq")
        with torch.no_grad():
            codes = quantizer.codes(x, quantizer.qparams(x))
        assert np.array_equal(outputs[1].astype(np.int16) - 128, codes.to(torch.int16).numpy())


# -- ONNX Runtime ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_exports(students, teacher_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    exports = {name: root / name.replace(" ", "_") for name in [*students, "teacher"]}
    for name, out in exports.items():
        export_runtime("onnx", out, model_dir=str(students.get(name, teacher_dir)))
    return exports


def test_onnx_initializers_are_the_exported_codes(students, onnx_exports):
    source = read_source(str(students["2-2-8"]))
    decoder = onnx.load(str(onnx_exports["2-2-8"] / "decoder.onnx"))  # external data from weights.bin
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in decoder.graph.initializer}
    for name in ("model.decoder.layers.0.fc1", "model.decoder.layers.1.self_attn.k_proj", "model.shared"):
        codes, scale = source.codes[f"{name}.weight"]
        assert initializers[f"{name}.codes"].dtype == np.int8
        assert np.array_equal(initializers[f"{name}.codes"], codes.numpy())
        assert np.array_equal(initializers[f"{name}.scale"], scale.numpy())
    assert set(np.unique(initializers["model.decoder.layers.0.fc1.codes"])) <= {-1, 0, 1}  # ternary, as exported
    op_types = {node.op_type for node in decoder.graph.node}
    assert {"MatMulIntegerToFloat", "MatMulInteger", "Round"} <= op_types  # Linear inputs, attention products
    # The token embedding is stored once, in weights.bin, for the encoder and the decoder.
    places = []
    for graph in ("encoder", "decoder"):
        model = onnx.load(str(onnx_exports["2-2-8"] / f"{graph}.onnx"), load_external_data=False)
        (tensor,) = [t for t in model.graph.initializer if t.name == "model.shared.codes"]
        places.append({entry.key: entry.value for entry in tensor.external_data})
    assert places[0] == places[1] and places[0]["location"] == "weights.bin"


@pytest.mark.parametrize("name", ["2-2-8", "8-8-8", "2-2-8 dq_lightning", "teacher"])
def test_onnx_runtime_generates_the_fake_quantized_students_tokens(name, students, onnx_exports, teacher_dir,
                                                                   shared_data):
    """Where ONNX expresses every trained quantizer, greedy and beam outputs are the PyTorch path's (which is
    the fake-quantized student's, tests/test_export.py)."""
    from dq_lightning.models.loading import load_pretrained

    reference = load_packed(students[name]) if name != "teacher" else \
        load_pretrained(str(teacher_dir), flag="--model").eval()
    runtime = load_onnx_model(onnx_exports[name], threads=1)
    batch = _inputs(shared_data, teacher_dir, count=8)
    with torch.no_grad():
        for settings in ({"num_beams": 1}, {"num_beams": 2, "no_repeat_ngram_size": 2}):
            expected = reference.generate(**batch, **settings, max_length=12, min_length=2)
            actual = runtime.generate(**batch, **settings, max_length=12, min_length=2)
            assert torch.equal(expected, actual), settings


def test_onnx_runtime_with_lsq_and_asymmetric_attention_stays_close(students, onnx_exports, teacher_dir,
                                                                     shared_data):
    """LSQ and asymmetric quantizers are reproduced too, but a 4-bit grid turns float rounding differences
    upstream (LayerNorm, GELU, sums in another order) into a whole step now and then."""
    reference = load_packed(students["4-4-8 lsq"])
    runtime = load_onnx_model(onnx_exports["4-4-8 lsq"], threads=1)
    batch = _inputs(shared_data, teacher_dir, count=8)
    with torch.no_grad():
        expected = reference.get_encoder()(**batch).last_hidden_state
        actual = runtime.get_encoder()(**batch).last_hidden_state
        assert (expected - actual).abs().mean() < 1e-3 * expected.abs().mean()
        assert (expected - actual).abs().mean() > 0  # not exact: this is the case where it need not be
        same = [torch.equal(a, b) for a, b in zip(reference.generate(**batch, num_beams=1, max_length=12),
                                                  runtime.generate(**batch, num_beams=1, max_length=12))]
    assert sum(same) >= 7


# -- CTranslate2 ---------------------------------------------------------------------------------------------------
def test_ctranslate2_weights_are_the_exported_codes_with_its_per_row_scales(students):
    from dq_lightning.export.ct2 import _loader_class

    source = read_source(str(students["2-2-8"]))
    spec = _loader_class(source)()(source.model, source.tokenizer)
    fused = spec.decoder.layer[0].self_attention.linear[0]
    parts = [source.codes[f"model.decoder.layers.0.self_attn.{p}_proj.weight"] for p in ("q", "k", "v")]
    assert np.array_equal(np.asarray(fused.weight), torch.cat([codes for codes, _ in parts]).numpy())
    scales = np.concatenate([np.full(codes.shape[0], 1 / float(scale), np.float32) for codes, scale in parts])
    assert np.allclose(np.asarray(fused.weight_scale), scales, rtol=1e-7)
    codes, scale = source.codes["model.shared.weight"]
    assert np.array_equal(np.asarray(spec.encoder.embeddings[0].weight), codes.numpy())
    assert np.array_equal(np.asarray(spec.decoder.projection.weight), codes.numpy())  # the tied head
    row_scale = scale.reshape(-1).numpy()
    assert (row_scale == 0).any()  # the padding row of a ternary embedding: all codes zero
    expected = np.where(row_scale > 0, 1 / np.where(row_scale > 0, row_scale, 1), 1).astype(np.float32)
    assert np.allclose(np.asarray(spec.decoder.projection.weight_scale), expected, rtol=1e-7)


def _without_activation_quantizers(model):
    for module in model.modules():
        module._forward_pre_hooks.clear()
        quantizer = getattr(module, "attention_input_quantizer", None)
        if quantizer is not None:
            quantizer.enabled = False
    return model


@pytest.mark.parametrize("name", ["2-2-8", "teacher"])
def test_ctranslate2_float32_computes_with_the_exported_weights(name, students, teacher_dir, shared_data,
                                                               tmp_path):
    """With compute_type float32 CTranslate2 quantizes no activation: its outputs are the PyTorch model's with
    the same (dequantized) weights and the activation quantizers taken out, which checks every weight's place."""
    from dq_lightning.export.ct2 import Ct2Seq2Seq
    from dq_lightning.models.loading import load_pretrained
    from dq_lightning.models.tokenizer import load_tokenizer

    directory = students.get(name, teacher_dir)
    export_runtime("ctranslate2", tmp_path / "ct2", model_dir=str(directory))
    reference = _without_activation_quantizers(load_packed(directory)) if name != "teacher" else \
        load_pretrained(str(teacher_dir), flag="--model").eval()
    runtime = Ct2Seq2Seq(tmp_path / "ct2", load_tokenizer(str(tmp_path / "ct2")), threads=1, compute_type="float32")
    batch = _inputs(shared_data, teacher_dir, count=8)
    special = set(runtime.tokenizer.all_special_ids)
    # transformers' lengths count the decoder start and end on a forced </s>; CTranslate2 counts generated
    # tokens and allows none as the first; unset lengths are transformers' defaults (ct2_options).
    for settings in ({"num_beams": 1, "max_length": 12, "min_length": 2},
                     {"num_beams": 2, "max_length": 12, "min_length": 5, "no_repeat_ngram_size": 2},
                     {"num_beams": 1}):
        generation = reference.generation_config.__class__.from_dict(
            {**reference.generation_config.to_dict(), "max_length": None, "min_length": None, **settings})
        reference.generation_config = generation  # transformers fills unset settings from the model's own
        with torch.no_grad():
            expected = reference.generate(**batch)
        actual = runtime.generate(batch["input_ids"], batch["attention_mask"], generation)
        expected = [[t for t in row.tolist() if t not in special] for row in expected]
        assert [[t for t in row if t not in special] for row in actual] == expected, settings


# -- mBART -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mbart(shared_data, cache_dir, tmp_path_factory):
    """(teacher directory, packed 2-2-8 student) of a micro mBART en-ro model with the language codes as tokens."""
    from dq_lightning.data.datamodule import WMT16EnRoDataModule
    from dq_lightning.models.loading import load_or_build_model

    root = tmp_path_factory.mktemp("mbart")
    data = WMT16EnRoDataModule(data_dir=str(shared_data / "wmt16_en_ro"), vocab_size=500, max_train_samples=200,
                               max_source_length=24, max_target_length=24, cache_dir=str(cache_dir))
    tokenizer = data.build_tokenizer()
    torch.manual_seed(0)
    teacher = root / "teacher"
    load_or_build_model("micro-mbart", tokenizer, dropout=0.0).save_pretrained(teacher)
    tokenizer.save_pretrained(str(teacher))
    (teacher / "dq_lightning.json").write_text(json.dumps({"task": "wmt16_en_ro", "max_source_length": 24}))
    module = DQStudentModule(teacher=str(teacher), bits="2-2-8", depth="2-1", generation={"num_beams": 2,
                                                                                        "max_length": 10})
    export_student(_save_untrained(module, root / "student.ckpt"), root / "packed")
    return teacher, root / "packed"


def test_mbart_runtimes_start_at_the_target_code_and_match_pytorch(mbart, tmp_path):
    teacher, packed = mbart
    texts = ["The house is big.", "", "We went to the market on Monday and bought bread."]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    outputs = {}
    for fmt in ("onnx", "ctranslate2"):
        export_runtime(fmt, tmp_path / fmt, model_dir=str(packed))
    for name, args in {"torch": ["--model", str(packed)], "onnx": ["--model", str(tmp_path / "onnx")],
                       "ctranslate2-float32": ["--model", str(tmp_path / "ctranslate2"), "--compute-type",
                                               "float32"]}.items():
        done = run_cli("predict", *args, "--input", str(tmp_path / "in.txt"), "--no-progress")
        assert done.returncode == 0, done.stderr
        outputs[name] = done.stdout
    assert outputs["torch"].count("\n") == 3 and outputs["torch"].splitlines()[1] == ""
    assert outputs["onnx"] == outputs["torch"]  # every quantizer of the dq-bart recipe expressed in ONNX
    ct2_config = json.loads((tmp_path / "ctranslate2" / "ctranslate2" / "config.json").read_text())
    assert ct2_config["decoder_start_token"] == "ro_RO"
    manifest = json.loads((tmp_path / "onnx" / DEPLOY_MANIFEST).read_text())
    assert (manifest["task"]["source_lang"], manifest["task"]["target_lang"]) == ("en_XX", "ro_RO")


def test_an_mbart_model_without_its_language_codes_is_refused(mbart, tmp_path):
    teacher, _ = mbart
    bare = tmp_path / "bare"
    shutil.copytree(teacher, bare)
    (bare / "dq_lightning.json").unlink()
    done = run_cli("export", "--format", "onnx", "--model", str(bare), "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: --model {bare}: an mBART model needs its")
    assert not (tmp_path / "out").exists()
    export_runtime("ctranslate2", tmp_path / "with-task", model_dir=str(bare), task="wmt16_en_ro")
    assert json.loads((tmp_path / "with-task" / "ctranslate2" / "config.json").read_text())[
        "decoder_start_token"] == "ro_RO"


# -- command line and bad input --------------------------------------------------------------------------------
def test_cli_export_and_predict_in_every_runtime(students, shared_data, tmp_path):
    rows = (shared_data / "xsum" / "test.jsonl").open()
    texts = [" ".join(json.loads(line)["document"].split()) for line in rows][:3]
    (tmp_path / "in.txt").write_text(texts[0] + "\n\n" + texts[1] + "\n" + texts[2] + "\n")
    for fmt in ("onnx", "ctranslate2"):
        done = run_cli("export", "--format", fmt, "--model", str(students["8-8-8"]), "--out", str(tmp_path / fmt))
        assert done.returncode == 0, done.stderr
        assert f"wrote {tmp_path / fmt}: {fmt}" in done.stdout
    outputs = {}
    for runtime, directory in (("torch", students["8-8-8"]), ("int8", students["8-8-8"]),
                               ("onnx", tmp_path / "onnx"), ("ctranslate2", tmp_path / "ctranslate2")):
        done = run_cli("predict", "--model", str(directory), "--runtime", runtime, "--input",
                       str(tmp_path / "in.txt"), "--no-progress", "--threads", "1")
        assert done.returncode == 0, (runtime, done.stderr)
        lines = done.stdout.split("\n")
        assert len(lines) == 5 and lines[1] == "" and lines[-1] == "", runtime  # one line per input line
        outputs[runtime] = done.stdout
    assert outputs["onnx"] == outputs["torch"]


def test_output_directory_holding_other_files_is_refused_and_left_alone(students, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    done = run_cli("export", "--format", "ctranslate2", "--model", str(students["2-2-8"]), "--out", str(out))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: --out {out}: exists and is not an earlier")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    # An earlier export of the same format is replaced; a user's file beside it stays.
    export_runtime("onnx", tmp_path / "onnx", model_dir=str(students["2-2-8"]))
    (tmp_path / "onnx" / "notes.txt").write_text("mine")
    export_runtime("onnx", tmp_path / "onnx", model_dir=str(students["8-8-8"]))
    assert (tmp_path / "onnx" / "notes.txt").read_text() == "mine"
    assert json.loads((tmp_path / "onnx" / DEPLOY_MANIFEST).read_text())["notation"] == "8-8-8"
    with pytest.raises(UserError, match="not an earlier --format ctranslate2 export"):
        export_runtime("ctranslate2", tmp_path / "onnx", model_dir=str(students["8-8-8"]))


def test_a_checkpoint_that_is_not_a_student_is_refused(teacher_dir, tmp_path):
    torch.save({"state_dict": {}, "hyper_parameters": {"model": str(teacher_dir), "lr": 1e-4}}, tmp_path / "t.ckpt")
    for fmt in ("onnx", "ctranslate2"):
        done = run_cli("export", "--format", fmt, "--ckpt", str(tmp_path / "t.ckpt"), "--out", str(tmp_path / fmt))
        assert done.returncode == 2
        assert done.stderr.strip().splitlines() == [
            f"error: --ckpt {tmp_path / 't.ckpt'}: not a DQ student checkpoint (it looks like a TeacherModule "
            f"checkpoint (model={teacher_dir})); export packs the checkpoint of a DQStudentModule run (python -m "
            "dq_lightning fit --config experiments/<task>/dq-*.yaml)"]
        assert not (tmp_path / fmt).exists()


@pytest.mark.parametrize("package", ["onnxruntime", "ctranslate2"])
def test_a_runtime_that_is_not_installed_is_one_error_line(package, students, tmp_path):
    """The package is hidden by a stand-in whose import fails (as on a machine without it); a fresh interpreter."""
    stub = tmp_path / "stub" / package
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text(f"raise ImportError('No module named {package}')\n")
    fmt = "onnx" if package == "onnxruntime" else "ctranslate2"
    env = {"PYTHONPATH": str(tmp_path / "stub")}
    done = run_cli("export", "--format", fmt, "--model", str(students["2-2-8"]), "--out", str(tmp_path / "out"),
                   env=env)
    assert done.returncode == 2 and not (tmp_path / "out").exists()
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: --format {fmt}: ")
    assert "is not installed" in done.stderr
    done = run_cli("predict", "--model", str(students["2-2-8"]), "--runtime", fmt, "--input", "-", env=env)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: --runtime {fmt}: ")
    assert "is not installed" in done.stderr.strip().splitlines()[-1]


def test_runtime_and_directory_must_agree_and_files_are_verified(students, tmp_path):
    from dq_lightning.export.predict import load_model

    export_runtime("onnx", tmp_path / "onnx", model_dir=str(students["2-2-8"]))
    with pytest.raises(UserError, match="is a --format onnx export; use --runtime onnx"):
        load_model(str(tmp_path / "onnx"), False, None, runtime="ctranslate2")
    with pytest.raises(UserError, match="is not a --format onnx export"):
        load_model(str(students["2-2-8"]), False, None, runtime="onnx")
    with pytest.raises(UserError, match="only --runtime ctranslate2 takes a compute type"):
        load_model(str(tmp_path / "onnx"), False, None, compute_type="int8")
    weights = tmp_path / "onnx" / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[100] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="file weights.bin is altered"):
        load_model(str(tmp_path / "onnx"), False, None)


@pytest.mark.slow  # every runtime loaded, timed and probed for memory in fresh processes: about 2 minutes
@pytest.mark.timeout(900)
def test_deploy_benchmark_runs_every_runtime_and_scores_trained_models(teacher_dir, shared_data, tmp_path):
    """benchmarks/deploy.py end to end on micro models, as with trained ones (--teacher/--ckpt): timings,
    sizes, memory and quality rows for every model and runtime."""
    module = DQStudentModule(teacher=str(teacher_dir), bits="2-2-8", depth="4-2", generation=GENERATION)
    checkpoint = _save_untrained(module, tmp_path / "student.ckpt")
    done = subprocess.run([sys.executable, str(PROJECT_ROOT / "benchmarks" / "deploy.py"), "--teacher",
                           str(teacher_dir), "--ckpt", str(checkpoint), "--data",
                           str(shared_data / "xsum" / "test.jsonl"), "--examples", "2", "--repeats", "1",
                           "--source-length", "48", "--new-tokens", "4", "--quality-examples", "8",
                           "--quality-beams", "1", "--float64-reference", "--work",
                           str(tmp_path / "work"), "--out", str(tmp_path / "results.json")],
                          capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    runtimes = {"teacher": {"torch", "onnx", "ctranslate2", "ctranslate2-int8"},
                "student 2-2-8 #0": {"torch", "int8", "onnx", "ctranslate2", "ctranslate2-float32"}}
    for batch in (1, 8):
        timed = {(row["model"], row["runtime"]) for row in results["latency"] if row["batch"] == batch}
        assert timed == {(model, runtime) for model, names in runtimes.items() for runtime in names}
    assert set(results["memory"]) == {f"{m} / {r}" for m, names in runtimes.items() for r in names}
    assert all(row["peak_mib"] > row["baseline_mib"] for row in results["memory"].values())
    sizes = results["size_bytes"]
    assert sizes["student 2-2-8 #0 / int8"] < sizes["student 2-2-8 #0 / onnx"] < sizes["teacher / onnx"]
    quality = {(row["model"], row["runtime"]): row for row in results["quality"]}
    for expressed in [("student 2-2-8 #0", "torch"), ("student 2-2-8 #0", "onnx"),  # every quantizer expressed
                      ("teacher", "ctranslate2")]:  # float32, the same decoding
        assert quality[expressed]["identical_to_torch"] == quality[expressed]["token_agreement"] == 1.0
    assert results["settings"]["quality_beams"] == 1
    assert {runtime for model, runtime in quality if runtime == "torch-float64"} == {"torch-float64"}
    assert {model for model, runtime in quality if runtime == "torch-float64"} == set(runtimes)
    assert "Test quality with the task's decoding settings, 1 beam(s)" in done.stdout


def test_token_agreement_counts_positions_over_the_longer_output_of_each_pair():
    agreement = load_benchmark("deploy").token_agreement
    # 3 of 3, then 1 of 4 (one token differs, the longer output has two the other lacks): 4 of 7
    assert agreement([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 6, 7, 8]]) == 4 / 7
    assert agreement([[1], []], [[2], []]) == 0.0
    assert agreement([], []) == 1.0


def test_a_tbt_student_is_refused_by_the_onnx_export_before_anything_is_written(teacher_dir, shared_data, tmp_path):
    """The tbt recipe's elastic learned-step activations have no ONNX form: one error line naming --format, no
    directory left behind (rather than a graph of a different model)."""
    module = DQStudentModule(teacher=str(teacher_dir), generation=GENERATION, recipe="tbt", bits="2-2-4", depth="2-1")
    prepare(module.model, module.quant_config)
    with torch.no_grad():  # the learned steps are set from the first tensors quantized, as at a fit's first step
        module.model(**_inputs(shared_data, teacher_dir, count=4), decoder_input_ids=torch.ones(4, 3).long())
    export_student(_save_untrained(module, tmp_path / "tbt.ckpt"), tmp_path / "packed")
    done = run_cli("export", "--format", "onnx", "--model", str(tmp_path / "packed"), "--out", str(tmp_path / "onnx"))
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --format onnx:") and "elastic" in last, done.stderr
    assert not (tmp_path / "onnx").exists()
