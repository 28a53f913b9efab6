"""`python -m dq_lightning sweep`: run a task's grid of DQ students, then report.

Online (logged in to W&B): the sweep is created on the W&B server (its id kept in `<sweep_dir>/sweep_id`, so
a restart joins the same sweep) and `wandb agent` runs it. Offline: the same file is expanded locally and
the runs go one after another, each an offline W&B run that `wandb sync` uploads later.

Offline runs are resumable: each run directory keeps a `status.json`; a finished run is never rerun, an
interrupted one continues from its `checkpoints/last.ckpt`, and a failed one is recorded with its error
(and retried on the next start) while the sweep carries on.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from dq_lightning.files import write_json_atomic
from dq_lightning.data.tasks import TASKS, get_task
from dq_lightning.errors import UserError
from dq_lightning.loggers import resolve_wandb_mode
from dq_lightning.sweep.report import (log_wandb_summary, markdown_table, plot_tradeoff, read_json, run_row,
                                       teacher_row, write_csv_atomic)
from dq_lightning.sweep.spec import SweepPoint, check_parameters, command_for, expand_grid, load_sweep

SCALES = ("tiny", "paper")


def sweep_file(task: str, scale: str) -> Path:
    return Path("sweeps") / (f"{task}.yaml" if scale == "paper" else f"{task}-{scale}.yaml")


def sweep_dir_of(runs: Path, task: str, scale: str) -> Path:
    return runs / task / ("sweep" if scale == "tiny" else f"sweep-{scale}")


def last_error(log: Path) -> str:
    """The most telling line of a failed run's log: our one-line error, else the exception line."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except FileNotFoundError:
        return "no log"
    for line in reversed(lines):
        if line.startswith("error:"):
            return line
    for line in reversed(lines):
        if "Error" in line.split(":")[0] or "Exception" in line.split(":")[0]:
            return line[:500]
    return lines[-1][:500] if lines else "exited without output"


def _run_logged(command: list[str], log: Path) -> int:
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        return subprocess.call(command, stdout=out, stderr=subprocess.STDOUT)


def tested_after_fit(run_dir: Path) -> bool:
    """Whether the fit process also tested (`test_after_fit`): its test metrics are newer than its fit metrics."""
    fit, test = run_dir / "fit_metrics.json", run_dir / "test_metrics.json"
    return fit.exists() and test.exists() and test.stat().st_mtime >= fit.stat().st_mtime


class LocalSweep:
    def __init__(self, sweep: dict, points: list[SweepPoint], sweep_dir: Path, name: str, extra: list[str]):
        self.sweep, self.points, self.sweep_dir, self.name, self.extra = sweep, points, sweep_dir, name, extra

    def command(self, point: SweepPoint, stage: str) -> list[str]:
        command = command_for(self.sweep, point.flags)
        command[command.index("fit")] = stage
        run_dir = self.sweep_dir / point.run_id
        return [*command, *self.extra, f"--trainer.default_root_dir={run_dir}",
                f"--trainer.logger.init_args.name={self.name}-{point.run_id}-{stage}",
                f"--trainer.logger.init_args.group={self.name}"]
        # No fixed W&B run id: consecutive processes (fit, then test; a resumed fit) reusing one id race the
        # W&B service still closing the previous run ("run ID is in use"). Name and group tie them together.

    def run(self) -> None:
        total = len(self.points)
        for number, point in enumerate(self.points, start=1):
            run_dir = self.sweep_dir / point.run_id
            status = read_json(run_dir / "status.json")
            prefix = f"[{number}/{total}] {point.run_id}"
            if status.get("status") == "finished":
                print(f"{prefix}: finished earlier, skipped", flush=True)
                continue
            self.run_point(point, run_dir, status, prefix)

    def run_point(self, point: SweepPoint, run_dir: Path, status: dict, prefix: str) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        log = run_dir / "run.log"
        started = time.time()
        spent_before = float(status.get("wall_time_s") or 0)
        attempts = int(status.get("attempts", 0)) + 1

        def record(state: str, **fields) -> None:
            write_json_atomic(run_dir / "status.json", {
                "status": state, "params": point.params, "attempts": attempts,
                "wall_time_s": round(spent_before + time.time() - started, 1), **fields})

        record("running")
        try:
            if not (run_dir / "fit_metrics.json").exists():
                fit = self.command(point, "fit")
                last = run_dir / "checkpoints" / "last.ckpt"
                resumed = last.exists()
                if resumed:
                    fit.append(f"--ckpt_path={last}")
                print(f"{prefix}: fit{' (resumed from last.ckpt)' if resumed else ''} ...", flush=True)
                if _run_logged(fit, log) != 0:
                    record("failed", stage="fit", error=last_error(log))
                    print(f"{prefix}: FAILED in fit: {last_error(log)} (log: {log})", flush=True)
                    return
            if not tested_after_fit(run_dir):
                fit_metrics = read_json(run_dir / "fit_metrics.json")
                checkpoint = fit_metrics.get("best_model_path") or fit_metrics.get("last_model_path")
                test = self.command(point, "test") + ([f"--ckpt_path={checkpoint}"] if checkpoint else [])
                print(f"{prefix}: test ...", flush=True)
                if _run_logged(test, log) != 0:
                    record("failed", stage="test", error=last_error(log))
                    print(f"{prefix}: FAILED in test: {last_error(log)} (log: {log})", flush=True)
                    return
        except KeyboardInterrupt:
            record("interrupted")
            raise
        record("finished")
        row = run_row(run_dir, point)
        metric = self.sweep["metric"]["name"].split("/")[-1]
        score = row.get(f"test/{metric}")
        print(f"{prefix}: done in {row['wall_time_s']:.0f} s, test/{metric} {score if score is None else round(score, 2)}, "
              f"compression {row.get('compression') and round(row['compression'], 1)}x", flush=True)


