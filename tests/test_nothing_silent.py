"""Nothing silent (issue 40): an input the command would ignore, a failure it would find only after the fit,
two writers in one run folder. Each is one `error:` line naming the culprit before anything is written, or
means what the saved config says."""

import json

import pytest

from tests.conftest import run_cli
from tests.test_bad_input_data import ENV, QUICK, one_error

TEACHER_TINY = "experiments/xsum/teacher-tiny.yaml"


def teacher_fit(root, cache_dir, data_dir, *extra):
    return ["fit", "--config", TEACHER_TINY, f"--data.data_dir={data_dir}", f"--data.cache_dir={cache_dir}",
            f"--trainer.default_root_dir={root}", "--model.model=micro", "--data.vocab_size=300", *QUICK, *extra]


# -- inputs that would be ignored ------------------------------------------------------------------------------
@pytest.fixture
def teacher_run(tmp_path):
    """A teacher run folder as a fit and a test leave it (the metrics files `baseline --run` reads)."""
    run = tmp_path / "teacher-tiny"
    run.mkdir()
    (run / "fit_metrics.json").write_text(json.dumps({"metrics": {"val/rougeL": 12.5, "val/rouge1": 20.0}}))
    return run


@pytest.mark.parametrize("case", ["missing run folder", "run without test metrics", "zero samples"])
def test_baseline_refuses_what_it_would_ignore(case, teacher_run, shared_data, tmp_path):
    args = ["baseline", "--task", "xsum", "--data-dir", str(shared_data / "xsum"), "--max-samples", "5"]
    if case == "missing run folder":
        result = run_cli(*args, "--run", str(tmp_path / "teacher-tinny"))
        one_error(result, f"--run {tmp_path / 'teacher-tinny'}", "no such directory")
    elif case == "run without test metrics":
        result = run_cli(*args, "--run", str(teacher_run), "--split", "test")
        one_error(result, f"--run {teacher_run}", "no test_metrics.json")
    else:
        result = run_cli(*args[:-2], "--max-samples", "0", "--run", str(teacher_run))
        one_error(result, "--max-samples 0", "positive")


def test_baseline_shows_the_teacher_it_was_given(teacher_run, shared_data):
    result = run_cli("baseline", "--task", "xsum", "--data-dir", str(shared_data / "xsum"), "--max-samples", "5",
                     "--run", str(teacher_run))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "teacher rougeL 12.50" in result.stdout and "(5 rows)" in result.stdout


def test_report_only_on_a_runs_folder_that_does_not_exist_writes_nothing(tmp_path, shared_data):
    runs = tmp_path / "runz"
    result = run_cli("sweep", "--task", "xsum", "--runs", str(runs), "--report-only", env={"WANDB_MODE": "disabled"})
    one_error(result, "--report-only", str(runs / "xsum" / "sweep"), "nothing has run there")
    assert not runs.exists()


@pytest.mark.parametrize("flag", ["--global_batch_size=0", "--data.eval_batch_size=0", "--data.num_workers=-1"])
def test_a_zero_that_would_mean_unset_is_refused(flag, tmp_path, shared_data, cache_dir):
    """0 is not null: the run's config.yaml would record a 0 that had meant "unset"."""
    root = tmp_path / "run"
    result = run_cli(*teacher_fit(root, cache_dir, shared_data / "xsum", flag), env=ENV)
    one_error(result, flag.split("=")[0].removeprefix("--").removeprefix("data."))
    assert not (root / "checkpoints").exists() and not (root / "config.yaml").exists()


# -- what a command needs, checked before it trains --------------------------------------------------------------
@pytest.fixture
def data_without_test(tmp_path, shared_data):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "validation"):
        (data / f"{split}.jsonl").write_bytes((shared_data / "xsum" / f"{split}.jsonl").read_bytes())
    return data


