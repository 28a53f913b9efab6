"""The elastic DQ supernet (dq_lightning.supernet, DQSupernetModule) on the micro teacher (4+4 layers, d_model 32,
2 heads, FFN 64): its sub-networks are exactly the students `DQStudentModule` would train, extraction gives
those students bit for bit, and the fit resumes exactly."""

from __future__ import annotations

import inspect
import json
import shutil

import lightning.pytorch as pl
import pytest
import torch

from dq_lightning.errors import UserError
from dq_lightning.export.checkpoint import load_student
from dq_lightning.modules.supernet import DQSupernetModule
from dq_lightning.quant.quantizers import embedding_quantizer_for, weight_quantizer_for
from dq_lightning.quant.modules import QuantEmbedding, QuantLinear
from dq_lightning.supernet.grid import SubNet, parse_grid
from dq_lightning.supernet.sampling import Sampler, SamplingSettings, minimal_points
from tests.conftest import run_cli, tiny_xsum_datamodule

GRID = ["8-8-8 4-4", "2-2-8 4-2", "2-2-8 2-1", "32-32-32 4-4", "2-2-8 4-4 heads=1,ffn=32"]
QUICK_GENERATION = {"num_beams": 1, "max_length": 6, "min_length": 1}


def datamodule(shared_data, cache_dir, teacher_dir, **kwargs):
    return tiny_xsum_datamodule(shared_data, cache_dir, teacher_dir,
                                **{"max_train_samples": 16, **kwargs})


def trainer(tmp_path, **kwargs):
    settings = dict(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=str(tmp_path), limit_val_batches=1,
                    num_sanity_val_steps=0, enable_checkpointing=False)
    return pl.Trainer(**{**settings, **kwargs})


def supernet(teacher_dir, **kwargs) -> DQSupernetModule:
    settings = dict(teacher=str(teacher_dir), grid=GRID, lr=1e-2, generation=QUICK_GENERATION,
                    sampling={"policy": "sandwich", "random_subnets": 1})
    return DQSupernetModule(**{**settings, **kwargs})


@pytest.fixture(scope="module")
def trained(teacher_dir, shared_data, cache_dir, tmp_path_factory):
    """A supernet trained 3 steps (so its weights are no longer the teacher's), validated once."""
    root = tmp_path_factory.mktemp("supernet")
    module = supernet(teacher_dir)
    data = datamodule(shared_data, cache_dir, teacher_dir)
    fit = trainer(root, check_val_every_n_epoch=None, val_check_interval=3)
    fit.fit(module, datamodule=data)
    return module, data, root


def batch_of(data) -> dict[str, torch.Tensor]:
    data.setup("validate")
    return next(iter(data.val_dataloader()))


def test_grid_reads_points_and_sweep_files_and_refuses_impossible_points():
    teacher = (6, 6)
    grid = parse_grid(["2-2-8 6-3", "sweeps/xsum-tiny.yaml", "sweeps/xsum-width-tiny.yaml", "2-2-8 6-3"], teacher)
    names = [subnet.name for subnet in grid]
    assert names[0] == "2-2-8 6-3" and names.count("2-2-8 6-3") == 1  # each point once
    assert "8-8-8 6-6 heads=2,ffn=512" in names and not any(name.startswith("32-32-32") for name in names)
    assert len(grid) == 6 + 4  # xsum-tiny's quantized dq points; the width sweep's impt points (not rand)
    assert parse_grid(["32-32-32 6-3"], teacher)[0].name == "32-32-32 6-3"  # named, a full-precision point joins
    for text, message in [("2-2-8 7-3", "7 encoder layers; the teacher has 6"), ("2-2-9 6-3", "a_bits=9"),
                          ("2-2-8", "not a sub-network"), ("2-2-8 six-3", "depth 'six-3'")]:
        with pytest.raises(UserError, match=message):
            parse_grid([text], teacher)


