"""The sub-networks of a supernet: one `SubNet` per point of the trade-off curve (W-E-A bits, depth, width).

A grid is written as a list whose items are either one point, `"2-2-8 6-3"` (bits, encoder-decoder depth) or
`"2-2-8 6-6 heads=3,ffn=512"` (and a width, as `--model.width` takes it), or a W&B sweep file, whose quantized
dq points it contributes (`sweeps/xsum-tiny.yaml`): the supernet trains the curve the sweep would train point
by point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dq_lightning.errors import UserError
from dq_lightning.quant.config import FULL_PRECISION, parse_wea

FLAG = "model.grid"


@dataclass(frozen=True)
class SubNet:
    """One point of the grid. `depth` is always explicit (`6-3`); `width` None is the teacher's width."""

    bits: str
    depth: str
    width: str | None = None

    @property
    def name(self) -> str:
        """How the point is written in a grid and in logs: `2-2-8 6-3`, `2-2-8 6-6 heads=3,ffn=512`."""
        return " ".join(part for part in (self.bits, self.depth, self.width) if part)

    @property
    def key(self) -> str:
        """The name as a metric key and file name: `2-2-8_6-3`, `2-2-8_6-6_heads-3-ffn-512`."""
        return self.name.replace(" ", "_").replace("=", "-").replace(",", "-")

    @property
    def widths(self) -> tuple[int, int, int]:
        return parse_wea(self.bits)

    @property
    def layers(self) -> tuple[int, int]:
        encoder, decoder = (int(part) for part in self.depth.split("-"))
        return encoder, decoder

    @property
    def quantized(self) -> bool:
        return self.widths != (FULL_PRECISION,) * 3

    @classmethod
    def parse(cls, text: str, teacher_layers: tuple[int, int], flag: str = FLAG) -> SubNet:
        """`"2-2-8 6-3"` or `"2-2-8 6-6 heads=3,ffn=512"`, checked against the teacher's depth."""
        parts = str(text).split()
        if len(parts) not in (2, 3):
            raise UserError(f"{flag}: {text!r} is not a sub-network like '2-2-8 6-3' (W-E-A bits, encoder-decoder "
                            "depth) or '2-2-8 6-6 heads=3,ffn=512' (and a width), nor a sweep file (.yaml)")
        bits, depth = parts[0], parts[1]
        try:
            parse_wea(bits)
        except UserError as error:
            raise UserError(f"{flag}: {text!r}: {error}") from None
        return cls(bits, check_depth(depth, teacher_layers, f"{flag}: {text!r}"), parts[2] if len(parts) == 3 else None)


def check_depth(depth: str, teacher_layers: tuple[int, int], where: str) -> str:
    """`depth` ("6-3") as a valid depth of a student of this teacher."""
    try:
        encoder, decoder = (int(part) for part in str(depth).split("-"))
    except ValueError:
        raise UserError(f"{where}: depth {depth!r} is not 'encoder-decoder' layers like '6-3'") from None
    for stack, count, full in (("encoder", encoder, teacher_layers[0]), ("decoder", decoder, teacher_layers[1])):
        if not 1 <= count <= full:
            raise UserError(f"{where}: {count} {stack} layers; the teacher has {full} (a sub-network keeps 1 to "
                            f"{full})")
    return f"{encoder}-{decoder}"


def sweep_points(path: Path, teacher_layers: tuple[int, int]) -> list[SubNet]:
    """The quantized dq points of a sweep file as sub-networks; depth unset is the teacher's. Left out: quant_only
    runs and ETD-Rand widths (a distilled supernet's widths follow one importance order) and full-precision
    points (the sweep's distill_only baselines, which a grid may still name itself: "32-32-32 6-3")."""
    from dq_lightning.sweep.spec import expand_grid, load_sweep

    points = []
    for point in expand_grid(load_sweep(path), path):
        params = point.params
        if params.get("model.mode", "dq") != "dq" or params.get("model.shape.width_method", "impt") != "impt":
            continue
        depth = params.get("model.depth") or f"{teacher_layers[0]}-{teacher_layers[1]}"
        where = f"{FLAG}: {path} ({point.run_id})"
        bits = str(params.get("model.bits", "2-2-8"))
        try:
            parse_wea(bits)
        except UserError as error:
            raise UserError(f"{where}: {error}") from None
        subnet = SubNet(bits, check_depth(depth, teacher_layers, where), params.get("model.width"))
        if subnet.quantized:
            points.append(subnet)
    return points


def parse_grid(items: list[str], teacher_layers: tuple[int, int]) -> list[SubNet]:
    """Every sub-network of `items` (points and sweep files), each once, in the order given."""
    if not items:
        raise UserError(f"{FLAG}: give at least one sub-network ('2-2-8 6-3') or sweep file")
    grid: list[SubNet] = []
    for item in items:
        text = str(item).strip()
        if text.endswith((".yaml", ".yml")):
            found = sweep_points(Path(text), teacher_layers)
            if not found:
                raise UserError(f"{FLAG}: {text} has no dq point (a supernet distills; quant_only points are "
                                "trained by the sweep)")
        else:
            found = [SubNet.parse(text, teacher_layers)]
        grid += [subnet for subnet in found if subnet not in grid]
    return grid


def by_size(subnets: list[SubNet], size_of: Any) -> list[SubNet]:
    """The sub-networks from the largest to the smallest by `size_of(subnet)` (MiB), ties in grid order."""
    sizes = {subnet: size_of(subnet) for subnet in subnets}
    if any(not math.isfinite(size) for size in sizes.values()):
        raise ValueError("a sub-network size is not finite")
    return sorted(subnets, key=lambda subnet: -sizes[subnet])