def test_a_split_the_command_reads_is_checked_before_it_trains(data_without_test, tmp_path, cache_dir):
    """The test after the fit reads test.jsonl: missing, it is found now, not after the whole fit."""
    root = tmp_path / "run"
    result = run_cli(*teacher_fit(root, cache_dir, data_without_test, "--test_after_fit=true"), env=ENV)
    one_error(result, f"--data.data_dir={data_without_test}", "missing test.jsonl", "test_after_fit")
    assert not (root / "checkpoints").exists() and not (root / "config.yaml").exists()
    test = run_cli("test", *teacher_fit(root, cache_dir, data_without_test)[1:], env=ENV)
    one_error(test, "missing test.jsonl", "`test`")
    missing_file = run_cli(*teacher_fit(root, cache_dir, data_without_test, "--test_after_fit=true",
                                        f"--data.test_file={tmp_path / 'other.jsonl'}"), env=ENV)
    one_error(missing_file, f"--data.test_file={tmp_path / 'other.jsonl'}", "no such file", "test_after_fit")
    fit_only = run_cli(*teacher_fit(root, cache_dir, data_without_test), env=ENV)  # reads no test split
    assert fit_only.returncode == 0, fit_only.stderr[-2000:]


def test_a_folder_a_callback_writes_is_checked_before_it_trains(tmp_path, shared_data, cache_dir):
    """MetricsFile writes fit_metrics.json when the fit ends: a folder for it below a file is found now."""
    (tmp_path / "afile").write_text("mine\n")
    root = tmp_path / "run"
    result = run_cli(*teacher_fit(root, cache_dir, shared_data / "xsum",
                                  f"--trainer.callbacks.dirpath={tmp_path / 'afile' / 'hf'}"), env=ENV)
    one_error(result, "MetricsFile.dirpath", str(tmp_path / "afile"), "is a file")
    assert not (root / "checkpoints").exists()


# -- two writers, one run folder -------------------------------------------------------------------------------
def test_a_fit_claims_its_run_folder_and_a_second_one_is_refused_while_it_runs(tmp_path, shared_data, cache_dir):
    """Two fits started together into a fresh folder both found it empty and trained into it. A fit claims the
    folder atomically first; here this test process holds the claim, as a running fit would."""
    from dq_lightning.run_folder import claim_run_folder

    root = tmp_path / "teacher-tiny"
    held = claim_run_folder(root)
    try:
        result = run_cli(*teacher_fit(root, cache_dir, shared_data / "xsum"), env=ENV)
        one_error(result, f"--trainer.default_root_dir={root}", "another fit is training into it", "nothing was written")
        assert not root.exists() or not any(root.rglob("*"))
    finally:
        held.release()
    done = run_cli(*teacher_fit(root, cache_dir, shared_data / "xsum"), env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (root / "checkpoints" / "last.ckpt").is_file()
    assert not list(tmp_path.glob(".*claim*")), "the fit left its claim behind"


def test_the_claim_of_a_killed_fit_does_not_block_the_next(tmp_path, shared_data, cache_dir):
    from dq_lightning.claims import claim_beside

    root = tmp_path / "teacher-tiny"
    dead = json.dumps({"host": __import__("socket").gethostname(), "pid": 2 ** 22 + 12345, "token": "x"})
    claim_beside(root).write_text(dead)
    result = run_cli(*teacher_fit(root, cache_dir, shared_data / "xsum"), env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not claim_beside(root).exists()


@pytest.mark.slow  # two fresh interpreters started together: `make test-slow`
@pytest.mark.timeout(600)
def test_two_fits_started_together_into_one_fresh_folder_train_once(tmp_path, shared_data, cache_dir):
    import os
    import subprocess
    import sys

    from tests.conftest import PROJECT_ROOT

    root = tmp_path / "teacher-tiny"
    command = [sys.executable, "-m", "dq_lightning", *teacher_fit(root, cache_dir, shared_data / "xsum")]
    processes = [subprocess.Popen(command, cwd=PROJECT_ROOT, env={**os.environ, **ENV}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(process.wait(), *process.communicate()) for process in processes]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], [stderr[-2000:] for _, _, stderr in results]
    refused = next(stderr for code, _, stderr in results if code == 2)
    assert ("another fit is training into it" in refused or "holds an earlier run" in refused), refused[-2000:]
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["last.ckpt"]
