"""`python -m dq_lightning predict --model DIR`: summarize or translate texts with an exported model.

    echo "Some article ..." | python -m dq_lightning predict --model runs/xsum/dq-tiny/packed
    python -m dq_lightning predict --model runs/xsum/dq-tiny/packed --input articles.txt --int8 > summaries.txt

Input: one text per line, from a file or stdin (`--input -`, the default), as UTF-8. Output: exactly one line
per input line on stdout, in order, as UTF-8, whatever a line holds:

- lines end at "\n" only (a "\r" before it is dropped); U+2028, U+0085, form feeds, a lone "\r" and the other
  characters `str.splitlines` breaks at are text inside a line, as for `wc -l` and `paste`;
- a blank (empty or whitespace-only) line gives an empty output line; a long line is truncated to the model's
  input length (`--max-source-length`);
- an output's whitespace runs, line breaks included, become one space, so an output is always one line;
- invalid UTF-8 is refused before anything is generated, with one `error:` line naming the file and line
  (`--invalid-utf8 error`, the default), or decoded with U+FFFD in place of each invalid byte sequence
  (`--invalid-utf8 replace`), still one output line per input line.

With more inputs than one batch, a progress bar goes to stderr.

`--model` is a packed export (`python -m dq_lightning export`), loaded and verified by `load_packed`; a plain
Hugging Face model directory (e.g. the FP32 teacher) also works, for comparison. Decoding follows the
directory's `generation_config.json` (the task's settings); `--num-beams`, `--max-length`,
`--max-new-tokens` override it.

How `predict` is routed: `python -m dq_lightning predict` is also the LightningCLI subcommand. It comes here
when there is no `--config`/`-c` and either `--model` names an existing directory or one of this tool's own
flags (`--input`, `--int8`) is given; everything else goes to LightningCLI (`--model` there is a class name or
a config file, never a directory).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dq_lightning.errors import UserError, command_line

OWN_FLAGS = ("--input", "--int8", "--runtime")


def routes_here(argv: list[str]) -> bool:
    """Whether `predict <argv>` is this tool's (see the module docstring) rather than LightningCLI's."""
    if any(arg in ("--config", "-c") or arg.startswith("--config=") for arg in argv):
        return False
    for index, arg in enumerate(argv):
        value = None
        if arg == "--model" and index + 1 < len(argv):
            value = argv[index + 1]
        elif arg.startswith("--model="):
            value = arg.split("=", 1)[1]
        if value is not None and Path(value).expanduser().is_dir():
            return True
    return any(arg == flag or arg.startswith(flag + "=") for arg in argv for flag in OWN_FLAGS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dq_lightning predict",
        description="Summarize or translate texts (one per line) with a packed export or a Hugging Face model "
                    "directory; exactly one output line per input line on stdout. Lines end at \\n only "
                    "(U+2028, U+0085, form feeds, lone \\r are text within a line); blank lines give empty "
                    "lines; line breaks and other whitespace runs in an output become one space. Input and "
                    "output are UTF-8.")
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="a packed export (python -m dq_lightning export) or a Hugging Face model directory")
    parser.add_argument("--input", default="-", metavar="FILE", help="text file, one input per line; - for stdin "
                        "(default)")
    parser.add_argument("--invalid-utf8", choices=("error", "replace"), default="error",
                        help="input that is not UTF-8: error (default) stops before generating, naming the file "
                        "and line; replace decodes each invalid byte sequence as U+FFFD and still gives one "
                        "output line per input line")
    parser.add_argument("--int8", action="store_true", help="run the quantized Linear layers as int8 GEMMs "
                        "(packed exports only; faster, close to but not token-identical with the FP32 path); the "
                        "same as --runtime int8")
    parser.add_argument("--runtime", choices=("torch", "int8", "onnx", "ctranslate2"),
                        help="torch: PyTorch, FP32 (dequantized codes; a packed export or a Hugging Face directory); "
                        "int8: PyTorch's int8 GEMMs (a packed export); onnx: ONNX Runtime; ctranslate2: CTranslate2 "
                        "(directories written by export --format onnx|ctranslate2). Default: the directory's own")
    parser.add_argument("--compute-type", metavar="TYPE", help="--runtime ctranslate2: CTranslate2's compute type "
                        "(default: the export's, int8 for a quantized student and float32 for a full-precision "
                        "model; float32 runs the int8 codes dequantized)")
    add_decoding_flags(parser)
    parser.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's)")
    parser.add_argument("--attn", choices=("eager", "sdpa"), help="attention implementation (default: the one "
                        "the model was trained with; eager keeps packed generations identical to the student's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def add_decoding_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of `generation_settings`, `source_length` and `predict`'s batches (shared with robustness)."""
    parser.add_argument("--num-beams", type=int, metavar="N", help="beam width (default: the model's "
                        "generation_config)")
    parser.add_argument("--max-length", type=int, metavar="N", help="maximum output length in tokens, start "
                        "token included (default: the model's generation_config)")
    parser.add_argument("--max-new-tokens", type=int, metavar="N", help="maximum generated tokens")
    parser.add_argument("--max-source-length", type=int, metavar="N", help="input tokens kept (default: the "
                        "task's, else the model's positions)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="texts per generate call "
                        "(default 8)")


