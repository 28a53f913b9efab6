"""`python -m dq_lightning sweep`: run a task's grid of DQ students, then report.

Online (logged in to W&B): the sweep is created on the W&B server (its id kept in `<sweep_dir>/sweep_id`, so
a restart joins the same sweep) and `wandb agent` runs it. Offline: the same file is expanded locally and
the runs go one after another, each an offline W&B run that `wandb sync` uploads later.

Before any run starts, every grid point is checked (`dq_lightning.sweep.check`): a typo'd value, an unknown
flag, missing data while offline or GPUs the machine lacks end the sweep with one `error:` line.

Offline runs are resumable: each run directory keeps a `status.json`; a finished run is never rerun, an
interrupted one continues from its `checkpoints/last.ckpt` (an empty or unreadable one is moved aside, and the
run continues from the newest readable checkpoint or from scratch), and a failed one is recorded with its
error (and retried on the next start) while the sweep carries on; a sweep with failed runs exits 1 naming
them. Several workers may run one sweep at once: each point is claimed atomically (`dq_lightning.claims`),
so no point is trained twice; `--workers N` runs N of them in this one process (on a CPU machine each run then
gets its share of the cores: small models train faster as several one-thread processes than as one that
spreads every operation over all cores).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from dq_lightning.cluster import AGENT_ARGS_ENV
from dq_lightning.data.jsonl import check_jsonl
from dq_lightning.files import read_json, write_json_atomic, write_text_atomic
from dq_lightning.data.tasks import TASKS, get_task
from dq_lightning.errors import UserError, command_line, first_line
from dq_lightning.evaluation.bootstrap import check_resamples
from dq_lightning.evaluation.perturb import check_rate
from dq_lightning.sweep.comparisons import (Bootstrap, add_intervals, contrast_markdown, contrast_table, contrasts,
                                            distillation_markdown, distillation_table, seed_summary,
                                            supernet_markdown, supernet_table)
from dq_lightning.sweep.front import front_markdown, plot_points
from dq_lightning.sweep.plot import plot_tradeoff
from dq_lightning.sweep.report import (log_wandb_summary, markdown_table, run_row, seed_markdown, teacher_row,
                                       write_csv_atomic)
from dq_lightning import claims
from dq_lightning.sweep import robustness
from dq_lightning.sweep.check import preflight_data, preflight_gpus, teacher_stand_in
from dq_lightning.sweep.check_cli import check_points
from dq_lightning.sweep.spec import (SCALES, SEED_PARAMETER, SweepPoint, command_for, expand_grid, format_flags,
                                    load_sweep, run_id_of, sweep_dir_of, sweep_file)
from dq_lightning.sweep.workers import (Stop, Terminated, last_error, on_sigterm, resolve_workers,
                                       run_threads, thread_environment)

SUPERNET_DIR = "supernet"  # <sweep_dir>/supernet/<point>/: the points extracted from a supernet run


def _run_logged(command: list[str], log: Path, env: dict[str, str] | None = None,
                stopping: Stop | None = None) -> int:
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            if stopping is None:
                return child.wait()
            while True:  # a worker thread: signals reach the main thread only, which tells it through `stopping`
                try:
                    return child.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    stopping.raise_if_set()
        except BaseException as error:
            # The run must not go on training after this worker let go of its claim. Ctrl-C reached it too (same
            # process group) and it is stopping by itself; a SIGTERM sent to this worker alone did not.
            try:
                child.wait(timeout=0 if isinstance(error, Terminated) else 30)
            except subprocess.TimeoutExpired:
                child.terminate()
                try:
                    child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
            raise


def tested_after_fit(run_dir: Path) -> bool:
    """Whether the fit process also tested (`test_after_fit`): its test metrics are newer than its fit metrics."""
    fit, test = run_dir / "fit_metrics.json", run_dir / "test_metrics.json"
    return fit.exists() and test.exists() and test.stat().st_mtime >= fit.stat().st_mtime


def checkpoint_problem(path: Path, model_class: str) -> str | None:
    """Why `path` cannot be resumed from (empty, unreadable, another module's), or None when it can."""
    from dq_lightning.checkpoints import check_ckpt_path

    try:
        if path.stat().st_size == 0:
            return "is empty (0 bytes)"
        check_ckpt_path(path, model_class)
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    except UserError as error:
        return str(error).removeprefix(f"--ckpt_path={path}").lstrip(": ")
    return None


def move_aside(path: Path) -> Path:
    """Rename a bad checkpoint to `<name>.corrupt-<time>` (kept for inspection, never deleted)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, number = path.with_name(f"{path.name}.corrupt-{stamp}"), 1
    while target.exists():
        target, number = path.with_name(f"{path.name}.corrupt-{stamp}-{number}"), number + 1
    path.rename(target)
    return target


def resume_checkpoint(run_dir: Path, model_class: str, say) -> Path | None:
    """The checkpoint to resume a run from: `last.ckpt` if it loads, else the newest other readable one.

    Resuming from an empty or unreadable `last.ckpt` (a disk that filled up, a copy cut short) fails the same
    way at every restart of the sweep, so a bad one is moved aside and the run continues from the previous good
    checkpoint, or starts again from scratch when there is none; `say` gets one line about it.
    """
    directory = run_dir / "checkpoints"
    last = directory / "last.ckpt"
    if not last.exists():
        return None
    problem = checkpoint_problem(last, model_class)
    if problem is None:
        return last
    moved = move_aside(last)
    for other in sorted(directory.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True):
        if checkpoint_problem(other, model_class) is None:
            say(f"checkpoints/last.ckpt {problem}: moved it to {moved.name}; resuming from {other.name}")
            return other
        move_aside(other)
    say(f"checkpoints/last.ckpt {problem}: moved it to {moved.name}; no other readable checkpoint, so this run "
        f"starts again from scratch")
    return None


@dataclass
class Outcome:
    """What one worker's pass over the grid did."""

    finished: list[str] = field(default_factory=list)
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # run id, stage, error line
    elsewhere: dict[str, str] = field(default_factory=dict)  # run id -> the other worker holding it


class LocalSweep:
    def __init__(self, sweep: dict, points: list[SweepPoint], sweep_dir: Path, name: str, extra: list[str],
                 classes: dict[str, str], workers: int = 1):
        self.sweep, self.points, self.sweep_dir, self.name, self.extra = sweep, points, sweep_dir, name, extra
        self.classes = classes  # run id -> module class path, from the up-front check (`check_points`)
        self.workers, self.env = workers, thread_environment(workers)
        self.stopping = Stop() if workers > 1 else None
        self._lock = threading.Lock()  # the worker threads' shared outcome and tried points
        self.started = time.time()  # a point that failed since then is not retried by this process

    def command(self, point: SweepPoint, stage: str) -> list[str]:
        command = command_for(self.sweep, point.flags)
        command[command.index("fit")] = stage
        run_dir = self.sweep_dir / point.run_id
        # The seeds of one grid point are one W&B group; without seeds, the sweep is.
        seedless = {k: v for k, v in point.params.items() if k != SEED_PARAMETER}
        group = f"{self.name}-{run_id_of(seedless)}" if SEED_PARAMETER in point.params else self.name
        return [*command, *self.extra, f"--trainer.default_root_dir={run_dir}",
                f"--trainer.logger.init_args.name={self.name}-{point.run_id}-{stage}",
                f"--trainer.logger.init_args.group={group}"]
        # No fixed W&B run id: consecutive processes (fit, then test; a resumed fit) reusing one id race the
        # W&B service still closing the previous run ("run ID is in use"). Name and group tie them together.

    def run(self) -> Outcome:
        """Train every point not finished and not claimed by another live worker, with `workers` threads."""
        self.outcome, self.tried = Outcome(), set()
        if self.workers == 1:
            self._work()
            return self.outcome
        errors: list[BaseException] = []

        def work() -> None:
            try:
                self._work()
            except KeyboardInterrupt:
                pass  # stopped by the main thread, which raises the interrupt itself
            except BaseException as error:  # noqa: BLE001 - handed to the main thread
                errors.append(error)
                self.stopping.set(Terminated())  # the other workers stop their runs now

        run_threads(work, self.workers, "sweep worker", self.stopping)
        if errors:
            raise errors[0]
        return self.outcome

    def _work(self) -> None:
        """One worker's passes over the grid.

        Passes repeat while they train something: meanwhile another worker may have died (its points become
        claimable) or finished. A point is tried at most once per invocation, so a failing one is not retried
        in a loop; this process's worker threads share what they tried, so they never wait on each other.
        """
        outcome, total = self.outcome, len(self.points)
        progress = True
        while progress:
            progress = False
            for number, point in enumerate(self.points, start=1):
                if self.stopping is not None:
                    self.stopping.raise_if_set()
                run_dir = self.sweep_dir / point.run_id
                prefix = f"[{number}/{total}] {point.run_id}"
                with self._lock:
                    if point.run_id in self.tried or point.run_id in outcome.finished:
                        continue
                    if self._failed_elsewhere(point, read_json(run_dir / "status.json"), prefix):
                        continue
                    if read_json(run_dir / "status.json").get("status") == "finished":
                        by = "by another worker" if point.run_id in outcome.elsewhere else "earlier"
                        print(f"{prefix}: finished {by}, skipped", flush=True)
                        outcome.elsewhere.pop(point.run_id, None)
                        outcome.finished.append(point.run_id)
                        continue
                    claim = self.claim(run_dir)
                    if not isinstance(claim, claims.Claim):
                        if point.run_id not in outcome.elsewhere:
                            print(f"{prefix}: being trained by another worker ({claims.describe(claim)}), skipped",
                                  flush=True)
                        outcome.elsewhere[point.run_id] = claims.describe(claim)
                        continue
                    self.tried.add(point.run_id)
                    outcome.elsewhere.pop(point.run_id, None)
                try:
                    if claim.took_over:
                        print(f"{prefix}: took over the claim of {claims.describe(claim.took_over)}, which is no "
                              f"longer running", flush=True)
                    # Re-read under the claim: another worker may have finished it since the read above.
                    status = read_json(run_dir / "status.json")
                    with self._lock:
                        if self._failed_elsewhere(point, status, prefix):
                            continue
                    if status.get("status") == "finished":
                        print(f"{prefix}: finished by another worker, skipped", flush=True)
                        with self._lock:
                            outcome.finished.append(point.run_id)
                        continue
                    progress = True
                    error = self.run_point(point, run_dir, status, prefix)
                finally:
                    claim.release()
                with self._lock:
                    if error:
                        outcome.failed.append((point.run_id, *error))
                    else:
                        outcome.finished.append(point.run_id)

    def _failed_elsewhere(self, point: SweepPoint, status: dict, prefix: str) -> bool:
        """Whether another worker's run of `point` failed since this process started: then it is not tried
        again here (every worker would repeat the same failure); the sweep run again retries it. Under the
        lock."""
        if status.get("status") != "failed" or float(status.get("updated_at") or 0) < self.started:
            return False
        self.tried.add(point.run_id)
        self.outcome.failed.append((point.run_id, status.get("stage", "?"), status.get("error", "")))
        print(f"{prefix}: failed in another worker since this one started ({status.get('error', '')}); not "
              f"retried here", flush=True)
        return True

    def claim(self, run_dir: Path) -> claims.Claim | dict:
        try:
            return claims.acquire(run_dir)
        except OSError as error:
            raise UserError(f"{run_dir}: cannot claim this run directory ({error.strerror or error})") from None

    def fit_commands(self, point: SweepPoint, run_dir: Path, prefix: str, say) -> list[list[str]]:
        """The commands that leave the point's fit_metrics.json: its fit, resumed from its last checkpoint."""
        fit = self.command(point, "fit")
        resume = resume_checkpoint(run_dir, self.classes[point.run_id], say)
        if resume is not None:
            fit.append(f"--ckpt_path={resume}")
        print(f"{prefix}: fit{f' (resumed from {resume.name})' if resume else ''} ...", flush=True)
        return [fit]

    def run_point(self, point: SweepPoint, run_dir: Path, status: dict, prefix: str) -> tuple[str, str] | None:
        """Fit (resuming) and test one point; None when it finished, else (stage, error line)."""
        run_dir.mkdir(parents=True, exist_ok=True)
        log = run_dir / "run.log"
        started = time.time()
        spent_before = float(status.get("wall_time_s") or 0)
        attempts = int(status.get("attempts", 0)) + 1

        def record(state: str, **fields) -> None:
            write_json_atomic(run_dir / "status.json", {
                "status": state, "params": point.params, "attempts": attempts, "updated_at": time.time(),
                "wall_time_s": round(spent_before + time.time() - started, 1), **fields})

        def say(text: str) -> None:
            print(f"{prefix}: {text}", flush=True)
            with open(log, "a") as out:
                out.write(f"\nsweep: {text}\n")

        record("running")
        try:
            if not (run_dir / "fit_metrics.json").exists():
                for fit in self.fit_commands(point, run_dir, prefix, say):
                    if _run_logged(fit, log, self.env, self.stopping) != 0:
                        record("failed", stage="fit", error=last_error(log))
                        print(f"{prefix}: FAILED in fit: {last_error(log)} (log: {log})", flush=True)
                        return "fit", last_error(log)
            if not tested_after_fit(run_dir):
                fit_metrics = read_json(run_dir / "fit_metrics.json")
                checkpoint = fit_metrics.get("best_model_path") or fit_metrics.get("last_model_path")
                test = self.command(point, "test") + ([f"--ckpt_path={checkpoint}"] if checkpoint else [])
                print(f"{prefix}: test ...", flush=True)
                if _run_logged(test, log, self.env, self.stopping) != 0:
                    record("failed", stage="test", error=last_error(log))
                    print(f"{prefix}: FAILED in test: {last_error(log)} (log: {log})", flush=True)
                    return "test", last_error(log)
        except KeyboardInterrupt:
            record("interrupted")
            raise
        record("finished")
        row = run_row(run_dir, point)
        metric = self.sweep["metric"]["name"].split("/")[-1]
        score = row.get(f"test/{metric}")
        print(f"{prefix}: done in {row['wall_time_s']:.0f} s, test/{metric} {score if score is None else round(score, 2)}, "
              f"compression {row.get('compression') and round(row['compression'], 1)}x", flush=True)
        return None


class SupernetPoints(LocalSweep):
    """The points of a supernet run (`--from-supernet RUN`), each "fitted" by extracting its student
    (`python -m dq_lightning extract`, which takes the best student the supernet fit kept for it) and, with
    `finetune_steps`, a short fit from it (`--model.init_from`); then tested as a trained point is, in
    `<sweep_dir>/supernet/<point>/`."""

    def __init__(self, supernet_run: Path, finetune_steps: int, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.supernet_run, self.finetune_steps = supernet_run, finetune_steps

    def fit_commands(self, point: SweepPoint, run_dir: Path, prefix: str, say) -> list[list[str]]:
        params = point.params
        width = ["--width", str(params["model.width"])] if params.get("model.width") else []
        extracted = run_dir / "extracted" / f"{point.run_id}.ckpt"
        extract = [sys.executable, "-m", "dq_lightning", "extract", "--ckpt", str(self.supernet_run),
                   "--bits", str(params["model.bits"]), "--depth", str(params["model.depth"]), *width,
                   "--out", str(extracted)]
        if not self.finetune_steps:
            print(f"{prefix}: extract ...", flush=True)
            return [[*extract, "--fit-metrics", str(run_dir / "fit_metrics.json")]]
        resume = resume_checkpoint(run_dir, self.classes[point.run_id], say)
        finetune = [*self.command(point, "fit"), f"--model.init_from={extracted}",
                    f"--trainer.max_steps={self.finetune_steps}", "--trainer.max_epochs=-1",
                    *([f"--ckpt_path={resume}"] if resume is not None else [])]
        print(f"{prefix}: extract, fine-tune {self.finetune_steps} steps ...", flush=True)
        return ([] if extracted.exists() else [extract]) + [finetune]


def supernet_points(run: Path) -> list[SweepPoint]:
    """The grid a supernet run trained (from its last checkpoint) as sweep points named by the point."""
    import torch

    from dq_lightning.supernet.grid import SubNet

    last = run / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise UserError(f"--from-supernet {run}: no checkpoints/last.ckpt there (train it first: make supernet)")
    try:
        stored = torch.load(last, map_location="cpu", weights_only=True, mmap=True).get("supernet")
    except Exception as error:  # noqa: BLE001 - a bad file raises many types
        raise UserError(f"--from-supernet {run}: cannot read checkpoints/last.ckpt ({first_line(error)})") from None
    if not stored:
        raise UserError(f"--from-supernet {run}: checkpoints/last.ckpt is not a supernet's")
    points = []
    for name in stored["grid"]:
        bits, depth, *width = name.split()
        subnet = SubNet(bits, depth, width[0] if width else None)
        params = {"model.bits": bits, "model.depth": depth, **({"model.width": width[0]} if width else {})}
        points.append(SweepPoint(params, subnet.key, format_flags(params)))
    return points


def supernet_cost(run: Path, rows: list[dict], sweep_dir: Path) -> str:
    """What the supernet's fit cost against the separately trained fits of the points it replaces."""
    from dq_lightning.sweep.comparisons import point_identity

    fit = read_json(run / "fit_metrics.json")
    summary = fit.get("summary", {})
    extracted = {point_identity(row) for row in rows if row.get("supernet_run") == str(run)}
    replaced = [row for row in rows if row.get("source", "trained") == "trained" and row.get("status") == "finished"
                and point_identity(row) in extracted]
    fits = [read_json(sweep_dir / row["run_id"] / "fit_metrics.json") for row in replaced]
    steps = sum(int(f.get("global_step") or 0) for f in fits)
    wall = sum(float(f.get("wall_time_s") or 0) for f in fits)
    # A fine-tuned point's own fit (`--finetune-steps`): one student pass and one teacher forward per step.
    tuned = [read_json(sweep_dir / row["run_id"] / "fit_metrics.json") for row in rows
             if row.get("source") == "supernet+finetune" and row.get("supernet_run") == str(run)]
    tuned_steps = sum(int(f.get("global_step") or 0) for f in tuned)
    tuned_wall = sum(float(f.get("wall_time_s") or 0) for f in tuned)
    passes = int(summary.get("subnet_passes") or 0) + tuned_steps
    teacher = int(fit.get("global_step") or 0) + tuned_steps
    supernet_wall = float(fit.get("wall_time_s") or 0) + tuned_wall
    threads = sorted({f.get("threads") for f in [*fits, fit]} - {None})
    tuned_text = f" + fine-tuning {tuned_steps} steps" if tuned_steps else ""
    lines = ["| | sub-network forward/backward passes | teacher forwards | optimizer steps | fit wall time |",
             "|---|---|---|---|---|",
             f"| supernet ({len(extracted)} points, one fit{tuned_text}) | {passes} | {teacher} | {teacher} | "
             f"{supernet_wall:.0f} s |",
             f"| {len(replaced)} separately trained dq fits | {steps} | {steps} | {steps} | {wall:.0f} s |"]
    if steps and wall:
        lines.append(f"| supernet / separate | {passes / steps:.2f} | {teacher / steps:.2f} | {teacher / steps:.2f} | "
                     f"{supernet_wall / wall:.2f} |")
    return "\n".join(lines) + f"\n\n(threads per process: {threads}; tests of the points are the same on both sides)"


def failure_line(outcome: Outcome, total: int, sweep_dir: Path) -> str:
    """One line for a sweep with failed runs: how many, which, why, and where the logs are."""
    shown = [f"{run_id} ({stage}: {error.removeprefix('error: ')[:160]})"
             for run_id, stage, error in outcome.failed[:5]]
    more = f" and {len(outcome.failed) - 5} more" if len(outcome.failed) > 5 else ""
    return (f"{len(outcome.failed)} of {total} runs failed: {'; '.join(shown)}{more}; logs: "
            f"{sweep_dir}/<run id>/run.log; run the same command again to retry them")


def run_online(sweep: dict, sweep_dir: Path, extra: list[str], workers: int = 1) -> None:
    """Create (or join) the W&B sweep and run `workers` agents of it; every DDP rank of a run is launched by
    Lightning from the agent's single command, so all ranks get the same arguments."""
    import wandb

    sweep_dir.mkdir(parents=True, exist_ok=True)
    id_file = sweep_dir / "sweep_id"
    project = os.environ.get("WANDB_PROJECT", "dq-lightning")
    if id_file.exists():
        sweep_id = id_file.read_text().strip()
    else:
        sweep_id = wandb.sweep(sweep, project=project)
        id_file.write_text(sweep_id + "\n")
    # The sweep (on W&B's server) holds one command for every machine; this machine's GPUs and data folder
    # reach the runs its agent starts through the environment (`dq_lightning.cluster.with_agent_args`).
    env = {**(thread_environment(workers) or os.environ), "DQ_SWEEP_DIR": str(sweep_dir),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if extra:
        env[AGENT_ARGS_ENV] = shlex.join(extra)
    command = [sys.executable, "-m", "wandb", "agent", "--project", project, sweep_id]
    if workers == 1:
        subprocess.check_call(command, env=env)
        return
    agents = [subprocess.Popen(command, env=env) for _ in range(workers)]
    codes = [agent.wait() for agent in agents]  # Ctrl-C reaches the agents too: they stop their runs
    if any(codes):
        raise UserError(f"{sum(1 for code in codes if code)} of {workers} wandb agents failed (exit codes {codes})")


@dataclass(frozen=True)
class TestSet:
    """Another test file that finished runs are scored on (`--test-file`); `label` names its results, from the
    file's name and content, so an edited file is tested again rather than mistaken for the old one."""

    path: Path
    label: str

    @classmethod
    def of(cls, path: str) -> TestSet:
        import hashlib

        file = Path(path).expanduser().resolve()
        if not file.is_file():
            raise UserError(f"--test-file {path} (make: TEST_FILE): no such file")
        digest = hashlib.sha1()
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return cls(file, f"{file.stem}-{digest.hexdigest()[:8]}")


def retest(sweep_runner: LocalSweep, points: list[SweepPoint], teacher_dir: Path, teacher_config: Path,
           test_set: TestSet, extra: list[str]) -> list[tuple[str, str, str]]:
    """Test every finished run (and the teacher) on `test_set` from its best checkpoint, once; the results go
    to `<run>/tests/<label>/`, the run's own files are not touched. Returns the failures."""
    failures, jobs = [], []
    for point in points:
        run_dir = sweep_runner.sweep_dir / point.run_id
        fit = read_json(run_dir / "fit_metrics.json")
        checkpoint = fit.get("best_model_path") or fit.get("last_model_path")
        if read_json(run_dir / "status.json").get("status") != "finished" or not checkpoint:
            print(f"{point.run_id}: not finished, not tested on {test_set.path.name}", flush=True)
            continue
        command = [*sweep_runner.command(point, "test"), f"--ckpt_path={checkpoint}"]
        jobs.append((point.run_id, run_dir, command))
    if (teacher_dir / "hf" / "config.json").exists() and teacher_config.exists():
        jobs.append(("teacher", teacher_dir, [sys.executable, "-m", "dq_lightning", "test", "--config",
                                              str(teacher_config), f"--model.model={teacher_dir / 'hf'}",
                                              f"--data.tokenizer={teacher_dir / 'hf'}", *extra]))
    for run_id, run_dir, command in jobs:
        out = retest_dir(run_dir, test_set)
        if (out / "test_metrics.json").exists():
            continue
        out.mkdir(parents=True, exist_ok=True)
        print(f"{run_id}: test on {test_set.path.name} ...", flush=True)
        log = out / "run.log"
        if _run_logged([*command, f"--data.test_file={test_set.path}", f"--trainer.default_root_dir={out}"], log):
            failures.append((run_id, "test", last_error(log)))
            print(f"{run_id}: FAILED in test on {test_set.path.name}: {last_error(log)} (log: {log})", flush=True)
    return failures


def retest_dir(run_dir: Path, test_set: TestSet | None) -> Path:
    """Where a run's test results on `test_set` are: the run directory for its own test split."""
    return run_dir if test_set is None else run_dir / "tests" / test_set.label


def collect_rows(points: list[SweepPoint], sweep_dir: Path, teacher_dir: Path,
                 test_set: TestSet | None = None) -> list[dict]:
    rows = [run_row(sweep_dir / point.run_id, point, retest_dir(sweep_dir / point.run_id, test_set))
            for point in points]
    known = {point.run_id for point in points}
    # Online agents name run directories by W&B run id; they belong to the report too.
    rows += [run_row(path, test_dir=retest_dir(path, test_set)) for path in sorted(sweep_dir.iterdir())
             if path.is_dir() and path.name not in known and (path / "fit_metrics.json").exists()
             ] if sweep_dir.exists() else []
    extracted = sweep_dir / SUPERNET_DIR
    if test_set is None and extracted.is_dir():  # points extracted from a supernet (`--from-supernet`)
        for path in sorted(extracted.iterdir()):
            if (path / "fit_metrics.json").exists():
                rows.append({**run_row(path), "run_id": f"{SUPERNET_DIR}/{path.name}"})
    teacher = teacher_row(teacher_dir, retest_dir(teacher_dir, test_set))
    return ([teacher] if teacher else []) + rows


def _same(rows: list[dict], others: list[dict]) -> bool:
    # As JSON: a NaN metric is not equal to itself, and would have the report rewritten to the end.
    return json.dumps(rows, sort_keys=True, default=str) == json.dumps(others, sort_keys=True, default=str)


def report(sweep: dict, points: list[SweepPoint], sweep_dir: Path, teacher_dir: Path, name: str,
           wandb_mode: str, bootstrap: Bootstrap = Bootstrap(), test_set: TestSet | None = None) -> list[dict]:
    """Write results.csv, tradeoff.png and report.md (with `test_set`: results.<label>.csv, ...) and print."""
    metric = sweep["metric"]["name"].split("/")[-1]
    suffix = "" if test_set is None else f".{test_set.label}"
    csv_path, png_path, md_path = (sweep_dir / f"{stem}{suffix}.{ext}" for stem, ext in
                                   (("results", "csv"), ("tradeoff", "png"), ("report", "md")))

    def rows_with_intervals() -> tuple[list[dict], list[dict], dict[str, list[dict]]]:
        """The rows as the run directories hold them, a copy with the bootstrap columns, and the predictions."""
        rows = collect_rows(points, sweep_dir, teacher_dir, test_set)
        with_intervals = [dict(row) for row in rows]
        test_dirs = {row["run_id"]: retest_dir(sweep_dir / row["run_id"], test_set) for row in rows}
        test_dirs["teacher"] = retest_dir(teacher_dir, test_set)
        return rows, with_intervals, add_intervals(with_intervals, test_dirs, metric, bootstrap)

    read_rows, all_rows, predictions = rows_with_intervals()
    title = f"{name}: compression vs {metric}" + (f" on {test_set.path.name}" if test_set else "")
    for _ in range(10):
        write_csv_atomic(all_rows, csv_path)
        plot_tradeoff(all_rows, metric, png_path, title)
        # Another worker may have finished a run and written its report while this one was being written, and
        # this write may have landed last: written again until what it holds is still current, the files are
        # never older than the runs. Only a change in the runs' files is bootstrapped again.
        if _same(collect_rows(points, sweep_dir, teacher_dir, test_set), read_rows):
            break
        read_rows, all_rows, predictions = rows_with_intervals()
    which = (f"test set: {test_set.path} (files in <run>/tests/{test_set.label}/)" if test_set
             else "test set: each run's own test split")
    sections = [which, markdown_table(all_rows, metric), front_markdown(plot_points(all_rows, metric), metric)]
    seeds = [line for line in seed_summary(all_rows, metric) if line["n"] > 1]
    if seeds:
        sections.append("Seeds: the grid points run with several seeds\n\n" + seed_markdown(seeds, metric))
    distillation = distillation_table(all_rows, predictions, metric, bootstrap)
    if distillation:
        sections.append(f"Does distillation pay off? dq minus quant_only in test {metric}, paired over test examples "
                        f"({bootstrap.resamples} bootstrap resamples, seed {bootstrap.seed}; several seeds: their "
                        f"per-example mean)\n\n" + distillation_markdown(distillation, metric))
    for contrast in contrasts(all_rows):
        table = contrast_table(all_rows, predictions, metric, bootstrap, contrast)
        if table:
            sections.append(f"{contrast.parameter}: {contrast.value} minus {contrast.baseline} (the sweep file's first "
                            f"value), test {metric} paired over test examples ({bootstrap.resamples} bootstrap "
                            f"resamples, seed {bootstrap.seed}; several seeds: their per-example mean); of teacher: "
                            f"each side's share of the teacher's test {metric}\n\n"
                            + contrast_markdown(table, metric, contrast))
    extracted = supernet_table(all_rows, predictions, metric, bootstrap)
    if extracted:
        sections.append(f"Supernet vs separately trained: each point extracted from the supernet minus the same point "
                        f"trained on its own, test {metric} paired over test examples\n\n"
                        + supernet_markdown(extracted, metric))
        runs = {row.get("supernet_run") for row in all_rows if row.get("supernet_run")}
        for run in sorted(runs):
            sections.append(f"What the supernet cost ({run}) against the fits it replaces\n\n"
                            + supernet_cost(Path(run), all_rows, sweep_dir))
    text = "\n\n".join(section for section in sections if section)
    write_text_atomic(md_path, text + "\n")
    print(text)
    print(f"\nresults: {csv_path}\nplot:    {png_path}\nreport:  {md_path}")
    if wandb_mode != "disabled":
        try:
            log_wandb_summary(all_rows, metric, png_path, f"{name}-summary{suffix}", sweep_dir, wandb_mode)
        except Exception as error:  # noqa: BLE001 - the files above are the result; W&B is a copy of them
            print(f"warning: W&B summary run not written ({type(error).__name__}: {error})", file=sys.stderr)
    return all_rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dq_lightning sweep",
                                     description="Run a task's W&B sweep of DQ students (online or offline) "
                                                 "and write results.csv, tradeoff.png and a table.")
    parser.add_argument("--task", default="demo", help=f"one of {', '.join(TASKS)}")
    parser.add_argument("--scale", default="tiny", help="tiny (CPU) or paper (GPUs)")
    parser.add_argument("--sweep-file", help="sweep YAML (default: sweeps/<task>-tiny.yaml or sweeps/<task>.yaml)")
    parser.add_argument("--data-dir", help="local {train,validation,test}.jsonl for every run")
    parser.add_argument("--gpus", type=int, help="DDP over this many GPUs per run")
    parser.add_argument("--runs", default="runs", help="root of run directories")
    parser.add_argument("--report-only", action="store_true", help="only rebuild results.csv, plot and table")
    parser.add_argument("--test-file", metavar="PATH",
                        help="also test every finished run and the teacher on this JSON Lines file (the task's "
                             "columns, any size), without retraining; the report then scores that test set")
    parser.add_argument("--workers", default="1", metavar="N",
                        help="runs trained at once by this process (auto: one per core on a CPU machine, one with "
                             "GPUs); each run gets its share of the cores as threads unless OMP_NUM_THREADS is set")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="bootstrap resamples of the test examples behind every 95%% interval (at least 100)")
    parser.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap's resampling")
    parser.add_argument("--robustness", type=float, metavar="RATE",
                        help="after training, score the teacher and every finished run on test sources with this "
                             "share of words perturbed (python -m dq_lightning robustness); results.csv gains "
                             "robust<RATE>/... columns")
    parser.add_argument("--from-supernet", metavar="RUN",
                        help="instead of training the grid, extract every point of this supernet run "
                             "(runs/<task>/supernet-<scale>) and test each; the report sets them beside the "
                             "trained points (make supernet)")
    parser.add_argument("--finetune-steps", type=int, default=0, metavar="N",
                        help="with --from-supernet: fine-tune each extracted student N optimizer steps "
                             "(--model.init_from) before testing it; the steps count in the report's cost")
    parser.add_argument("--preflight", action="store_true",
                        help="only run the check the sweep runs before it trains (arguments, sweep file, data, GPUs "
                             "and every run's commands, built against a stand-in of the teacher when it is not "
                             "trained yet), then exit; `make sweep` runs it before training the teacher")
    return parser


@command_line
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return _main(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _test_set(test_file: str | None, task) -> TestSet | None:
    """`--test-file`'s test set, its rows checked: it is scored, so references are needed too."""
    if not test_file:
        return None
    test_set = TestSet.of(test_file)
    columns = (task.source_column, task.target_column)
    check_jsonl(test_set.path, columns, required_text=columns)
    return test_set


# What every run reads: the fit its training and validation splits, the test (after the fit, or the sweep's own
# test stage) the test split.
SPLITS_READ = {"train": "every run's fit", "validation": "every run's fit", "test": "every run's test"}


def check_sweep(args: argparse.Namespace, task, sweep: dict, path: Path, points: list[SweepPoint],
                sweep_dir: Path, name: str, extra: list[str], teacher_dir: Path, wandb_mode: str) -> dict[str, str]:
    """The one check before anything trains, run in full both by `--preflight` (which `make sweep` runs before
    it trains the teacher) and by the sweep itself: data and GPUs; a run folder that can be written; and every
    command each point will run (its fit and its test, with the flags the sweep adds), parsed, the data splits
    they read checked, and the model, data and trainer built. Before the teacher exists, students are built
    against a stand-in of its shape (`teacher_stand_in`). Returns the points' model classes."""
    from dq_lightning.distill.student import teachers_stood_in
    from dq_lightning.run_folder import check_writable

    preflight_data(task, sweep, args.data_dir)
    preflight_gpus(sweep, args.gpus)
    check_writable(sweep_dir, "--runs (the sweep folder)")
    local = LocalSweep(sweep, points, sweep_dir, name, extra, {})

    def run_commands(point: SweepPoint) -> dict[str, list[str]]:
        if wandb_mode == "online":  # a W&B agent runs the sweep's command with the machine's flags, no more
            return {"fit": command_for(sweep, point.flags)[command_for(sweep, []).index("fit"):] + extra}
        return {stage: command[command.index(stage):] for stage in ("fit", "test")
                for command in [local.command(point, stage)]}

    stand_in = teacher_stand_in(args.task, args.scale, teacher_dir)
    # A teacher that is not there yet and whose shape is unknown: the points are parsed, not built.
    instantiate = bool(stand_in) or (teacher_dir / "hf").exists()
    print(f"sweep {path}: checking {len(points)} grid points"
          + (" against a stand-in of the teacher to be trained" if stand_in else "") + " ...", flush=True)
    with teachers_stood_in(stand_in):
        return check_points(sweep, path, points, extra, instantiate=instantiate, run_commands=run_commands,
                            splits=SPLITS_READ)


def _train(sweep, path: Path, points, sweep_dir: Path, name: str, extra: list[str], workers: int,
           wandb_mode: str, classes: dict[str, str]):
    """Train the grid (here, or through a W&B sweep when online); returns the local sweep's outcome (None
    online)."""
    at_once = f", {workers} at once" if workers > 1 else ""
    print(f"sweep {path}: {len(points)} runs{at_once}, W&B {wandb_mode}, results in {sweep_dir}", flush=True)
    started = time.time()
    outcome = None
    if wandb_mode == "online":
        run_online(sweep, sweep_dir, extra, workers)
    else:
        outcome = LocalSweep(sweep, points, sweep_dir, name, extra, classes, workers).run()
    print(f"sweep wall time: {time.time() - started:.0f} s", flush=True)
    return outcome


def _extract_supernet(run: Path, finetune_steps: int, sweep: dict, sweep_dir: Path, name: str, extra: list[str],
                      workers: int) -> Outcome:
    """`--from-supernet`: every point of the supernet run extracted and tested, as the grid's runs are."""
    points = supernet_points(run)
    print(f"sweep: {len(points)} points of the supernet {run}, extracted and tested in {sweep_dir / SUPERNET_DIR}",
          flush=True)
    classes = {point.run_id: "dq_lightning.modules.student.DQStudentModule" for point in points}
    started = time.time()
    outcome = SupernetPoints(run, finetune_steps, sweep, points, sweep_dir / SUPERNET_DIR, f"{name}-supernet", extra,
                             classes, workers).run()
    print(f"supernet points wall time: {time.time() - started:.0f} s", flush=True)
    return outcome


def _measure_robustness(args: argparse.Namespace, points: list[SweepPoint], sweep_dir: Path, teacher_dir: Path,
                        outcome: Outcome | None) -> Outcome | None:
    """`--robustness`: the teacher's and every finished run's robustness, failures added to the outcome."""
    finished = [sweep_dir / point.run_id for point in points if tested_after_fit(sweep_dir / point.run_id)]
    teacher = [teacher_dir] if (teacher_dir / "hf").is_dir() else []
    workers = resolve_workers(args.workers, len(finished), args.gpus)
    failed = robustness.measure_all(teacher + finished, args.robustness, args.data_dir, args.test_file,
                                    _run_logged, workers, thread_environment(workers),
                                    sweep_dir / "robustness-cache")
    if failed:
        outcome = outcome or Outcome()
        outcome.failed.extend(failed)
    return outcome


def _main(args: argparse.Namespace) -> int:
    try:
        task = get_task(args.task)
        if args.scale not in SCALES:
            raise UserError(f"unknown scale {args.scale!r}; choose from {', '.join(SCALES)}")
        if args.data_dir and not Path(args.data_dir).is_dir():
            raise UserError(f"--data-dir {args.data_dir} (make: DATA_DIR): no such directory")
        bootstrap = Bootstrap(check_resamples(args.bootstrap, "--bootstrap"), args.bootstrap_seed)
        if args.finetune_steps < 0 or (args.finetune_steps and not args.from_supernet):
            raise UserError(f"--finetune-steps {args.finetune_steps}: give a positive number of steps, with "
                            "--from-supernet (make: FINETUNE=)")
        if args.robustness is not None:
            check_rate(args.robustness, "--robustness", "ROBUSTNESS")
        test_set = _test_set(args.test_file, task)
        path = Path(args.sweep_file) if args.sweep_file else sweep_file(args.task, args.scale)
        sweep = load_sweep(path)
        points = expand_grid(sweep, path)
        sweep_dir = sweep_dir_of(Path(args.runs), args.task, args.scale)
        name = f"{args.task}-{args.scale}"
        teacher_dir = Path(args.runs) / args.task / f"teacher-{args.scale}"
        workers = resolve_workers(args.workers, len(points), args.gpus)
        if args.report_only and not sweep_dir.is_dir():
            # A report of nothing but pending runs, written under a typo'd path, would look like a fresh sweep.
            raise UserError(f"--report-only: no sweep at {sweep_dir} (--runs {args.runs}, --task {args.task}, "
                            f"--scale {args.scale}); nothing has run there to report on")
        from dq_lightning.loggers import resolve_wandb_mode

        wandb_mode = resolve_wandb_mode("auto")
        extra = [f"--data.data_dir={args.data_dir}"] if args.data_dir else []
        if args.gpus:
            extra += ["--trainer.accelerator=gpu", f"--trainer.devices={args.gpus}", "--trainer.strategy=ddp"]
        if args.from_supernet:
            # The points are the supernet's, extracted rather than trained: only the data and GPUs are checked.
            classes, outcome = {}, None
            if not args.report_only:
                preflight_data(task, sweep, args.data_dir)
                preflight_gpus(sweep, args.gpus)
            if args.preflight:
                print(f"sweep --from-supernet {args.from_supernet}: arguments, data and GPUs checked", flush=True)
                return 0
            if not args.report_only:
                outcome = _extract_supernet(Path(args.from_supernet), args.finetune_steps, sweep, sweep_dir, name,
                                            extra, workers)
        else:
            classes = {} if args.report_only else \
                check_sweep(args, task, sweep, path, points, sweep_dir, name, extra, teacher_dir, wandb_mode)
            if args.preflight:
                print(f"sweep {path}: {len(points)} runs; arguments, sweep file, data, GPUs and every run's commands "
                      "checked", flush=True)
                return 0
            outcome = None if args.report_only else \
                _train(sweep, path, points, sweep_dir, name, extra, workers, wandb_mode, classes)
        if test_set is not None:
            failures = retest(LocalSweep(sweep, points, sweep_dir, name, extra, classes), points, teacher_dir,
                              Path("experiments") / args.task / f"teacher-{args.scale}.yaml", test_set, extra)
            if failures:
                outcome = outcome or Outcome()
                outcome.failed.extend(failures)
        if args.robustness is not None and not args.report_only:
            outcome = _measure_robustness(args, points, sweep_dir, teacher_dir, outcome)
        report(sweep, points, sweep_dir, teacher_dir, name, wandb_mode, bootstrap, test_set)
        if outcome and outcome.elsewhere:
            count = len(outcome.elsewhere)
            print(f"{count} {'run is' if count == 1 else 'runs are'} being trained by other workers "
                  f"({', '.join(sorted(set(outcome.elsewhere.values())))}); the last worker to finish writes the "
                  f"complete results.csv (if a worker on another host is gone, delete its run's claim.json)",
                  flush=True)
        if outcome and outcome.failed:
            print(f"error: {failure_line(outcome, len(points), sweep_dir)}", file=sys.stderr)
            return 1
    except KeyboardInterrupt as error:
        print("\nsweep interrupted; run the same command again to continue", file=sys.stderr)
        return 143 if isinstance(error, Terminated) else 130
    return 0
