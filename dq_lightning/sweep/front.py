"""The trade-off front a reader takes for "the best you can get at this size", one per series of runs.

A series is one way of making students: a mode (dq, quant_only, distill_only), and where the results hold
several, a recipe, full width or thinner, separately trained or extracted from a supernet, or a sweep's label
(`python -m dq_lightning report`). Within a series, a point is on the front when no point at least as
compressed scores higher (its estimate: one run's score, or the mean over seeds); the front is joined in order
of compression and never rises. A point off the front that no point at least as compressed beats beyond the
error bars (one run: its 95% bootstrap interval; seeds: ±1 sd) is one the test set cannot tell from the front:
it is marked, never joined in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from dq_lightning.sweep.comparisons import point_key

FRONT, WITHIN, BEATEN, REFERENCE = "front", "within error bars", "beaten", "reference"
FRONT_RULE = ("Each series' line joins its front, the points that no point of the series at least as compressed "
              "outscores; a hollow marker is off the front, yet no point at least as compressed beats it beyond "
              "the error bars (a faded one is beaten).")
# What tells one series from another, in the order a series' name lists them; only those that vary are named.
SERIES_DIMENSIONS = ("sweep", "mode", "recipe", "width", "source")
MODE_ORDER = ("teacher", "dq", "quant_only", "distill_only")


def score_of(row: dict, metric: str) -> float | None:
    for key in (f"test/{metric}", f"val/{metric}"):
        if row.get(key) not in (None, ""):
            return float(row[key])
    return None


def is_full_width(row: dict) -> bool:
    return row.get("width") in (None, "", "full")


def label_of(row: dict) -> str:
    """A grid point as the paper labels it ("2-2-8 6-3"), with a thinner student's width."""
    if row.get("mode") == "teacher":
        return "teacher"
    label = f"{row.get('bits')} {row.get('encoder_layers')}-{row.get('decoder_layers')}"
    return label if is_full_width(row) else f"{label} {row.get('width')}"


def _dimension(row: dict, name: str) -> str:
    if name == "width":
        return "full width" if is_full_width(row) else "thinner"
    if name == "source":
        return row.get("source") or "trained"  # trained, supernet, supernet+finetune; absent in older results
    if name == "recipe":
        return f"recipe {row.get('recipe') or 'not recorded'}"
    return str(row.get(name) or "")


def series_namer(rows: list[dict]) -> Callable[[dict], str]:
    """Names a row's series by the dimensions that vary among the students of `rows` (always the mode)."""
    students = [row for row in rows if row.get("mode") != "teacher"]
    varying = [name for name in SERIES_DIMENSIONS
               if name == "mode" or len({_dimension(row, name) for row in students}) > 1]

    def name(row: dict) -> str:
        if row.get("mode") == "teacher":
            sweep = _dimension(row, "sweep") if "sweep" in varying else ""
            return f"{sweep} · teacher" if sweep else "teacher"
        return " · ".join(_dimension(row, dimension) for dimension in varying)

    return name


@dataclass(frozen=True)
class PlotPoint:
    """One marker: a run, or the mean of a grid point's runs over seeds; `low`-`high` is its error bar."""

    x: float
    y: float
    low: float
    high: float
    row: dict
    seeds: int = 1
    series: str = ""
    members: tuple = field(default=(), compare=False, repr=False)  # the runs behind it (several seeds)

    @property
    def has_bar(self) -> bool:
        return self.high > self.low

    @property
    def is_teacher(self) -> bool:
        return self.row.get("mode") == "teacher"

    def mean_of(self, key: str) -> float | None:
        """The mean of a column over the runs behind this point (a loyalty, say), None where none has it."""
        values = [float(row[key]) for row in (self.members or (self.row,)) if row.get(key) not in (None, "")]
        return float(np.mean(values)) if values else None


def _usable(row: dict, metric: str) -> bool:
    score = score_of(row, metric)
    if row.get("compression") in (None, "") or score is None or math.isnan(score):
        return False
    return not math.isnan(float(row["compression"]))


def _point(members: list[dict], metric: str, series: str) -> PlotPoint:
    scores = [score_of(row, metric) for row in members]
    first = members[0]
    x = float(first["compression"])
    if len(members) > 1:
        mean, spread = float(np.mean(scores)), float(np.std(scores, ddof=1))
        return PlotPoint(x, mean, mean - spread, mean + spread, first, len(members), series, tuple(members))
    y = scores[0]
    low, high = first.get(f"test/{metric}_low"), first.get(f"test/{metric}_high")
    if low in (None, "") or high in (None, ""):
        low = high = y
    return PlotPoint(x, y, float(low), float(high), first, 1, series, (first,))


