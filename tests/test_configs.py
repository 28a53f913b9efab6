"""Every shipped config is a test case: it parses, and every class and argument in it exists."""

from pathlib import Path

import pytest

from dq_lightning.__main__ import main
from tests.conftest import PROJECT_ROOT

CONFIGS = sorted((PROJECT_ROOT / "experiments").glob("*/*.yaml"))


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
