import pytest

from dq_lightning.errors import UserError
from dq_lightning.loggers import WandbLogger, resolve_wandb_mode


@pytest.fixture
def logged_out(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))


def test_auto_mode_is_offline_without_login(logged_out):
    assert resolve_wandb_mode("auto") == "offline"


def test_auto_mode_is_online_with_api_key(logged_out, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"


def test_forced_online_without_login_is_a_clear_error(logged_out, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(UserError, match="WANDB_MODE=online but no W&B login"):
        resolve_wandb_mode("auto")


def test_offline_logger_writes_a_local_run(logged_out, tmp_path):
    logger = WandbLogger(save_dir=str(tmp_path / "run"), name="t")
    logger.log_metrics({"val/rougeL": 1.0}, step=0)
    logger.experiment.finish()
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