def test_sandwich_draws_the_largest_and_smallest_and_depends_only_on_the_step():
    ordered = [SubNet("32-32-32", "6-6"), SubNet("8-8-8", "6-6"), SubNet("8-8-8", "6-3"), SubNet("2-2-8", "3-1")]
    sampler = Sampler(ordered, SamplingSettings(policy="sandwich", random_subnets=1, seed=3))
    draws = [sampler.sample(step) for step in range(40)]
    assert all(draw[0] == ordered[0] and draw[-1] == ordered[-1] and len(draw) == 3 for draw in draws)
    assert {draw[1] for draw in draws} == set(ordered[1:3])  # both middle points get drawn
    assert draws == [Sampler(ordered, sampler.settings).sample(step) for step in range(40)]  # a resumed fit's
    assert sampler.passes_per_step() == 3
    with pytest.raises(UserError, match="model.sampling.policy='sometimes'"):
        SamplingSettings(policy="sometimes")


def test_sandwich_minimal_trains_the_lower_bound_of_every_axis_each_step():
    """On a grid over bits, depth and width the smallest point by size is one corner; the minimal points (none
    other at or below on every axis) are each axis's lower bound, and sandwich_minimal trains all of them."""
    full = (4, 4, 512, 512)  # heads and ffn of both stacks (the axes function of this made-up grid)
    axes = {SubNet("8-8-8", "6-6"): (8, 8, 8, 6, 6, *full),
            SubNet("8-8-8", "6-3"): (8, 8, 8, 6, 3, *full),
            SubNet("2-2-8", "6-6"): (2, 2, 8, 6, 6, *full),
            SubNet("8-8-8", "3-1"): (8, 8, 8, 3, 1, *full),
            SubNet("2-2-8", "3-1"): (2, 2, 8, 3, 1, *full),
            SubNet("8-8-8", "6-6", "heads=2"): (8, 8, 8, 6, 6, 2, 2, 512, 512),
            SubNet("2-2-8", "6-6", "heads=2"): (2, 2, 8, 6, 6, 2, 2, 512, 512)}
    ordered = list(axes)  # already largest first by size in this made-up grid, the narrowest 2-bit point last
    sampler = Sampler(ordered, SamplingSettings(policy="sandwich_minimal", random_subnets=1, seed=0), axes.get)
    smallest = [SubNet("2-2-8", "3-1"), SubNet("2-2-8", "6-6", "heads=2")]
    assert sampler.smallest == smallest
    draws = [sampler.sample(step) for step in range(60)]
    assert all(draw[0] == ordered[0] and set(smallest) <= set(draw) and len(draw) == 4 for draw in draws)
    assert {point for draw in draws for point in draw} == set(ordered)  # the others are drawn at random
    assert sampler.passes_per_step() == 4
    # The plain sandwich keeps only the last point by size: the 2-bit 3-1 point is never sure to train.
    assert Sampler(ordered, SamplingSettings(policy="sandwich")).sample(0)[-1] == ordered[-1]
    # One axis only: the minimal point is the smallest, as in the plain sandwich; equal axes count once.
    chain = {SubNet("8-8-8", "6-6"): (8, 6), SubNet("4-4-8", "6-6"): (4, 6), SubNet("2-2-8", "6-6"): (2, 6),
             SubNet("2-2-8", "6-6", "heads=4"): (2, 6)}
    assert minimal_points(list(chain)[1:], chain.get) == [SubNet("2-2-8", "6-6")]


def test_nested_quantizers_are_the_ordinary_quantizers_of_each_width(trained):
    """Every point quantizes the supernet's latent weights (its slices of them) with the quantizer a separately
    trained student of its bits uses, its scale computed from those weights: bits nest by sharing latents."""
    module, _, _ = trained
    latent = module.latent()
    for subnet, network in module.subnetworks().items():
        if network.quant_config is None:
            continue
        tensors = network.tensors(latent)
        for name, child in network.skeleton.named_modules():
            if isinstance(child, (QuantLinear, QuantEmbedding)) and child.weight_quantizer is not None:
                weight = tensors[f"{name}.weight"] if f"{name}.weight" in tensors else \
                    tensors[network._canonical[f"{name}.weight"]]
                ordinary = (embedding_quantizer_for if isinstance(child, QuantEmbedding) else weight_quantizer_for)(
                    network.quant_config, weight)
                assert torch.equal(child.weight_quantizer(weight), ordinary(weight)), (subnet.name, name)


