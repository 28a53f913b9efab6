"""`python -m dq_lightning export`: a DQ student as a packed low-bit directory (`dq_lightning.export.export`) or as
an ONNX Runtime or CTranslate2 model (`dq_lightning.export.deploy`). The command line sits above both."""

from __future__ import annotations

import argparse

from dq_lightning.errors import UserError, command_line
from dq_lightning.export.export import export_student
from dq_lightning.export.manifest import WEIGHTS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dq_lightning export",
        description="Write a DQ student as a packed low-bit directory (--format packed: integer codes at their "
                    "width plus FP32 scales in safetensors, with config, tokenizer and a checksummed manifest; load "
                    "it with dq_lightning.export.load_packed or `python -m dq_lightning predict --model DIR`), or "
                    "as an ONNX Runtime or CTranslate2 model (--format onnx|ctranslate2, from a checkpoint, a "
                    "packed export or a full-precision Hugging Face directory such as the teacher; run it with "
                    "`predict --model DIR`).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", metavar="FILE", help="a DQStudentModule checkpoint (.ckpt)")
    source.add_argument("--model", metavar="DIR", help="--format onnx|ctranslate2 only: a packed export or a "
                        "Hugging Face model directory (e.g. the FP32 teacher)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the export directory to write")
    parser.add_argument("--format", default="packed", choices=("packed", "onnx", "ctranslate2"),
                        help="packed (default): this project's low-bit format; onnx: ONNX Runtime graphs with int8 "
                        "codes and the trained activation quantizers; ctranslate2: a CTranslate2 model with int8 "
                        "codes")
    parser.add_argument("--teacher", metavar="DIR", help="the teacher directory, if it moved since training "
                        "(default: the checkpoint's model.teacher)")
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer to ship (default: the teacher's; "
                        "--format packed only)")
    parser.add_argument("--task", metavar="NAME", help="task whose decoding settings (and, for mBART, language "
                        "codes) to ship (default: from the checkpoint, the export or the teacher directory)")
    return parser


@command_line
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.format != "packed":
        return _runtime_export(args)
    if args.model is not None:
        raise UserError(f"--model {args.model}: --format packed exports a student checkpoint (--ckpt FILE); "
                        "--model is for --format onnx or ctranslate2")
    manifest = export_student(args.ckpt, args.out, teacher=args.teacher, tokenizer=args.tokenizer, task=args.task)
    size = manifest["size"]
    total = sum(entry["bytes"] for entry in manifest["files"].values())
    lines = [f"wrote {args.out}: {manifest['model_class']} W-E-A {manifest['notation']}, "
             f"{len(manifest['student']['encoder_layer_map'])} encoder / "
             f"{len(manifest['student']['decoder_layer_map'])} decoder layers",
             f"  {WEIGHTS}: {size['weights_bytes'] / 2**20:.3f} MiB "
             f"(strict accounting {size['strict_bytes'] / 2**20:.3f} "
             f"MiB, x{size['weights_vs_strict']:.3f}); directory with tokenizer: {total / 2**20:.3f} MiB",
             f"  compression vs FP32 teacher: strict {size['strict_compression']:.2f}x, paper "
             f"{size['paper_compression']:.2f}x"]
    if size.get("teacher_file_bytes"):
        lines.append(f"  file ratio vs the teacher's model.safetensors: "
                     f"{size['teacher_file_bytes'] / size['weights_bytes']:.2f}x")
    print("\n".join(lines))
    return 0


def _runtime_export(args: argparse.Namespace) -> int:
    from dq_lightning.export.deploy import export_runtime

    if args.tokenizer is not None:
        raise UserError(f"--tokenizer {args.tokenizer}: --format {args.format} ships the tokenizer of its source "
                        "(export a packed directory with --tokenizer first)")
    manifest = export_runtime(args.format, args.out, model_dir=args.model, checkpoint=args.ckpt,
                              teacher=args.teacher, task=args.task)
    total = sum(entry["bytes"] for entry in manifest["files"].values())
    print(f"wrote {args.out}: {args.format} {manifest['model_class']} W-E-A {manifest['notation']}, "
          f"{total / 2**20:.3f} MiB\n  {manifest['quantizers']}")
    return 0
