"""One run per run folder, one process training into it, and a run folder the run can write.

A second `fit` into a folder that holds an earlier run's checkpoints mixes two runs: Lightning versions the
new files beside the old ones (`last-v1.ckpt` next to the earlier `last.ckpt`, which `--ckpt_path=last` may then
pick), and `config.yaml`, `fit_metrics.json` and `hf/` end up from whichever run wrote last. So a fit there is
refused unless it continues that run (`--ckpt_path=last`, or a checkpoint inside the folder), or the user asks
to start over with `--replace_run=true`, which first moves the earlier run to `<folder>.replaced-<time>`
(renamed, never deleted). And two fits started together into a folder that holds nothing yet would both pass
that check: so a fit first claims its folder (`claim_run_folder`, atomically, as sweep workers claim grid
points) and holds the claim until it ends; a second one is refused while the first runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from dq_lightning import claims
from dq_lightning.errors import UserError

REPLACE_FLAG = "--replace_run=true"
# Lightning's keywords for a checkpoint of the run being configured (its own checkpoint callbacks' files).
OWN_CHECKPOINT_KEYWORDS = ("last", "best", "hpc")


def checkpoint_dirs(trainer_config: dict) -> list[Path]:
    """Where this run's ModelCheckpoint callbacks write, from the resolved trainer config.

    `<default_root_dir>/checkpoints` is always included: it is Lightning's default without a logger, and the
    shipped configs' choice.
    """
    root = trainer_config.get("default_root_dir") or "."
    dirs = [Path(root) / "checkpoints"]
    for callback in trainer_config.get("callbacks") or []:
        # Namespaces (or dicts) with class_path and init_args; callbacks given as objects have no config here.
        if not hasattr(callback, "get") or not _is_model_checkpoint(str(callback.get("class_path", ""))):
            continue
        dirpath = (callback.get("init_args") or {}).get("dirpath")
        if dirpath:
            dirs.append(Path(str(dirpath)))
    unique = []
    for path in dirs:
        if all(path.absolute() != other.absolute() for other in unique):
            unique.append(path)
    return unique


def output_dirs(trainer_config: dict) -> dict[str, str]:
    """Every folder the run writes into, from the resolved trainer config, each with the setting that names
    it: the run folder, every callback's `dirpath` (checkpoints, the exported best model, metrics files) and
    every logger's `save_dir`."""
    root = str(trainer_config.get("default_root_dir") or ".")
    found = {root: "--trainer.default_root_dir"}
    loggers = trainer_config.get("logger")
    loggers = loggers if isinstance(loggers, list) else [loggers]
    for section, entries, key in (("callbacks", trainer_config.get("callbacks") or [], "dirpath"),
                                  ("logger", loggers, "save_dir")):
        for entry in entries:
            init_args = entry.get("init_args") if hasattr(entry, "get") else None
            value = init_args.get(key) if hasattr(init_args, "get") else None
            if value:
                name = str(entry.get("class_path", "")).rpartition(".")[2] or section
                found.setdefault(str(value), f"trainer.{section} {name}.{key}")
    return found


def replace_own_files(trainer_config) -> None:
    """Make the ModelCheckpoint callbacks replace a file of the same name instead of writing `last-v1.ckpt`
    beside it. A folder holds one run, so a name already taken is this run's own earlier file: a run resumed
    after its folder was moved or copied (the checkpoint's callback state names the old path) would otherwise
    leave two `last` files, and `--ckpt_path=last` picks the newer one by time. Saves are atomic
    (`AtomicCheckpointIO`), so replacing never costs the previous file."""
    for callback in trainer_config.get("callbacks") or []:
        if hasattr(callback, "get") and _is_model_checkpoint(str(callback.get("class_path", ""))):
            if callback.get("init_args") is None:
                callback["init_args"] = {}
            callback["init_args"]["enable_version_counter"] = False


def _is_model_checkpoint(class_path: str) -> bool:
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        from lightning.pytorch.callbacks import ModelCheckpoint

        return issubclass(getattr(importlib.import_module(module), name), ModelCheckpoint)
    except Exception:  # noqa: BLE001 - a class that cannot be imported is the parser's to report
        return name.endswith("ModelCheckpoint")


def earlier_run(root: Path, ckpt_dirs: list[Path]) -> list[Path]:
    """The files showing that an earlier fit ran here: its checkpoints (with Lightning's SLURM requeue
    checkpoints, `hpc_ckpt_<n>.ckpt` in the folder itself) and its `fit_metrics.json`."""
    found = [path for directory in ckpt_dirs if directory.is_dir() for path in sorted(directory.glob("*.ckpt"))]
    found += sorted(root.glob("hpc_ckpt_*.ckpt")) if root.is_dir() else []
    if (root / "fit_metrics.json").is_file():
        found.append(root / "fit_metrics.json")
    return found


