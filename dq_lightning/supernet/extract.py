"""`python -m dq_lightning extract`: one point of a supernet as an ordinary DQ student checkpoint.

The checkpoint is what a `DQStudentModule` fit of that point would have saved (its hyper-parameters, its
prepared student's latent weights, a thinner student's kept units), so `test --ckpt_path`, `export`, `predict`
and `robustness` take it unchanged; its `supernet` entry says where it came from. Its weights are the
sub-network's slices of the supernet, bit for bit, so the extracted student computes what the supernet's
sub-network computed.

    python -m dq_lightning extract --ckpt runs/xsum/supernet-tiny/checkpoints/last.ckpt --bits 2-2-8 --depth 6-3 \\
        --out runs/xsum/supernet-tiny/extracted/2-2-8_6-3.ckpt

`--ckpt` may also be the supernet's run folder: a grid point whose best student the fit kept
(`<run>/subnets/<point>.ckpt`, its best validation during the fit) is taken from there, any other point is
extracted from `<run>/checkpoints/last.ckpt`. `--fit-metrics FILE` also writes what a fit of that student would
leave as `fit_metrics.json` (its validation metrics at that best, its summary), for a sweep's report.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from dq_lightning.errors import UserError, command_line

from dq_lightning.supernet.checkpoint import SUBNETS_DIR, save_student_checkpoint

SUPERNET_CLASS = "dq_lightning.modules.supernet.DQSupernetModule"


def load_supernet(path: str | Path, teacher: str | None = None):
    """The `DQSupernetModule` of a supernet checkpoint, rebuilt from its hyper-parameters and stored grid, its
    latent weights and width scores loaded. Returns (module, checkpoint)."""
    from dq_lightning.checkpoints import module_class, read_checkpoint_file
    from dq_lightning.modules.supernet import DQSupernetModule

    path = Path(path).expanduser()
    checkpoint = read_checkpoint_file(path)
    saved = module_class(checkpoint) if isinstance(checkpoint, dict) else None
    if saved != SUPERNET_CLASS or "supernet" not in checkpoint:
        what = f"it holds a {saved.rpartition('.')[2]}" if saved else "no module class recorded"
        raise UserError(f"--ckpt {path}: not a supernet checkpoint ({what}); extract takes the checkpoint of a "
                        "DQSupernetModule fit (experiments/<task>/supernet-*.yaml)")
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
    hparams["grid"] = checkpoint["supernet"]["grid"]  # as resolved when it trained: no sweep file needed now
    if teacher is not None:
        hparams["teacher"] = str(teacher)
    module = DQSupernetModule(**hparams)
    module.on_load_checkpoint(checkpoint)
    prefix = "model."
    module.model.load_state_dict({k[len(prefix):]: v for k, v in checkpoint["state_dict"].items()
                                  if k.startswith(prefix)})
    return module.eval(), checkpoint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dq_lightning extract",
                                     description="Write one point of a supernet as an ordinary DQ student "
                                                 "checkpoint (test, export, predict and robustness take it).")
    parser.add_argument("--ckpt", required=True, help="a supernet checkpoint (DQSupernetModule fit)")
    parser.add_argument("--bits", required=True, metavar="W-E-A", help="the point's bits, e.g. 2-2-8 (one the "
                        "supernet trained)")
    parser.add_argument("--depth", metavar="E-D", help="encoder-decoder layers, e.g. 6-3 (default: the teacher's)")
    parser.add_argument("--width", help="a thinner point's width as the grid names it (heads=3,ffn=512); default "
                        "the teacher's")
    parser.add_argument("--out", required=True, help="the student checkpoint to write (.ckpt)")
    parser.add_argument("--teacher", help="the teacher directory, if it moved since the supernet trained")
    parser.add_argument("--fit-metrics", metavar="FILE", help="also write the student's fit_metrics.json there "
                        "(for sweep reports)")
    return parser


def resolve_point(supernet, bits: str, depth: str | None, width: str | None):
    """The `SubNet` to extract: bits and width among the trained ones, a depth the teacher has."""
    from dq_lightning.quant.config import parse_wea
    from dq_lightning.supernet.grid import SubNet, check_depth

    try:
        parse_wea(bits)
    except UserError as error:
        raise UserError(f"--bits {bits}: {error}") from None
    trained_bits = sorted({subnet.bits for subnet in supernet.grid})
    if bits not in trained_bits:
        raise UserError(f"--bits {bits}: the supernet trained no {bits} sub-network; its bits: "
                        f"{', '.join(trained_bits)}")
    config = supernet.factory.teacher.config
    layers = (config.encoder_layers, config.decoder_layers)
    depth = check_depth(depth or f"{layers[0]}-{layers[1]}", layers, f"--depth {depth}")
    trained_widths = {subnet.width for subnet in supernet.grid}
    if width is not None and width not in trained_widths:
        known = ", ".join(sorted(w for w in trained_widths if w)) or "none"
        raise UserError(f"--width {width}: the supernet trained no such width; its widths: {known} (or omit "
                        "--width for the teacher's)")
    return SubNet(bits, depth, width)


@command_line
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out).expanduser()
    if out.suffix != ".ckpt":
        raise UserError(f"--out {args.out}: give a .ckpt file name")
    if out.exists() and not out.is_file():
        raise UserError(f"--out {args.out}: exists and is not a file")
    if not os.access(out.parent if out.parent.exists() else Path.cwd(), os.W_OK):
        raise UserError(f"--out {args.out}: its folder is not writable")
    source = Path(args.ckpt).expanduser()
    run_dir = source if source.is_dir() else None
    if run_dir is not None:
        source = run_dir / "checkpoints" / "last.ckpt"
        if not source.is_file():
            raise UserError(f"--ckpt {args.ckpt}: a folder without checkpoints/last.ckpt (not a supernet run)")
    supernet, checkpoint = load_supernet(source, args.teacher)
    supernet.run_dir = str((run_dir or source.parent.parent).resolve())
    subnet = resolve_point(supernet, args.bits, args.depth, args.width)
    best = _best_of(run_dir, checkpoint).get(subnet.key) if run_dir is not None else None
    kept = run_dir / SUBNETS_DIR / f"{subnet.key}.ckpt" if run_dir is not None else None
    if best is not None and kept.is_file():
        _copy_atomic(kept, out)
        origin = f"its best student of the fit ({best['metric']} {best['score']:.4g} at step {best['step']})"
    else:
        save_student_checkpoint(supernet, subnet, out, checkpoint.get("datamodule_hyper_parameters") or {},
                                (checkpoint.get("epoch", 0), checkpoint.get("global_step", 0)))
        origin = f"the supernet at step {checkpoint.get('global_step', 0)}"
    if args.fit_metrics:
        write_fit_metrics(Path(args.fit_metrics), out, best, checkpoint)
    trained = "a trained point" if subnet in supernet.grid else "not a trained point: its layers and widths " \
                                                                 "were trained inside other sub-networks"
    print(f"extracted {subnet.name} ({trained}) from {origin} to {out}")
    return 0


def _best_of(run_dir: Path, checkpoint: dict) -> dict:
    """Each point's best, as `subnets/best.json` records it: written with the points' students, it is the record
    of the checkpoints in `subnets/`. `last.ckpt` may be older: written when the last training batch ended, it
    misses a validation that ran after it at the same step (found on the xsum supernet: its last.ckpt held the
    epoch-2 bests while `subnets/` held the epoch-4 students)."""
    from dq_lightning.files import read_json

    return {**(checkpoint["supernet"].get("best") or {}), **read_json(run_dir / SUBNETS_DIR / "best.json")}


def _copy_atomic(source: Path, target: Path) -> None:
    import shutil

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.copyfile(source, staging)
    os.replace(staging, target)


def write_fit_metrics(path: Path, student_checkpoint_path: Path, best: dict | None, supernet_checkpoint: dict) -> None:
    """`fit_metrics.json` as a fit of the extracted student would leave it: its validation metrics at the best
    the supernet kept for it, its summary (what it is, `source: supernet`), its checkpoint."""
    from dq_lightning.export.checkpoint import load_student
    from dq_lightning.files import write_json_atomic

    module, checkpoint = load_student(student_checkpoint_path, quantized=False)
    stored = supernet_checkpoint["supernet"]
    summary = {**module.run_summary(), "source": "supernet", "subnet": checkpoint["supernet"]["subnet"],
               "supernet_run": checkpoint["supernet"].get("run"),
               "supernet_subnet_passes": stored.get("subnet_passes"),
               "supernet_global_step": supernet_checkpoint.get("global_step")}
    write_json_atomic(path, {
        "monitor": best["metric"] if best else None, "best": best["score"] if best else None,
        "metrics": {**(best or {}).get("metrics", {}), **({"epoch": best["epoch"], "step": best["step"]} if best
                                                          else {})},
        # No fit ran for this student: its steps and time are the supernet's (summary), not its own.
        "best_model_path": str(student_checkpoint_path), "last_model_path": "", "global_step": 0,
        "wall_time_s": 0.0, "summary": summary})