def plot_points(rows: list[dict], metric: str) -> list[PlotPoint]:
    """A marker per run; the runs of one grid point in one series over several seeds become one marker at their
    mean, with a bar of one standard deviation. A single run's bar is its bootstrap interval (where it has one)."""
    series_of = series_namer(rows)
    groups: dict[tuple, list[dict]] = {}
    for index, row in enumerate(rows):
        if not _usable(row, metric):
            continue
        series = series_of(row)
        seeded = row.get("seed") not in (None, "") and row.get("mode") != "teacher"
        key = (series, point_key(row)) if seeded else (series, "run", index)
        groups.setdefault(key, []).append(row)
    return _distinct_teachers([_point(members, metric, key[0]) for key, members in groups.items()])


def _distinct_teachers(points: list[PlotPoint]) -> list[PlotPoint]:
    """Sweeps compared against one teacher list it once each: one star, named "teacher", for equal scores."""
    teachers = [p for p in points if p.is_teacher]
    distinct = {(p.x, p.y): p for p in reversed(teachers)}
    if len(teachers) < 2 or len(distinct) == len(teachers):
        return points
    keep = {id(p) for p in distinct.values()}
    kept = [p for p in points if not p.is_teacher or id(p) in keep]
    if len(distinct) == 1:
        kept = [replace(p, series="teacher") if p.is_teacher else p for p in kept]
    return kept


def pareto_front(points: list[PlotPoint]) -> list[PlotPoint]:
    """The points that no point at least as compressed scores higher than, in order of compression: scores
    along it never rise (a point further right that scored higher would dominate the one before it)."""
    front = [p for p in points if not any(q.x >= p.x and q.y > p.y for q in points)]
    return sorted(front, key=lambda p: (p.x, -p.y))


def beaten_beyond_error(point: PlotPoint, points: list[PlotPoint]) -> bool:
    """Whether a point at least as compressed has its whole error bar above this point's."""
    return any(q is not point and q.x >= point.x and q.low > point.high for q in points)


@dataclass
class SeriesFront:
    """A series' points split by where they stand against its front."""

    series: str
    front: list[PlotPoint]
    within: list[PlotPoint]
    beaten: list[PlotPoint]

    @property
    def mode(self) -> str:
        return str(self.front[0].row.get("mode", ""))

    def status(self, point: PlotPoint) -> str:
        return FRONT if point in self.front else WITHIN if point in self.within else BEATEN


def series_fronts(points: list[PlotPoint]) -> list[SeriesFront]:
    """Each series' front (the teacher is a reference, not a series), series ordered by mode, then name."""
    by_series: dict[str, list[PlotPoint]] = {}
    for point in points:
        if not point.is_teacher:
            by_series.setdefault(point.series, []).append(point)
    fronts = []
    for series, members in by_series.items():
        front = pareto_front(members)
        off = [p for p in members if p not in front]
        within = sorted((p for p in off if not beaten_beyond_error(p, members)), key=lambda p: p.x)
        fronts.append(SeriesFront(series, front, within, sorted((p for p in off if p not in within),
                                                                 key=lambda p: p.x)))

    def order(front: SeriesFront) -> tuple:
        mode = front.mode
        return (MODE_ORDER.index(mode) if mode in MODE_ORDER else len(MODE_ORDER), front.series)

    return sorted(fronts, key=order)


def status_of(points: list[PlotPoint]) -> dict[int, str]:
    """Every point's place (front, within error bars, beaten; the teacher: reference), by `id(point)`."""
    status = {id(p): REFERENCE for p in points if p.is_teacher}
    for front in series_fronts(points):
        for point in front.front + front.within + front.beaten:
            status[id(point)] = front.status(point)
    return status


def front_markdown(points: list[PlotPoint], metric: str) -> str:
    """Each series' front in words: its points in order, then the points within its error bars."""
    def say(point: PlotPoint) -> str:
        seeds = f", mean of {point.seeds} seeds" if point.seeds > 1 else ""
        return f"{label_of(point.row)} ({point.x:.1f}x) {point.y:.2f}{seeds}"

    fronts = series_fronts(points)
    if not fronts:
        return ""
    lines = [f"Fronts ({metric}): {FRONT_RULE}", ""]
    for front in fronts:
        line = f"- {front.series}: " + " > ".join(say(p) for p in front.front)
        if front.within:
            line += "; within the error bars: " + ", ".join(say(p) for p in front.within)
        lines.append(line)
    return "\n".join(lines)
