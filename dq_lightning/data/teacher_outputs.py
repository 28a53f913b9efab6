"""The teacher's outputs for unlabeled inputs: generated once, kept on disk, reused by every epoch and run.

An unlabeled input trains the student on the teacher's own output (sequence-level knowledge distillation, Kim
and Rush 2016): the output is the decoder input of both models and, optionally, a pseudo-reference. Beam search
is by far the most expensive part of that, so it runs once per input, before training, and its results are
kept under the DataModule's cache directory:

    <cache_dir>/teacher_outputs/<key>/info.json, chunk-000000.json, chunk-000001.json, ...

`key` covers everything the outputs depend on: the teacher (its files' names, sizes and times, or its Hub id),
the decoding settings, and the tokenized sources in order with the chunk size. The sources are generated in
fixed chunks of that many consecutive inputs (each chunk one `generate` batch), and each chunk is written
atomically once generated: a fit killed while generating keeps the chunks it finished, and the next start
generates the others in exactly the batches an uninterrupted start would have used, so the outputs (and every
loss after them) never depend on when a process was stopped. Runs with the same teacher, decoding and inputs
(a sweep's points over one labeled share) share the outputs. Under DDP each rank generates every world-size-th
missing chunk and the ranks exchange them.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from dq_lightning.files import write_json_atomic

Generate = Callable[[list[list[int]]], list[list[int]]]


def model_identity(name: str) -> dict[str, Any]:
    """What a model's outputs depend on besides decoding: a directory's files as they are now, else its name."""
    directory = Path(str(name)).expanduser()
    if not directory.is_dir():
        return {"model": str(name)}
    files = {path.name: [stat.st_size, stat.st_mtime_ns] for path in sorted(directory.iterdir())
             if path.is_file() for stat in (path.stat(),)}
    return {"directory": str(directory.resolve()), "files": files}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def cache_key(identity: dict[str, Any], sources: Sequence[Sequence[int]], chunk_size: int) -> str:
    """The directory name of these outputs: a digest of the teacher and decoding (`identity`), the sources in
    order and the chunk size."""
    return _digest([identity, _digest([list(ids) for ids in sources]), chunk_size])[:32]


def _read_chunk(path: Path, sources: list[list[int]]) -> list[list[int]] | None:
    """A chunk's outputs when the file holds this chunk's (its sources' digest) and is whole; else None."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    outputs = data.get("outputs") if isinstance(data, dict) else None
    if data.get("sources") != _digest(sources) or not isinstance(outputs, list) or len(outputs) != len(sources):
        return None
    if not all(isinstance(ids, list) and all(isinstance(i, int) for i in ids) for ids in outputs):
        return None
    return outputs


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _exchange(generated: dict[int, list[list[int]]], world: int) -> dict[int, list[list[int]]]:
    """Every rank's generated chunks, on every rank."""
    if world == 1:
        return generated
    every_rank: list[dict[int, list[list[int]]] | None] = [None] * world
    torch.distributed.all_gather_object(every_rank, generated)
    return {index: outputs for chunks in every_rank for index, outputs in (chunks or {}).items()}


def teacher_outputs(sources: Sequence[Sequence[int]], generate: Generate, identity: dict[str, Any],
                    cache_dir: str | Path, chunk_size: int) -> list[list[int]]:
    """The teacher's output (token ids as `generate` returns them) for each of `sources`, from the cache or
    generated chunk by chunk and kept there (see the module docstring)."""
    sources = [list(ids) for ids in sources]
    directory = Path(cache_dir) / "teacher_outputs" / cache_key(identity, sources, chunk_size)
    chunks = [sources[start:start + chunk_size] for start in range(0, len(sources), chunk_size)]
    paths = [directory / f"chunk-{index:06d}.json" for index in range(len(chunks))]
    outputs = {index: found for index, (path, chunk) in enumerate(zip(paths, chunks))
               if (found := _read_chunk(path, chunk)) is not None}
    missing = [index for index in range(len(chunks)) if index not in outputs]
    rank, world = _rank_and_world()
    if missing and rank == 0:
        print(f"teacher outputs: generating {sum(len(chunks[i]) for i in missing)} of {len(sources)} unlabeled "
              f"inputs once (kept in {directory})", file=sys.stderr, flush=True)
    generated = {}
    if missing:
        directory.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            write_json_atomic(directory / "info.json", {"identity": identity, "inputs": len(sources),
                                                        "chunk_size": chunk_size})
    for index in missing[rank::world]:
        chunk_outputs = [list(map(int, ids)) for ids in generate(chunks[index])]
        if len(chunk_outputs) != len(chunks[index]):
            raise RuntimeError(f"generate returned {len(chunk_outputs)} outputs for {len(chunks[index])} inputs")
        write_json_atomic(paths[index], {"sources": _digest(chunks[index]), "outputs": chunk_outputs})
        generated[index] = chunk_outputs
    if missing:
        outputs.update(_exchange(generated, world))
    return [ids for index in range(len(chunks)) for ids in outputs[index]]


def labels_from_output(output: Sequence[int], eos_token_id: int, pad_token_id: int, max_length: int) -> list[int]:
    """The labels whose decoder input (`prepare_decoder_input_ids_from_labels`) is the generated `output`.

    `output` starts with the decoder's start token. BART starts on `</s>`, and its labels are the output
    without that token (`<s> tokens </s>`); mBART starts on the target language code, which its labels end with
    (`tokens </s> ro_RO`: mBART's shift moves the last token to the front). Anything after the first `</s>` is
    padding. Cut to `max_length`, the labels keep their end (`</s>`, and the code).
    """
    output = list(output)
    start, content = output[0], output[1:]
    ended = eos_token_id in content
    if ended:
        content = content[:content.index(eos_token_id)]
    else:  # stopped at the length limit: only padding to strip
        while content and content[-1] == pad_token_id:
            content.pop()
    tail = ([eos_token_id] if ended else []) + ([start] if start != eos_token_id else [])
    return content[:max(0, max_length - len(tail))] + tail
