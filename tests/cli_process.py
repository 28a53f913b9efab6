"""`python -m dq_lightning ...` in its own process, forked from a server that has already imported Lightning.

A fresh interpreter spends about 6 of its 7 seconds importing torch, Lightning and transformers before it
reads its first flag, and the suite runs over a hundred CLI commands. Each one here is still its own process
with the test's argv, environment, working directory and stdio files, running `dq_lightning.__main__` as
`__main__`, exiting through `sys.exit` and the `atexit` hooks (W&B's), with its exit code; the one difference
from a typed command is that those libraries were imported before the environment was set, so only variables
read at import time (the server's: the suite's offline Hub and W&B settings) cannot vary per command.
A command whose environment changes a `PYTHON*` variable, the commands of tests marked slow (DDP ranks,
kills; see conftest.py), and every command under `DQ_TEST_FRESH_PROCESS=1` run in a fresh interpreter.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

PRELOAD = ["torch", "lightning.pytorch", "transformers", "datasets", "torchmetrics", "wandb", "dq_lightning.cli",
           "dq_lightning.sweep.runner", "dq_lightning.export.export", "dq_lightning.export.predict"]
_context = None


def _as_main(args: list[str], cwd: str, env: dict, stdout_path: str, stderr_path: str) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, stdout_path, os.O_WRONLY), (2, stderr_path, os.O_WRONLY)):
        opened = os.open(path, mode)
        os.dup2(opened, fd)
        os.close(opened)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as a fresh interpreter sets it up
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.path[0:0] = [cwd]  # as `python -m` puts the working directory first
    if env.get("OMP_NUM_THREADS", "").isdigit():
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))  # read by the OpenMP runtime when it loaded
    # wandb made its media folder (tables, images) when the server imported it, and removes it at exit: the
    # first child to exit would remove it for every later one. Each child keeps it and leaves it in place.
    from wandb.sdk.data_types._private import MEDIA_TMP

    MEDIA_TMP._finalizer.detach()
    os.makedirs(MEDIA_TMP.name, exist_ok=True)
    sys.argv = [str(Path(cwd) / "dq_lightning" / "__main__.py"), *args]
    code = 0
    try:
        runpy.run_module("dq_lightning", run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            code = exit_.code or 0
        else:
            print(exit_.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - as the interpreter would: the traceback on stderr, exit 1
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _sigint_at_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # the interpreter then installs its KeyboardInterrupt handler


def run_cli_process(args: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "dq_lightning", *args]
    # PYTHON* variables (a sitecustomize on PYTHONPATH, say) act when an interpreter starts: they need a fresh one.
    startup = any(env.get(key) != os.environ.get(key) for key in {*env, *os.environ} if key.startswith("PYTHON"))
    if os.environ.get("DQ_TEST_FRESH_PROCESS") or startup:
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env,
                              preexec_fn=_sigint_at_default)
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    with tempfile.TemporaryDirectory(prefix="dq_cli_") as folder:
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        out.touch()
        err.touch()
        process = _context.Process(target=_as_main, args=(list(args), str(cwd), dict(env), str(out), str(err)))
        process.start()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(command, timeout, out.read_bytes(), err.read_bytes())
        read = lambda path: path.read_bytes().decode("utf-8", errors="replace")  # noqa: E731
        return subprocess.CompletedProcess(command, process.exitcode, read(out), read(err))
