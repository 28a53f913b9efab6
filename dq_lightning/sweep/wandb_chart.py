"""The trade-off chart as a native W&B custom chart of the summary run, beside the results table.

The chart is a Vega-Lite spec (`tradeoff_chart.json`: log-scale compression, each series' front joined, points
within its error bars hollow, beaten ones faded, a tooltip with the grid point, metric, interval and loyalty)
filled from a `wandb.Table` of the plot's points by `wandb.plot_table`. W&B keeps such specs as presets of an
entity (a user or team): online, the summary run creates `<entity>/dq-lightning-tradeoff-v1` once
(`wandb.Api().create_custom_chart`) and uses it; offline, the run names the preset of `WANDB_ENTITY` and the
preset is created by the first `make report` logged in to that entity. Offline with no entity known, the run
gets W&B's built-in scatter of the same table instead, and says so.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from dq_lightning.sweep.front import FRONT_RULE, PlotPoint, label_of, status_of

SPEC_PATH = Path(__file__).with_name("tradeoff_chart.json")
# A preset is created once and never replaced: a changed spec gets a new name.
PRESET_NAME = "dq-lightning-tradeoff-v1"
BUILTIN_SCATTER = "wandb/scatter/v0"
COLUMNS = ["series", "mode", "grid_point", "compression", "score", "low", "high", "interval", "label_loyalty",
           "prob_loyalty", "front", "seeds", "runs"]
# The spec's `${field:...}` placeholders -> the table's columns.
FIELDS = {"x": "compression", "y": "score", "low": "low", "high": "high", "series": "series", "mode": "mode",
          "point": "grid_point", "interval": "interval", "label_loyalty": "label_loyalty",
          "prob_loyalty": "prob_loyalty", "status": "front", "runs": "runs"}


def spec_text() -> str:
    return SPEC_PATH.read_text()


def spec_placeholders(text: str) -> tuple[set[str], set[str]]:
    """The spec's field and string placeholders (`${field:x}`, `${string:title}`)."""
    return set(re.findall(r"\$\{field:(\w+)\}", text)), set(re.findall(r"\$\{string:(\w+)\}", text))


def _loyalty(point: PlotPoint, name: str) -> float | None:
    for key in (f"test/{name}", f"val/{name}"):
        value = point.mean_of(key)
        if value is not None:
            return value
    return None


def interval_text(point: PlotPoint) -> str:
    if not point.has_bar:
        return "none"
    kind = f"±1 sd over {point.seeds} seeds" if point.seeds > 1 else "95% bootstrap"
    return f"[{point.low:.2f}, {point.high:.2f}] ({kind})"


def chart_rows(points: list[PlotPoint]) -> list[list]:
    """One row per marker, in `COLUMNS` order: what the chart draws and its tooltip shows."""
    status = status_of(points)
    rows = []
    for point in points:
        runs = ", ".join(str(row.get("run_id", "")) for row in (point.members or (point.row,)))
        rows.append([point.series, str(point.row.get("mode", "")), label_of(point.row), point.x, point.y,
                     point.low, point.high, interval_text(point), _loyalty(point, "label_loyalty"),
                     _loyalty(point, "prob_loyalty"), status[id(point)], point.seeds, runs])
    return rows


def entity_of(run) -> str:
    """The W&B user or team the summary run belongs to: the run's own when online, else WANDB_ENTITY."""
    return (getattr(run, "entity", "") or os.environ.get("WANDB_ENTITY") or "").strip()


def ensure_preset(entity: str) -> bool:
    """Create the chart preset in `entity` if it is not there yet (online only). False, with a warning, when it
    could not be created (then the run's chart stays empty until it is)."""
    import wandb

    create = getattr(wandb.Api(), "create_custom_chart", None)
    if create is None:
        print(f"warning: this wandb has no Api.create_custom_chart; create the W&B chart preset {entity}/"
              f"{PRESET_NAME} from {SPEC_PATH} in the W&B UI (Custom Chart, Edit), or upgrade wandb", file=sys.stderr)
        return False
    try:
        create(entity=entity, name=PRESET_NAME, display_name="dq_lightning trade-off front", spec_type="vega2",
               access="private", spec=spec_text())
    except Exception as error:  # noqa: BLE001 - the run's files are the result; the preset only draws them
        if "exist" in str(error).lower():
            return True
        print(f"warning: W&B chart preset {entity}/{PRESET_NAME} not created ({type(error).__name__}: {error})",
              file=sys.stderr)
        return False
    return True


def tradeoff_chart(points: list[PlotPoint], metric: str, ylabel: str, title: str, entity: str, online: bool):
    """The chart to log: the custom chart on the entity's preset, or, with no entity, W&B's built-in scatter."""
    import wandb

    table = wandb.Table(columns=COLUMNS, data=chart_rows(points))
    if not entity:
        print(f"note: W&B summary run offline with no entity: its chart is W&B's plain scatter; set WANDB_ENTITY "
              f"(your W&B user or team) for the trade-off chart ({PRESET_NAME}), or run `make report` logged in",
              file=sys.stderr)
        return wandb.plot.scatter(table, "compression", "score", title=title)
    if online:
        ensure_preset(entity)
    strings = {"title": title, "rule": FRONT_RULE, "ylabel": ylabel, "metric": metric}
    return wandb.plot_table(f"{entity}/{PRESET_NAME}", table, dict(FIELDS), strings)