def test_extracted_students_compute_what_the_supernet_computed(trained, tmp_path):
    """Bit for bit: each grid point's logits in the supernet equal its extracted student's, loaded the way
    export loads any student checkpoint."""
    from dq_lightning.supernet.checkpoint import save_student_checkpoint

    module, data, _ = trained
    batch = batch_of(data)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  decoder_input_ids=module.model.prepare_decoder_input_ids_from_labels(labels=batch["labels"]))
    latent = module.latent()
    for subnet, network in module.subnetworks().items():
        network.set_training(False)
        with torch.no_grad():
            expected = network(latent, **inputs).logits
        path = save_student_checkpoint(module, subnet, tmp_path / f"{subnet.key}.ckpt", dict(data.hparams))
        student, checkpoint = load_student(path, quantized=False)
        assert checkpoint["supernet"]["subnet"] == subnet.name
        with torch.no_grad():
            got = student.model(**inputs).logits
        assert torch.equal(got, expected), subnet.name
        network.set_training(True)
        assert (len(student.encoder_map), len(student.decoder_map)) == subnet.layers
        assert (student.quant_config is None) == (not subnet.quantized)


def test_validation_scores_every_point_and_keeps_each_points_best_student(trained):
    module, _, root = trained
    best = json.loads((root / "subnets" / "best.json").read_text())
    assert set(best) == {SubNet.parse(text, (4, 4)).key for text in GRID}
    for key in best:
        assert (root / "subnets" / f"{key}.ckpt").is_file()
    assert module.subnet_passes == 3 * 3  # sandwich: the largest, the smallest and one more, 3 steps


@pytest.mark.parametrize("flags, message", [
    (["--bits", "4-4-8"], "--bits 4-4-8: the supernet trained no 4-4-8 sub-network; its bits: 2-2-8, 32-32-32, 8-8-8"),
    (["--bits", "2-2-8", "--depth", "5-2"], "--depth 5-2: 5 encoder layers; the teacher has 4"),
    (["--bits", "2-2-8", "--width", "heads=1,ffn=16"], "--width heads=1,ffn=16: the supernet trained no such width"),
    (["--bits", "2-2-9"], "--bits 2-2-9: a_bits=9 is not supported"),
])
def test_extract_refuses_a_point_the_supernet_cannot_give_in_one_line(flags, message, trained, tmp_path):
    module, _, root = trained
    checkpoint = root / "supernet.ckpt"
    if not checkpoint.exists():
        trainer(root).strategy.connect(module)
        torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                    "module_class": "dq_lightning.modules.supernet.DQSupernetModule",
                    "supernet": {"grid": [s.name for s in module.grid], "best": {}, "subnet_passes": 0,
                                 "width_scores": module.width_scores.to_state()}}, checkpoint)
    result = run_cli("extract", "--ckpt", str(checkpoint), *flags, "--out", str(tmp_path / "x.ckpt"))
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {message}"] or (len(errors) == 1 and message in errors[0]), result.stderr[-2000:]
    assert not (tmp_path / "x.ckpt").exists()