def check_decoding_flags(args: argparse.Namespace) -> None:
    for flag, value in (("--num-beams", args.num_beams), ("--max-length", args.max_length),
                        ("--max-new-tokens", args.max_new_tokens), ("--batch-size", args.batch_size),
                        ("--max-source-length", args.max_source_length)):
        _positive(flag, value)


def source_length(model, task: dict, requested: int | None) -> int:
    """Input tokens kept: `requested`, else the length the model was trained with (its manifest or
    `dq_lightning.json`), else the model's positions; never more than those."""
    positions = model.config.max_position_embeddings
    return min(requested or task.get("max_source_length") or positions, positions)


def _positive(flag: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UserError(f"{flag} {value} must be a positive integer")


def read_texts(source: str, invalid_utf8: str = "error") -> list[str]:
    """The input lines of a file or stdin ("-"): split at b"\\n" only, so that the line count is what
    `wc -l` and the user see (text mode would also split at a lone "\\r", `str.splitlines` at U+2028, U+0085,
    form feeds, ...), each decoded as UTF-8 on its own so an invalid byte is reported with its line."""
    name = "<stdin>" if source == "-" else source
    if source == "-":
        data = sys.stdin.buffer.read()
    else:
        path = Path(source).expanduser()
        if not path.exists() or path.is_dir():
            raise UserError(f"--input {source}: no such file")
        try:
            data = path.read_bytes()
        except OSError as error:
            raise UserError(f"--input {source}: cannot read it ({error.strerror})") from None
    pieces = data.split(b"\n")
    if pieces[-1] == b"":
        pieces.pop()  # the newline ending the last line starts no other; an empty input has no lines
    texts = []
    for number, raw in enumerate(pieces, start=1):
        try:
            text = raw.decode("utf-8", errors="strict" if invalid_utf8 == "error" else "replace")
        except UnicodeDecodeError as error:
            raise UserError(f"--input {name}:{number}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column "
                            f"{error.start + 1}: {error.reason}); fix the line or pass --invalid-utf8 replace"
                            ) from None
        texts.append(text.removesuffix("\r"))
    return texts


def load_model(directory: str, int8: bool, attn: str | None, flag: str = "--model", runtime: str | None = None,
               threads: int | None = None, compute_type: str | None = None):
    """(model, tokenizer, task info) of a packed export, a Hugging Face directory or a runtime export
    (`--format onnx|ctranslate2`); errors name `flag`. The model has `config`, `generation_config` and
    `generate(input_ids=, attention_mask=, generation_config=)`."""
    from dq_lightning.models.directory import hf_directory_task_info
    from dq_lightning.export.deploy import load_runtime_model, read_deploy_manifest, require_runtime, runtime_of
    from dq_lightning.export.loading import load_packed
    from dq_lightning.export.manifest import MANIFEST
    from dq_lightning.models.loading import load_pretrained
    from dq_lightning.models.tokenizer import load_tokenizer

    path = Path(directory).expanduser()
    if not path.is_dir():
        raise UserError(f"{flag} {directory}: no such directory")
    if int8 and runtime not in (None, "int8"):
        raise UserError(f"--int8 and --runtime {runtime} contradict each other; give one")
    runtime = "int8" if int8 else runtime
    if runtime in ("onnx", "ctranslate2"):
        require_runtime(runtime, f"--runtime {runtime}")
    deployed = read_deploy_manifest(path, flag)
    if compute_type is not None and (runtime or (deployed and runtime_of(deployed))) != "ctranslate2":
        raise UserError(f"--compute-type {compute_type}: only --runtime ctranslate2 takes a compute type")
    if deployed is not None:
        model = load_runtime_model(path, deployed, runtime or runtime_of(deployed), threads, compute_type, flag)
        task = deployed.get("task") or {}
    elif runtime in ("onnx", "ctranslate2"):
        raise UserError(f"--runtime {runtime}: {flag} {directory} is not a --format {runtime} export; make one "
                        f"with python -m dq_lightning export --format {runtime} --model {directory} --out DIR")
    elif (path / MANIFEST).exists():
        model = load_packed(path, int8=runtime == "int8", attn_implementation=attn, flag=flag)
        task = model.dq_export.get("task") or {}
    elif not (path / "config.json").exists():
        raise UserError(f"{flag} {directory}: neither a packed export (no {MANIFEST}) nor a Hugging Face model "
                        "directory (no config.json)")
    else:
        if runtime == "int8":
            raise UserError(f"{flag} {directory}: --int8 needs a packed export (this directory has no "
                            f"{MANIFEST}; make one with python -m dq_lightning export)")
        model = load_pretrained(str(path), flag=flag, attn_implementation=attn or "eager").eval()
        task = hf_directory_task_info(path)
    tokenizer = load_tokenizer(str(path), flag=flag)
    if task.get("source_lang") and hasattr(tokenizer, "src_lang"):
        tokenizer.src_lang = task["source_lang"]
    return model, tokenizer, task


def encode_sources(tokenizer, texts: list[str], max_source_length: int, task: dict):
    """A padded batch of sources laid out as in training: mBART's `tokens </s> <lang>` when the tokenizer
    holds the task's language codes as plain tokens."""
    from dq_lightning.models.tokenizer import encode_texts, language_ids

    languages = language_ids(tokenizer, task.get("source_lang"), task.get("target_lang"))
    if not languages:
        return tokenizer(texts, truncation=True, max_length=max_source_length, padding=True, return_tensors="pt")
    return tokenizer.pad({"input_ids": encode_texts(tokenizer, texts, max_source_length, languages[0])},
                         return_tensors="pt")


def generation_settings(model, args: argparse.Namespace):
    config = model.generation_config.__class__.from_dict(model.generation_config.to_dict())
    if args.num_beams is not None:
        config.num_beams = args.num_beams
        if (getattr(config, "num_beam_groups", None) or 1) > args.num_beams:
            config.num_beam_groups = 1
    if args.max_length is not None:
        config.max_length = args.max_length
        config.max_new_tokens = None
    if args.max_new_tokens is not None:
        config.max_new_tokens = args.max_new_tokens
    limit = config.max_new_tokens or config.max_length
    if config.min_length and limit is not None and config.min_length > limit:
        config.min_length = limit
    return config


def predict(model, tokenizer, texts: list[str], generation, batch_size: int, max_source_length: int,
            progress: bool, out=None, task: dict | None = None) -> None:
    import torch
    from tqdm.auto import tqdm

    bar = tqdm(total=len(texts), unit="text", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        todo = [i for i, text in enumerate(chunk) if text.strip()]
        results = [""] * len(chunk)
        if todo:
            batch = encode_sources(tokenizer, [chunk[i] for i in todo], max_source_length, task or {})
            with torch.inference_mode():
                generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                           generation_config=generation)
            decoded = tokenizer.batch_decode(generated, skip_special_tokens=True)
            for i, text in zip(todo, decoded):
                # str.split() breaks at every character str.splitlines does (\n, \r, U+2028, U+0085, \x0c,
                # \x1c-\x1e, ...), so each output is one line for any reader.
                results[i] = " ".join(text.split())
        stream = out or sys.stdout
        stream.write("".join(line + "\n" for line in results))
        stream.flush()
        bar.update(len(chunk))
    bar.close()


@command_line
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_decoding_flags(args)
        _positive("--threads", args.threads)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        if not Path(args.model).expanduser().is_dir():
            raise UserError(f"--model {args.model}: no such directory")
        texts = read_texts(args.input, args.invalid_utf8)
        model, tokenizer, task = load_model(args.model, args.int8, args.attn, runtime=args.runtime,
                                            threads=args.threads, compute_type=args.compute_type)
        max_source = source_length(model, task, args.max_source_length)
        generation = generation_settings(model, args)
        if hasattr(sys.stdout, "reconfigure"):
            # UTF-8 and "\n" whatever the locale or PYTHONIOENCODING say: an output the terminal's encoding
            # cannot hold must not end the run with fewer lines than inputs.
            sys.stdout.reconfigure(encoding="utf-8", newline="\n")
        progress = not args.no_progress and len(texts) > args.batch_size
        predict(model, tokenizer, texts, generation, args.batch_size, max_source, progress, task=task)
    except BrokenPipeError:
        # The reader stopped early (`predict ... | head`): what it took was written; no traceback, and no
        # second one when Python flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell tool killed by the broken pipe would report
    return 0
