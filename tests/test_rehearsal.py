"""The paper-scale rehearsal (benchmarks/rehearsal.py): the shipped experiments/xsum/dq-paper.yaml at bart-base
shapes on two CPU processes, through fit, validation with generation, checkpoint, resume and export, and the
memory estimate against each process's measured peak."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

# The float32 estimate against a process's training peak resident set on CPU: measured 0.86-0.95 (docs/memory.md).
# The resident set also holds what the estimate leaves out (the datasets, tokenizer, allocator slack, glibc arenas).
RATIO = (0.8, 1.2)


@pytest.mark.slow  # bart-base shapes, two processes: about 10 minutes on 2 cores (docs/memory.md)
@pytest.mark.timeout(2400)
def test_paper_config_rehearsal(tmp_path, shared_data, bart_tokenizer_dir):
    work, out = tmp_path / "rehearsal", tmp_path / "summary.json"
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "benchmarks/rehearsal.py", "--work", str(work), "--data",
                             str(shared_data / "xsum"), "--tokenizer", str(bart_tokenizer_dir), "--out", str(out)],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, env={**os.environ})
    print(f"rehearsal took {time.perf_counter() - started:.0f} s\n{result.stdout}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(out.read_text())
    teacher = json.loads((Path(summary["teacher"]) / "config.json").read_text())
    assert (teacher["d_model"], teacher["encoder_layers"], teacher["decoder_layers"], teacher["vocab_size"]) == \
        (768, 6, 6, 50265)  # bart-base shapes, the real tokenizer's vocabulary

    # The first fit: 2 processes, 2 optimizer steps of 2 accumulated micro-batches each, then one validation.
    fit = summary["processes"]["fit"]
    assert sorted(r["rank"] for r in fit) == [0, 1] and {r["world_size"] for r in fit} == {2}
    for record in fit:
        assert (record["start_step"], record["end_step"]) == (0, 2)
        assert [batch["global_step"] for batch in record["batches"]] == [0, 1, 1, 2]
        assert [v["global_step"] for v in record["validations"]] == [2]
        assert all(batch["shape"][0] == 1 and batch["shape"][1] <= 1024 for batch in record["batches"])
    metrics = summary["fit_metrics"]["metrics"]
    assert math.isfinite(metrics["val/rougeLsum"]) and metrics["step"] == 2  # generated, scored, selected by it
    assert summary["fit_checkpoint_step"] == 2

    # The resume continues from the checkpoint's step, not from 0, and its data position: one more step.
    for record in summary["processes"]["resume"]:
        assert (record["start_step"], record["end_step"]) == (2, 3)
        assert [batch["global_step"] for batch in record["batches"]] == [2, 3]
    assert summary["resumed_checkpoint_step"] == 3

    # The export loads in a fresh process and summarizes.
    assert (Path(summary["export"]) / "dq_export.json").exists()
    assert summary["prediction"].strip()

    # Memory: the estimate at each process's largest batch against its peak resident set.
    for row in summary["estimate"]["ranks"]:
        assert RATIO[0] <= row["ratio"] <= RATIO[1], row
