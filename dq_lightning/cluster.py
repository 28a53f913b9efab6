"""What a run on a cluster needs beyond Lightning's own SLURM and torchrun support.

- `resume_path`: the file `--ckpt_path last` stands for, found from the config before anything is built, so that
  it is checked like a checkpoint given by path (a damaged one is one error line). It also considers the
  checkpoint Lightning writes when SLURM warns of the end of a job (`#SBATCH --signal=SIGUSR1@90`:
  `hpc_ckpt_<n>.ckpt` in the run directory, then `scontrol requeue`). Lightning's `last` only looks at the
  `last*.ckpt` of the checkpoint callbacks, so a requeued job would go back to the last periodic save (up to
  500 steps at paper scale) and never read the checkpoint written for it; here the newest of both is resumed,
  and with neither, the newest checkpoint of the run's folders (Lightning would start from scratch beside them).
- `with_agent_args`: the runs a W&B agent starts take their command from the sweep stored on the W&B server,
  the same for every agent. `DQ_SWEEP_ARGS` (shell words, e.g. `--trainer.devices=4 --data.data_dir=...`) set
  in an agent's environment is appended to each of its runs' command lines: GPUs and data are the machine's,
  not the sweep's (experiments/cluster/slurm-sweep.sbatch sets it for its agents).
- `create_sweep` (`python -m dq_lightning.cluster sweep-id`, `make sweep-id`): create a task's W&B sweep once,
  its id where the sweep runner keeps it, for one `wandb agent` per machine.
- `torchrun` (`python -m dq_lightning.cluster torchrun`, what `make fit NODES=n` runs): torchrun's own
  launcher, after refusing what cannot work (a NODES or GPUS that is not a positive number, GPUs this machine
  lacks, no MASTER_ADDR for several nodes), with a rendezvous that gives up after `--timeout` seconds with one
  line naming the endpoint and the nodes it waited for; torchrun would wait, then print a traceback.
- `rendezvous_error`: the same one line when the DDP processes' own rendezvous (Lightning's, under SLURM or
  with its own launcher) times out.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from dq_lightning.errors import UserError, command_line, first_line

AGENT_ARGS_ENV = "DQ_SWEEP_ARGS"


def launched_by_agent(environ=os.environ) -> bool:
    """Whether this process is a run started by `wandb agent` for a dq_lightning sweep."""
    return bool(environ.get("WANDB_SWEEP_ID") and environ.get("DQ_SWEEP_DIR"))


def with_agent_args(argv: list[str]) -> list[str]:
    """`argv` with the agent's `DQ_SWEEP_ARGS` appended (last, so they win over the sweep's flags).

    When `argv` is this process's command line, `sys.argv` is extended too and the variable removed from the
    environment: Lightning starts the other DDP processes from `sys.argv` with this environment, so each gets
    the arguments exactly once.
    """
    text = os.environ.get(AGENT_ARGS_ENV, "")
    if not text.strip() or not launched_by_agent():
        return argv
    extra = shlex.split(text)
    if argv == sys.argv[1:]:
        sys.argv[1:] = [*argv, *extra]
        os.environ.pop(AGENT_ARGS_ENV, None)
        return sys.argv[1:]
    return [*argv, *extra]


def _checkpoints_in(directories: list[Path], last_only: bool) -> list[Path]:
    """The `*.ckpt` files of `directories`; with `last_only`, the ones Lightning's `ckpt_path="last"` chooses
    from (`*last*.ckpt`)."""
    found = [path for directory in directories if directory.is_dir() for path in directory.iterdir()
             if path.is_file() and path.suffix == ".ckpt" and ("last" in path.name or not last_only)]
    return sorted(set(found))


def hpc_checkpoints(root) -> list[Path]:
    """Lightning's SLURM requeue checkpoints (`hpc_ckpt_<n>.ckpt`) in a run directory."""
    directory = Path(root)
    return sorted(directory.glob("hpc_ckpt_*.ckpt")) if directory.is_dir() else []


