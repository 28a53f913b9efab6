"""`tradeoff.png`: compression vs the sweep's metric, every series with its own front (`front.py`), for offline
reading; the W&B summary run holds the same chart as an interactive one (`wandb_chart.py`)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import textwrap
from pathlib import Path

from dq_lightning.sweep.front import FRONT_RULE, PlotPoint, SeriesFront, label_of, plot_points, series_fronts

MODE_MARKERS = {"dq": "o", "quant_only": "s", "distill_only": "^"}
FADED = 0.3


def plot_tradeoff(rows: list[dict], metric: str, path: Path, title: str) -> Path:
    """Draw the rows' trade-off chart into `path` (PNG), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    source = "test" if any(r.get(f"test/{metric}") not in (None, "") for r in rows) else "val"
    fig = tradeoff_figure(plot_points(rows, metric), f"{source} {metric}", title)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A staging name of this process's own: sweep workers finishing together each write the plot.
    descriptor, staging = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    try:
        os.fchmod(descriptor, 0o644)  # mkstemp's 0600 would hide the plot from the other users of a share
        with os.fdopen(descriptor, "wb") as out:
            fig.savefig(out, format="png", bbox_inches="tight")
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(staging)
        raise
    finally:
        plt.close(fig)
    return path


def tradeoff_figure(points: list[PlotPoint], ylabel: str, title: str):
    """The figure: per series its front as a line, the points within its error bars hollow, the beaten faded;
    the teacher a black star. Returns the matplotlib Figure (its front lines carry `gid="front"`)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    colors, fronts = {}, series_fronts(points)
    for index, front in enumerate(fronts):
        colors[front.series] = plt.get_cmap("tab10")(index % 10)
        _draw_series(ax, front, colors[front.series])
    teachers = [p for p in points if p.is_teacher]
    for teacher in teachers:
        colors[teacher.series] = "black"
        ax.scatter([teacher.x], [teacher.y], marker="*", color="black", s=140, zorder=4, label=teacher.series)
    _draw_bars(ax, points, colors)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
    for point, offset in zip(points, _label_offsets(ax, [(p.x, p.y) for p in points])):
        text = label_of(point.row) + (f" (n={point.seeds})" if point.seeds > 1 else "")
        ax.annotate(text, (point.x, point.y), xytext=offset, textcoords="offset points", fontsize=7,
                    va="center", color=colors.get(point.series, "black"))
    ax.set_xlabel("compression ratio vs FP32 teacher (DQ-BART accounting, log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax, points, fronts)
    return fig


def _draw_series(ax, front: SeriesFront, color) -> None:
    marker = MODE_MARKERS.get(front.mode, "o")
    ax.plot([p.x for p in front.front], [p.y for p in front.front], "-", marker=marker, color=color,
            markersize=7, linewidth=1.6, label=front.series, zorder=3, gid="front")
    if front.within:
        ax.scatter([p.x for p in front.within], [p.y for p in front.within], marker=marker, facecolors="none",
                   edgecolors=[color], linewidths=1.4, s=50, zorder=3, gid="within")
    if front.beaten:
        ax.scatter([p.x for p in front.beaten], [p.y for p in front.beaten], marker=marker, color=[color],
                   alpha=FADED, s=40, zorder=2, gid="beaten")


def _draw_bars(ax, points: list[PlotPoint], colors: dict) -> None:
    for point in points:
        if point.has_bar:
            ax.errorbar([point.x], [point.y], yerr=[[point.y - point.low], [point.high - point.y]], fmt="none",
                        ecolor=colors.get(point.series, "gray"), alpha=0.45, capsize=3, zorder=1)


def _legend(ax, points: list[PlotPoint], fronts: list[SeriesFront]) -> None:
    """One entry per series (marker and line), the hollow and faded markers, what the bars are; the front's
    rule as the legend's title."""
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    extra = []
    if any(front.within for front in fronts):
        extra.append((Line2D([], [], marker="o", linestyle="", markerfacecolor="none", markeredgecolor="gray"),
                      "off the front, within the error bars"))
    if any(front.beaten for front in fronts):
        extra.append((Line2D([], [], marker="o", linestyle="", color="gray", alpha=FADED),
                      "beaten beyond the error bars"))
    if any(p.has_bar for p in points):
        kinds = ["one run: 95% bootstrap interval over test examples"]
        if any(p.seeds > 1 for p in points):
            kinds.append("several seeds: mean ± 1 sd")
        extra.append((Line2D([], [], color="gray", alpha=0.45), "bars: " + "; ".join(kinds)))
    for handle, label in extra:
        handles.append(handle)
        labels.append(label)
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
              title="\n".join(textwrap.wrap(FRONT_RULE, 48)), title_fontsize=7, alignment="left")


def _label_offsets(ax, points: list[tuple[float, float]], gap: float = 9.0) -> list[tuple[float, float]]:
    """Label offsets (in points) right of each point, pushed down where labels would overlap.

    Runs of one grid point in several modes share an x position and often nearly the same score.
    """
    ax.figure.canvas.draw()  # fixes the axes limits, so the data -> pixel transform is final
    scale = 72.0 / ax.figure.dpi
    anchors = [tuple(ax.transData.transform((x, y)) * scale) for x, y in points]  # in points
    order = sorted(range(len(points)), key=lambda i: -anchors[i][1])
    placed: list[tuple[float, float]] = []
    offsets: dict[int, tuple[float, float]] = {}
    for index in order:
        x, y = anchors[index][0] + 5, anchors[index][1]
        for other_x, other_y in sorted(placed, key=lambda p: -p[1]):
            if abs(other_x - x) < 70 and abs(other_y - y) < gap:
                y = other_y - gap
        placed.append((x, y))
        offsets[index] = (5.0, y - anchors[index][1])
    return [offsets[i] for i in range(len(points))]