def test_extract_from_a_run_takes_the_best_its_subnets_folder_records(trained, tmp_path):
    """The fit's last.ckpt can be written before the last validation (same step): the extracted student and the
    metrics written beside it are the ones of subnets/, never the older record inside last.ckpt."""
    module, _, root = trained
    run = tmp_path / "run"
    shutil.copytree(root / "subnets", run / "subnets")
    recorded = json.loads((run / "subnets" / "best.json").read_text())
    key = next(iter(recorded))
    stale = {name: {**entry, "score": -1.0, "step": 0, "metrics": {"val/rougeL": -1.0}}
             for name, entry in recorded.items()}
    trainer(root).strategy.connect(module)
    (run / "checkpoints").mkdir()
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 3,
                "module_class": "dq_lightning.modules.supernet.DQSupernetModule",
                "supernet": {"grid": [s.name for s in module.grid], "best": stale, "subnet_passes": 9,
                             "width_scores": module.width_scores.to_state()}}, run / "checkpoints" / "last.ckpt")
    subnet = next(s for s in module.grid if s.key == key)
    bits, depth = subnet.name.split()[:2]
    width = ["--width", subnet.name.split()[2]] if len(subnet.name.split()) > 2 else []
    result = run_cli("extract", "--ckpt", str(run), "--bits", bits, "--depth", depth, *width,
                     "--out", str(tmp_path / "x.ckpt"), "--fit-metrics", str(tmp_path / "fit_metrics.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    written = json.loads((tmp_path / "fit_metrics.json").read_text())
    assert written["best"] == recorded[key]["score"] and written["metrics"]["step"] == recorded[key]["step"]
    assert (tmp_path / "x.ckpt").read_bytes() == (run / "subnets" / f"{key}.ckpt").read_bytes()


def test_a_supernet_refuses_settings_it_cannot_share(teacher_dir):
    with pytest.raises(UserError, match="model.quant_settings.act_method=lsq"):
        supernet(teacher_dir, quant_settings={"act_method": "lsq"})
    with pytest.raises(UserError, match="model.select_by=task needs model.evaluation.generate_on_validation"):
        supernet(teacher_dir, evaluation={"generate_on_validation": False})


@pytest.mark.slow  # three supernet fits, one killed mid-epoch: `make test-slow`
@pytest.mark.timeout(1200)
def test_killed_supernet_fit_resumes_exactly(tmp_path, shared_data, cache_dir, teacher_dir):
    """The draws of sub-networks follow the step, the width scores travel in the checkpoint, the data position
    and RNG states are the student's: losses after the resume are an uninterrupted fit's."""
    import yaml

    from dq_lightning.config_files import read_composed
    from tests.conftest import PROJECT_ROOT
    from tests.test_reliability import assert_resumed_exactly

    config = read_composed(PROJECT_ROOT / "experiments/xsum/supernet-tiny.yaml")
    # One file instead of the chain of bases: the dq base's student settings that the supernet's class does not
    # take (mode, bits, depth) go, as the parser drops them when a later base changes the class.
    accepted = inspect.signature(DQSupernetModule.__init__).parameters
    config["model"]["init_args"] = {key: value for key, value in config["model"]["init_args"].items()
                                    if key in accepted}
    config["model"]["init_args"].update(teacher=str(teacher_dir), grid=GRID, generation=QUICK_GENERATION)
    config["data"]["init_args"].update(data_dir=str(shared_data / "xsum"), cache_dir=str(cache_dir),
                                       max_train_samples=32, max_eval_samples=4, max_source_length=48,
                                       max_target_length=12, batch_size=4)
    config["trainer"].update(limit_val_batches=0, log_every_n_steps=1, enable_progress_bar=False, max_steps=14,
                             max_epochs=-1)
    config["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                   "init_args": {"save_dir": "${...default_root_dir}", "name": "csv"}}
    config["trainer"]["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                       "init_args": {"dirpath": "${....default_root_dir}/checkpoints", "save_top_k": 0,
                                                     "save_last": True, "every_n_train_steps": 3}}]
    path = tmp_path / "supernet.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    # 32 rows / batch 4 = 8 steps per epoch; checkpoints every 3 steps are never on an epoch boundary.
    assert_resumed_exactly(tmp_path, path, 14, 8)
    whole, resumed = (torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True)
                      for run in ("whole", "killed"))
    assert resumed["global_step"] == whole["global_step"] > 0
    # sandwich with one random point: three sub-network passes a step, counted across the kill
    assert resumed["supernet"]["subnet_passes"] == whole["supernet"]["subnet_passes"] == 3 * whole["global_step"]
    assert torch.equal(whole["supernet"]["width_scores"]["hidden"], resumed["supernet"]["width_scores"]["hidden"])


def test_a_student_starts_from_an_extracted_point_and_refuses_another_point(trained, tmp_path):
    """--model.init_from: the short fine-tune of an extracted student starts from exactly its weights."""
    from dq_lightning.modules.student import DQStudentModule
    from dq_lightning.supernet.checkpoint import save_student_checkpoint

    module, data, _ = trained
    subnet = SubNet.parse("2-2-8 4-4 heads=1,ffn=32", (4, 4))
    path = save_student_checkpoint(module, subnet, tmp_path / "point.ckpt", dict(data.hparams))
    extracted, _ = load_student(path)
    student = DQStudentModule(teacher=module.hparams.teacher, bits="2-2-8", depth="4-4", width="heads=1,ffn=32",
                              init_from=str(path))
    assert student.factory.kept.equals(extracted.factory.kept)  # the thinner student's units, not scored again
    latent = {key: value for key, value in extracted.model.state_dict().items()}
    for key, value in student.model.state_dict().items():
        assert torch.equal(value, latent[key]), key
    assert student.run_summary()["source"] == "supernet+finetune"
    with pytest.raises(UserError, match="--model.init_from .*: it holds a student of bits 2-2-8, this one is of bits 8-8-8"):
        DQStudentModule(teacher=module.hparams.teacher, bits="8-8-8", depth="4-4", width="heads=1,ffn=32",
                        init_from=str(path))


