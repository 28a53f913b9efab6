"""Every shipped config is a test case: it parses, and every class and argument in it exists."""

from pathlib import Path

import pytest

from dq_lightning.__main__ import main
from dq_lightning.config_files import with_bases, expand_bases, read_composed
from dq_lightning.errors import UserError
from tests.conftest import PROJECT_ROOT

BASES = sorted((PROJECT_ROOT / "experiments" / "base").glob("*.yaml"))
# The bases are tested through the configs built on them (a base alone is not a run).
CONFIGS = sorted(path for path in (PROJECT_ROOT / "experiments").glob("*/*.yaml") if path not in BASES)


def test_every_task_has_tiny_and_paper_configs():
    tasks = {path.parent.name for path in CONFIGS}
    assert tasks >= {"demo", "xsum", "cnn_dailymail", "eli5", "wmt16_en_ro"}
    for task in tasks:
        for stage in ("teacher-tiny", "teacher-paper", "dq-tiny", "dq-paper"):
            assert (PROJECT_ROOT / "experiments" / task / f"{stage}.yaml").exists(), (task, stage)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_parses(config: Path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: dq_lightning." in printed
    assert f"runs/{config.parent.name}/" in printed  # interpolated run paths resolved
    assert "${" not in printed


def test_conda_environment_installs_the_makefiles_torch():
    import re

    import yaml

    makefile_torch = re.search(r"^TORCH \?= (\S+)", (PROJECT_ROOT / "Makefile").read_text(), re.MULTILINE).group(1)
    environment = yaml.safe_load((PROJECT_ROOT / "environment.yml").read_text())
    pip = next(entry["pip"] for entry in environment["dependencies"] if isinstance(entry, dict))
    assert makefile_torch in pip
    assert pip.index(makefile_torch) < pip.index("-e .[dev]")


def test_every_base_is_used_by_a_shipped_config():
    used = {path.resolve() for config in CONFIGS for path in with_bases(config)}
    assert set(path.resolve() for path in BASES) <= used, set(BASES) - used


@pytest.mark.parametrize("task, monitor", [("xsum", "val/rougeL"), ("wmt16_en_ro", "val/bleu")])
def test_a_shipped_config_is_its_bases_then_itself_with_the_task_metric_monitored(task, monitor):
    from dq_lightning.sweep.check_cli import CheckCLI

    config = PROJECT_ROOT / "experiments" / task / "dq-tiny.yaml"
    expanded = expand_bases(["fit", "--config", str(config), "--trainer.max_epochs=1"])
    base = PROJECT_ROOT / "experiments" / "base"
    assert expanded == ["fit", "--config", str(base / "run.yaml"), "--config", str(base / "tiny.yaml"),
                        "--config", str(base / "dq-tiny.yaml"), "--config", str(config), "--trainer.max_epochs=1"]
    cli = CheckCLI.build_once(instantiate=False)
    cli.parse_arguments(cli.parser, ["fit", "--config", str(config)])
    parsed = cli.config["fit"]
    assert parsed["trainer"]["accelerator"] == "cpu" and parsed["seed_everything"] == 0  # from the bases
    assert parsed["trainer"]["default_root_dir"] == f"runs/{task}/dq-tiny"  # its own
    assert parsed["trainer"]["logger"]["init_args"]["save_dir"] == f"runs/{task}/dq-tiny"  # interpolated after
    monitors = [callback["init_args"].get("monitor") for callback in parsed["trainer"]["callbacks"]]
    assert monitors == [None, monitor, monitor]
    assert parsed["base"] is None  # what a run saves is complete


def test_a_config_overrides_its_base_and_composition_errors_name_the_file(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "common.yaml").write_text("trainer:\n  max_epochs: 3\n  check_val_every_n_epoch: 5\n")
    own = tmp_path / "own.yaml"
    own.write_text("base: [shared/common.yaml]\ntrainer:\n  max_epochs: 7\n")
    assert read_composed(own) == {"trainer": {"max_epochs": 7, "check_val_every_n_epoch": 5}}
    (tmp_path / "missing.yaml").write_text("base: [nowhere.yaml]\n")
    (tmp_path / "a.yaml").write_text("base: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    (tmp_path / "typed.yaml").write_text("base: {x: 1}\n")
    for name, fragment in [("missing.yaml", "nowhere.yaml is not a file"), ("a.yaml", "in a circle"),
                           ("typed.yaml", "give a list of config files")]:
        with pytest.raises(UserError, match=fragment) as error:
            expand_bases(["fit", "--config", str(tmp_path / name)])
        assert "base:" in str(error.value)
    with pytest.raises(UserError, match="--base: a key of config files"):
        expand_bases(["fit", "--base=x.yaml"])


def test_a_saved_run_config_names_no_base(tmp_path, monkeypatch):
    """The saved config.yaml is complete: fitting from it again gives the same parsed settings."""
    from dq_lightning.sweep.check_cli import CheckCLI

    cli = CheckCLI.build_once(instantiate=False)
    cli.parse_arguments(cli.parser, ["fit", "--config", str(PROJECT_ROOT / "experiments/xsum/dq-tiny.yaml")])
    saved = tmp_path / "config.yaml"
    saved.write_text(cli._subcommand_parsers["fit"].dump(cli.config["fit"]))
    assert "../base" not in saved.read_text()
    again = CheckCLI.build_once(instantiate=False)
    again.parse_arguments(again.parser, ["fit", "--config", str(saved)])
    first, second = cli.config["fit"].as_dict(), again.config["fit"].as_dict()
    assert second.pop("config") and first.pop("config", None) is None  # only which file was read differs
    assert first == second


def test_task_monitor_replaces_the_task_metric_and_names_itself_when_wrong():
    from dq_lightning.sweep.check_cli import CheckCLI

    config = str(PROJECT_ROOT / "experiments/xsum/dq-tiny.yaml")
    cli = CheckCLI.build_once(instantiate=False)
    cli.parse_arguments(cli.parser, ["fit", "--config", config, "--task_monitor=val/rougeLsum"])
    monitors = [callback["init_args"].get("monitor") for callback in cli.config["fit"]["trainer"]["callbacks"]]
    assert monitors == [None, "val/rougeLsum", "val/rougeLsum"]
    with pytest.raises(UserError, match=r"--task_monitor='rougeLsum': give a validation metric"):
        CheckCLI.build_once(instantiate=False).parse_arguments(cli.parser, ["fit", "--config", config,
                                                                            "--task_monitor=rougeLsum"])