def resume_path(trainer_config, ckpt_path):
    """`ckpt_path` with "last" replaced by the file it stands for in the run of `trainer_config` (the parsed
    trainer settings: its folder and checkpoint callbacks): the newest of every `last*.ckpt` and the requeue
    checkpoints; when there are neither (a run killed before its first periodic save, or saving only its best
    epochs), the newest other checkpoint of its folders, said on stderr: Lightning would start again from
    scratch beside them. "last" when the run has no checkpoint yet (Lightning then starts from scratch); any
    other value unchanged."""
    from dq_lightning.run_folder import checkpoint_dirs, is_other_rank

    if ckpt_path != "last":
        return ckpt_path
    directories = checkpoint_dirs(trainer_config)
    candidates = _checkpoints_in(directories, last_only=True) + hpc_checkpoints(
        trainer_config.get("default_root_dir") or ".")
    if not candidates:
        others = _checkpoints_in(directories, last_only=False)
        if not others:
            return ckpt_path
        newest = max(others, key=lambda path: path.stat().st_mtime)
        if not is_other_rank():
            print(f"--ckpt_path=last: no last checkpoint in {newest.parent}; resuming from {newest.name}, the "
                  "newest checkpoint there", file=sys.stderr)
        return str(newest)
    return str(max(candidates, key=lambda path: path.stat().st_mtime))


def create_sweep(task: str, scale: str, runs: str = "runs", sweep_path: str | None = None) -> str:
    """The W&B sweep of `task` at `scale`: created once, its id kept where `python -m dq_lightning sweep` keeps
    it (`<runs>/<task>/sweep[-<scale>]/sweep_id`), so agents on other machines, a later `make sweep` and
    `make report` all use the same sweep. An existing id is returned as it is."""
    from dq_lightning.loggers import resolve_wandb_mode
    from dq_lightning.sweep.spec import sweep_dir_of, sweep_file
    from dq_lightning.sweep.spec import expand_grid, load_sweep

    path = Path(sweep_path) if sweep_path else sweep_file(task, scale)
    sweep = load_sweep(path)
    id_file = sweep_dir_of(Path(runs), task, scale) / "sweep_id"
    if id_file.exists() and id_file.read_text().strip():
        return id_file.read_text().strip()
    if resolve_wandb_mode("auto") != "online":
        raise UserError("creating a W&B sweep needs a W&B login (`wandb login` or WANDB_API_KEY); without one, "
                        "run offline workers instead (python -m dq_lightning sweep, one per machine)")
    if sweep.get("method") == "grid":
        expand_grid(sweep, path)  # the same checks of the grid as an offline sweep
    import wandb

    sweep_id = wandb.sweep(sweep, project=os.environ.get("WANDB_PROJECT", "dq-lightning"))
    id_file.parent.mkdir(parents=True, exist_ok=True)
    staging = id_file.with_name(f".sweep_id.{os.getpid()}")
    staging.write_text(sweep_id + "\n")
    os.replace(staging, id_file)
    return sweep_id


RENDEZVOUS_ID = "dq-lightning"


def _positive(value: str, name: str, what: str) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        number = 0
    if number < 1:
        raise UserError(f"{name}={value}: give a positive whole number of {what}")
    return number


def torchrun_command(nodes: str, gpus: str, master: str | None, timeout: str) -> list[str]:
    """torchrun's arguments for `nodes` nodes of `gpus` processes, checked first: one error line for what
    cannot work instead of a traceback from the launcher or a rendezvous that waits for nodes never started."""
    from dq_lightning.devices import check_gpu_request

    node_count = _positive(nodes, "NODES", "nodes")
    if not str(gpus or "").strip():
        raise UserError(f"NODES={nodes} needs GPUS=<GPUs per node> (torchrun's --nproc-per-node)")
    gpu_count = _positive(gpus, "GPUS", "GPUs per node")
    seconds = _positive(timeout, "RDZV_TIMEOUT", "seconds to wait for the other nodes")
    command = [f"--nnodes={node_count}", f"--nproc-per-node={gpu_count}"]
    if node_count == 1:
        command.append("--standalone")
    else:
        host, _, port = (master or "").rpartition(":") if ":" in (master or "") else (master or "", "", "29500")
        if not host:
            raise UserError(f"NODES={nodes} needs MASTER_ADDR=<host name of the first node> (run the same command "
                            "on every node)")
        _positive(port, "MASTER_PORT", "the rendezvous port")
        command += ["--rdzv-backend=c10d", f"--rdzv-endpoint={host}:{port}", f"--rdzv-id={RENDEZVOUS_ID}",
                    f"--rdzv-conf=join_timeout={seconds}"]
    check_gpu_request("gpu", gpu_count, f"GPUS={gpus}", no_gpu_hint="; leave GPUS and NODES unset to train on the CPU")
    return command