def continues_this_run(ckpt_path, ckpt_dirs: list[Path]) -> bool:
    """Whether `--ckpt_path` resumes the run in this folder (then Lightning keeps writing `last.ckpt`, not
    `last-v1.ckpt`: the restored callback state knows the file)."""
    if ckpt_path is None:
        return False
    path = str(ckpt_path)
    if path in OWN_CHECKPOINT_KEYWORDS:
        return True
    resolved = Path(path).expanduser().resolve()
    return any(resolved.parent == directory.resolve() for directory in ckpt_dirs)


def _own_locations(root: Path, ckpt_dirs: list[Path]) -> list[Path]:
    return [*ckpt_dirs, root]  # the folder itself holds the requeue checkpoints


def is_other_rank() -> bool:
    """Whether this process is a DDP/SLURM rank other than the first: rank 0 alone checks and moves the run
    folder, before it launches or meets the others (they would otherwise see or move its new files)."""
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"):
        try:
            if int(os.environ.get(name, "0")) != 0:
                return True
        except ValueError:
            continue
    return False


def check_run_folder(trainer_config: dict, ckpt_path, replace: bool) -> list[Path]:
    """Refuse a fit that would mix its files with an earlier run's; return the locations to move aside first
    (with `replace`), else []."""
    root = Path(trainer_config.get("default_root_dir") or ".")
    ckpt_dirs = checkpoint_dirs(trainer_config)
    found = earlier_run(root, ckpt_dirs)
    own = _own_locations(root, ckpt_dirs)
    if replace and continues_this_run(ckpt_path, own):
        raise UserError(f"{REPLACE_FLAG} moves the earlier run away, and --ckpt_path={ckpt_path} continues it: "
                        f"give one of them")
    if not found or (continues_this_run(ckpt_path, own) and not replace):
        return []
    if replace:
        if root.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
            raise UserError(f"{REPLACE_FLAG}: the run folder --trainer.default_root_dir={root} is the current "
                            f"directory or holds it; choose a run folder of its own")
        outside = [d for d in ckpt_dirs if d.is_dir() and not _inside(d, root) and any(d.glob("*.ckpt"))]
        return [root, *outside]
    shown = ", ".join(_relative(path, root) for path in found[:3]) + (", ..." if len(found) > 3 else "")
    other = f" (--ckpt_path={ckpt_path} is not one of its checkpoints)" if ckpt_path else ""
    raise UserError(f"--trainer.default_root_dir={root} holds an earlier run ({shown}){other}: continue it with "
                    f"--ckpt_path=last, or start over with {REPLACE_FLAG}, which first moves it to "
                    f"{root}.replaced-<time>; nothing was written")


def claim_run_folder(root) -> claims.Claim:
    """Claim the run folder `root` for this process's fit, atomically; refuse it while another live process
    holds it (a claim left by a killed fit is taken over). The claim is released when this process exits."""
    import atexit

    folder = Path(str(root or "."))
    try:
        claim = claims.acquire(folder.absolute().parent, claims.claim_beside(folder))
    except OSError as error:
        raise UserError(f"--trainer.default_root_dir={folder}: cannot claim it for this fit "
                        f"({error.strerror or error})") from None
    if not isinstance(claim, claims.Claim):
        raise UserError(f"--trainer.default_root_dir={folder}: another fit is training into it "
                        f"({claims.describe(claim)}, since {claim.get('claimed_at', '?')}); wait for it to end or "
                        "choose another folder; nothing was written")
    atexit.register(claim.release)
    return claim


def move_aside(paths: list[Path]) -> list[tuple[Path, Path]]:
    """Rename each of `paths` to `<path>.replaced-<time>` (kept, never deleted); return (from, to) pairs."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for path in paths:
        if not path.exists():
            continue
        target, number = path.with_name(f"{path.name}.replaced-{stamp}"), 1
        while target.exists():
            target, number = path.with_name(f"{path.name}.replaced-{stamp}-{number}"), number + 1
        try:
            path.rename(target)
        except OSError as error:
            raise UserError(f"{REPLACE_FLAG}: cannot move {path} to {target.name} "
                            f"({error.strerror or error})") from None
        moved.append((path, target))
    return moved


def check_writable(path, flag: str) -> None:
    """Refuse a directory the run could not create or write in (found now, not at the first checkpoint after
    hours of training): below a file, or without write permission on it or its nearest existing parent."""
    target = Path(str(path)).expanduser().absolute()
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag}={path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == target else f"cannot be created: {existing} is not writable"
        raise UserError(f"{flag}={path}: {what} (permission denied)")


def _inside(path: Path, root: Path) -> bool:
    return path.resolve() == root.resolve() or root.resolve() in path.resolve().parents


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)