@pytest.mark.slow  # a supernet fit, two trained points and four tests through the CLI: `make test-slow`
@pytest.mark.timeout(1800)
def test_make_supernet_flow_extracts_tests_and_reports_every_point_beside_the_trained_ones(
        tmp_path, teacher_dir, shared_data, cache_dir):
    """What `make supernet` runs: a supernet fit, then `sweep --from-supernet`, whose report sets every point
    beside the same point trained on its own, paired over the test examples, with both fits' costs."""
    import csv
    import sys

    import yaml

    runs = tmp_path / "runs"
    data = [f"--data.data_dir={shared_data / 'xsum'}", f"--data.cache_dir={cache_dir}", "--data.max_train_samples=16",
            "--data.max_eval_samples=4", "--data.max_source_length=48",
            "--data.max_target_length=12", "--data.batch_size=4", "--trainer.enable_progress_bar=false"]
    supernet_run = runs / "xsum" / "supernet-tiny"
    fit = run_cli("fit", "--config", "experiments/xsum/supernet-tiny.yaml", f"--model.teacher={teacher_dir}",
                  "--model.grid=[8-8-8 4-2, 2-2-8 4-2]", "--model.generation={num_beams: 1, max_length: 6}",
                  "--trainer.max_epochs=2", "--trainer.check_val_every_n_epoch=1", *data,
                  f"--trainer.default_root_dir={supernet_run}", env={"WANDB_MODE": "offline"})
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert sorted(p.name for p in (supernet_run / "subnets").glob("*.ckpt")) == ["2-2-8_4-2.ckpt", "8-8-8_4-2.ckpt"]

    command = ["${env}", "python", "-m", "dq_lightning", "fit", "--config", "experiments/xsum/dq-tiny.yaml",
               f"--model.teacher={teacher_dir}", *data[1:], "--trainer.max_epochs=2",
               "--model.generation={num_beams: 1, max_length: 6}", "${args}"]
    sweep_file = tmp_path / "grid.yaml"
    sweep_file.write_text(yaml.safe_dump({"method": "grid", "metric": {"name": "val/rougeL", "goal": "maximize"},
                                          "parameters": {"model.bits": {"values": ["8-8-8", "2-2-8"]},
                                                         "model.depth": {"value": "4-2"}},
                                          "command": command}, sort_keys=False))
    sweep = [sys.executable, "-m", "dq_lightning", "sweep", "--task", "xsum", "--sweep-file", str(sweep_file),
             "--runs", str(runs), "--data-dir", str(shared_data / "xsum")]
    for extra in ([], ["--from-supernet", str(supernet_run)]):
        result = run_cli(*sweep[3:], *extra, env={"WANDB_MODE": "offline"}, timeout=1500)
        assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = runs / "xsum" / "sweep"
    for point in ("8-8-8_4-2", "2-2-8_4-2"):
        assert (sweep_dir / "supernet" / point / "test_metrics.json").is_file()
    rows = list(csv.DictReader(open(sweep_dir / "results.csv")))
    sources = sorted((row["source"], row["bits"]) for row in rows if row["run_id"] != "teacher")
    assert sources == [("supernet", "2-2-8"), ("supernet", "8-8-8"), ("trained", "2-2-8"), ("trained", "8-8-8")]
    report = (sweep_dir / "report.md").read_text()
    assert "Supernet vs separately trained" in report and "| 2-2-8 4-2 |" in report
    assert "What the supernet cost" in report and "| supernet / separate |" in report


def test_kendall_tau_of_the_map_ranking_benchmark():
    from tests.conftest import load_benchmark

    ranking = load_benchmark("supernet_map_ranking")
    assert ranking.kendall_tau_b([1, 2, 3, 4, 5], [1, 2, 3, 5, 4]) == pytest.approx(0.8)  # 9 agree, 1 disagrees
    assert ranking.kendall_tau_b([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert ranking.kendall_tau_b([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / 3 ** 0.5 / 2 ** 0.5)  # a tie in x
    assert ranking.parse_map("0,2,5/1=0.387") == ((0, 2, 5), (1,), 0.387)
