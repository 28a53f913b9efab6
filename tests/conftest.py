"""Shared fixtures. Tests never touch the network: W&B is offline and the Hugging Face Hub is off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DQ_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real benchmark samples beside the project (`../shared/data`); required in CI."""
    if not (SHARED_DATA / "xsum" / "train.jsonl").exists():
        if os.environ.get("CI"):
            pytest.fail(f"shared data missing at {SHARED_DATA} (set DQ_SHARED_DATA)")
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One datasets/tokenizer cache for the whole session, so BPE training and `map` happen once."""
    return tmp_path_factory.mktemp("dq_cache")


@pytest.fixture(scope="session")
def teacher_dir(shared_data, cache_dir, tmp_path_factory) -> Path:
    """A micro 4+4-layer XSum teacher (random weights) with its BPE tokenizer, as a Hugging Face directory."""
    import torch

    from dq_lightning.data.datamodule import XSumDataModule
    from dq_lightning.models.loading import load_or_build_model

    data = XSumDataModule(data_dir=str(shared_data / "xsum"), vocab_size=500, cache_dir=str(cache_dir))
    tokenizer = data.build_tokenizer()
    torch.manual_seed(0)
    model = load_or_build_model("micro", tokenizer, encoder_layers=4, decoder_layers=4, dropout=0.0)
    out = tmp_path_factory.mktemp("teacher") / "hf"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m dq_lightning ...` in a fresh process, as a user would type it."""
    return subprocess.run([sys.executable, "-m", "dq_lightning", *args], cwd=cwd or PROJECT_ROOT,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path