def run_torchrun(launcher_args: list[str], program: list[str]) -> int:
    """torchrun (`torch.distributed.run`) of `python -m dq_lightning <program>`; a rendezvous that times out is
    a `UserError` naming what it waited for."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args([*launcher_args, "-m", "dq_lightning", *program])
    try:
        run(args)
    except RendezvousTimeoutError:
        settings = dict(arg.removeprefix("--").split("=", 1) for arg in launcher_args if "=" in arg)
        seconds = settings.get("rdzv-conf", "").partition("=")[2]
        raise UserError(f"the rendezvous at {settings.get('rdzv-endpoint')} (id {RENDEZVOUS_ID}) waited {seconds} s "
                        f"for NODES={settings.get('nnodes')} nodes and not all came: run the same make fit command "
                        f"on every node, with MASTER_ADDR a host name of the first node that the others can "
                        f"reach on its MASTER_PORT (RDZV_TIMEOUT=seconds waits longer)") from None
    except ChildFailedError:
        return 1  # each process printed its own error
    return 0


def rendezvous_error(error: BaseException) -> str | None:
    """One line for a DDP process-group rendezvous that timed out (torch's DistStoreError: "Timed out after N
    seconds waiting for clients. 1/2 clients joined."), naming where it waited and for how many processes;
    None for any other error."""
    import torch.distributed as dist

    store_error = getattr(dist, "DistStoreError", None)
    while error is not None and not (store_error is not None and isinstance(error, store_error)):
        error = error.__cause__ or error.__context__
    if error is None:
        return None
    address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    world = os.environ.get("WORLD_SIZE") or "all"
    return (f"the DDP processes' rendezvous at {address} gave up waiting for {world} processes "
            f"({first_line(error)}): start every process of the run (every node's job, or one per GPU), with "
            f"the same MASTER_ADDR and MASTER_PORT, reachable from the others")


@command_line
def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dq_lightning.cluster",
                                     description="Cluster helpers. sweep-id: create a task's W&B sweep once "
                                                 "and print its id (for `wandb agent` on several machines). "
                                                 "torchrun: start `python -m dq_lightning <args after -->` on "
                                                 "this node of a multi-node run (make fit NODES=n).")
    parser.add_argument("command", choices=["sweep-id", "torchrun"])
    parser.add_argument("--task", default="demo")
    parser.add_argument("--scale", default="paper")
    parser.add_argument("--sweep-file")
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--nodes", default="", help="torchrun: nodes of the run (make: NODES)")
    parser.add_argument("--gpus", default="", help="torchrun: GPUs (processes) per node (make: GPUS)")
    parser.add_argument("--master", default="", help="torchrun: host[:port] of the first node (make: MASTER_ADDR, "
                                                     "MASTER_PORT)")
    parser.add_argument("--timeout", default="600", help="torchrun: seconds the rendezvous waits for every node "
                                                         "(make: RDZV_TIMEOUT)")
    argv = list(sys.argv[1:] if argv is None else argv)
    program = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.command == "torchrun":
        if not program:
            raise UserError("torchrun: give the dq_lightning command after --, e.g. -- fit --config <file>")
        return run_torchrun(torchrun_command(args.nodes, args.gpus, args.master, args.timeout), program)
    print(create_sweep(args.task, args.scale, args.runs, args.sweep_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
