"""Staging directories: what a killed writer leaves behind is removed by the next writer, nothing else is."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from dq_lightning.files import replace_directory, staging_directory


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_next_writer_removes_a_killed_writers_staging_directory_only(tmp_path):
    host = socket.gethostname().replace(".", "_")
    killed = tmp_path / f".dq_export.staging.{host}.{dead_pid()}.abc"
    running = tmp_path / f".dq_export.staging.{host}.{os.getpid()}.def"
    other_host = tmp_path / f".dq_export.staging.elsewhere.{dead_pid()}.ghi"
    user_file = tmp_path / ".dq_export.staging.notes"
    for directory in (killed, running, other_host):
        directory.mkdir()
        (directory / "model.safetensors").write_bytes(b"half")
    user_file.write_text("mine")

    fresh = staging_directory(tmp_path, ".dq_export.staging.")

    assert not killed.exists()
    assert running.is_dir() and other_host.is_dir() and user_file.read_text() == "mine"
    assert fresh.is_dir() and not any(fresh.iterdir())
    assert fresh.name.startswith(f".dq_export.staging.{host}.{os.getpid()}.")


def test_replace_directory_keeps_the_old_one_when_the_block_fails(tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("old")
    with pytest.raises(RuntimeError):
        with replace_directory(out) as staging:
            (staging / "config.json").write_text("new")
            raise RuntimeError("killed midway")
    assert (out / "config.json").read_text() == "old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["hf"]

    with replace_directory(out) as staging:
        (staging / "config.json").write_text("new")
    assert (out / "config.json").read_text() == "new"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["hf"]


def test_a_writer_killed_between_its_renames_leaves_the_old_copy_restored_by_the_next(tmp_path):
    out = tmp_path / "hf"
    previous = tmp_path / ".hf.previous"  # what the kill left: the old copy moved aside, none in place
    previous.mkdir()
    (previous / "config.json").write_text("old")
    with pytest.raises(RuntimeError), replace_directory(out):
        assert (out / "config.json").read_text() == "old"  # in place again before the new one is written
        raise RuntimeError("this writer fails too")
    assert (out / "config.json").read_text() == "old" and not previous.exists()
    with replace_directory(out) as staging:
        (staging / "config.json").write_text("new")
    assert (out / "config.json").read_text() == "new" and not previous.exists()