def run_online(sweep_path: Path, sweep: dict, sweep_dir: Path, extra: list[str]) -> None:
    """Create (or join) the W&B sweep and run its agent; every DDP rank of a run is launched by Lightning
    from the agent's single command, so all ranks get the same arguments."""
    import wandb

    if extra:
        raise UserError("DATA_DIR/GPUS cannot be added to an online W&B sweep's command; put them in the "
                        f"sweep file's command ({sweep_path})")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    id_file = sweep_dir / "sweep_id"
    project = os.environ.get("WANDB_PROJECT", "dq-lightning")
    if id_file.exists():
        sweep_id = id_file.read_text().strip()
    else:
        sweep_id = wandb.sweep(sweep, project=project)
        id_file.write_text(sweep_id + "\n")
    env = {**os.environ, "DQ_SWEEP_DIR": str(sweep_dir),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.check_call([sys.executable, "-m", "wandb", "agent", "--project", project, sweep_id], env=env)


def report(sweep: dict, points: list[SweepPoint], sweep_dir: Path, teacher_dir: Path, name: str,
           wandb_mode: str) -> list[dict]:
    metric = sweep["metric"]["name"].split("/")[-1]
    rows = [run_row(sweep_dir / point.run_id, point) for point in points]
    known = {point.run_id for point in points}
    # Online agents name run directories by W&B run id; they belong to the report too.
    rows += [run_row(path) for path in sorted(sweep_dir.iterdir()) if path.is_dir()
             and path.name not in known and (path / "fit_metrics.json").exists()] if sweep_dir.exists() else []
    teacher = teacher_row(teacher_dir)
    all_rows = ([teacher] if teacher else []) + rows
    write_csv_atomic(all_rows, sweep_dir / "results.csv")
    png = plot_tradeoff(all_rows, metric, sweep_dir / "tradeoff.png", f"{name}: compression vs {metric}")
    print(markdown_table(all_rows, metric))
    print(f"\nresults: {sweep_dir / 'results.csv'}\nplot:    {png}")
    if wandb_mode != "disabled":
        try:
            log_wandb_summary(all_rows, metric, png, f"{name}-summary", sweep_dir, wandb_mode)
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
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        get_task(args.task)
        if args.scale not in SCALES:
            raise UserError(f"unknown scale {args.scale!r}; choose from {', '.join(SCALES)}")
        if args.data_dir and not Path(args.data_dir).is_dir():
            raise UserError(f"--data-dir {args.data_dir}: no such directory")
        path = Path(args.sweep_file) if args.sweep_file else sweep_file(args.task, args.scale)
        sweep = load_sweep(path)
        points = expand_grid(sweep, path)
        sweep_dir = sweep_dir_of(Path(args.runs), args.task, args.scale)
        name = f"{args.task}-{args.scale}"
        teacher_dir = Path(args.runs) / args.task / f"teacher-{args.scale}"
        wandb_mode = resolve_wandb_mode("auto")
        extra = [f"--data.data_dir={args.data_dir}"] if args.data_dir else []
        if args.gpus:
            extra += ["--trainer.accelerator=gpu", f"--trainer.devices={args.gpus}", "--trainer.strategy=ddp"]
        if not args.report_only:
            check_parameters(sweep, path, points)
            print(f"sweep {path}: {len(points)} runs, W&B {wandb_mode}, results in {sweep_dir}", flush=True)
            started = time.time()
            if wandb_mode == "online":
                run_online(path, sweep, sweep_dir, extra)
            else:
                LocalSweep(sweep, points, sweep_dir, name, extra).run()
            print(f"sweep wall time: {time.time() - started:.0f} s", flush=True)
        report(sweep, points, sweep_dir, teacher_dir, name, wandb_mode)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nsweep interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    return 0
