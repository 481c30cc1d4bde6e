"""PNG plots of the command line's results (matplotlib, the `plots` extra), each saved with the series it holds.

`save(figure, path)` writes `path` (PNG) and, beside it, `path.with_suffix(".json")`: the data read back from the
figure's artists after drawing (lines, bars, scatter points), so a test or a script can check what a plot shows
without reading pixels:

    {"<axis y label>": {"<artist label>": {"x": [...], "y": [...]}}}

Bars and categorical axes give their tick labels as `x`. Plots are drawn with the Agg backend, never a window.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Series = dict[str, dict[str, dict[str, list[Any]]]]


def pyplot() -> Any | None:
    """`matplotlib.pyplot` on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def require_pyplot() -> Any:
    """`matplotlib.pyplot` on the Agg backend; ImportError naming the extra when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        raise ImportError("plots need matplotlib: pip install 'kv-cache-engine[plots]'")
    return plt


def save(figure: Figure, path: Path) -> Series:
    """Write the figure as a PNG at `path` and its series as JSON beside it; close it; return the series."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    series = {axis.get_ylabel(): _axis_series(axis) for axis in figure.axes}
    path.with_suffix(".json").write_text(json.dumps(series, indent=1))
    require_pyplot().close(figure)
    return series


def _axis_series(axis: Axes) -> dict[str, dict[str, list[Any]]]:
    """Every labelled line, bar group and scatter of one (drawn) axis, as plain lists."""
    from matplotlib.collections import PathCollection
    from matplotlib.container import BarContainer

    out: dict[str, dict[str, list[Any]]] = {}
    for line in axis.get_lines():
        out[str(line.get_label())] = {"x": _floats(line.get_xdata()), "y": _floats(line.get_ydata())}
    for container in axis.containers:
        if isinstance(container, BarContainer):
            ticks = [label.get_text() for label in axis.get_xticklabels()]
            heights = [patch.get_height() for patch in container.patches]
            out[str(container.get_label())] = {"x": ticks[: len(heights)], "y": _floats(heights)}
    for collection in axis.collections:
        if isinstance(collection, PathCollection):
            points = np.asarray(collection.get_offsets())
            out[str(collection.get_label())] = {"x": _floats(points[:, 0]), "y": _floats(points[:, 1])}
    return out


def _floats(values: Any) -> list[float]:
    return [float(value) for value in values]


Curves = Mapping[str, tuple[Sequence[float], Sequence[float]]]


def columns(points: Sequence[Sequence[float]]) -> tuple[list[float], list[float]]:
    """`[(x, y), ...]` points as the `(xs, ys)` of one curve."""
    return [float(point[0]) for point in points], [float(point[1]) for point in points]


def lines(title: str, axes_labels: tuple[str, str], curves: Curves, log: bool = False) -> Figure:
    """One line per `curves` entry (`label: (x, y)`), markers on the points; log-log axes if `log`."""
    figure, axis = require_pyplot().subplots(figsize=(7, 4.5))
    for label, (x, y) in curves.items():
        axis.plot(list(x), list(y), marker="o", label=label)
    if log:
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
    axis.set_title(title)
    axis.set_xlabel(axes_labels[0])
    axis.set_ylabel(axes_labels[1])
    axis.legend(fontsize=8)
    return figure


def bars(title: str, y_label: str, values: Mapping[str, float], label: str) -> Figure:
    """One bar per `values` entry (`name: height`), each annotated with its height."""
    figure, axis = require_pyplot().subplots(figsize=(6, 4))
    container = axis.bar(list(values), list(values.values()), label=label, color="tab:blue")
    axis.bar_label(container, fmt="{:,.0f}", fontsize=8)
    axis.set_title(title)
    axis.set_ylabel(y_label)
    return figure


def fidelity(rows: Sequence[Any]) -> Figure:
    """Greedy agreement (o) and needle accuracy (x) against bytes per token, one point per configuration.

    rows: `kv_cache.fidelity.FidelityRow`s.
    """
    figure, axis = require_pyplot().subplots(figsize=(7, 4.5))
    memory = [row.bytes_per_token for row in rows]
    axis.scatter(memory, [row.agreement for row in rows], marker="o", color="tab:blue", label="greedy agreement")
    axis.scatter(memory, [row.needle_accuracy for row in rows], marker="x", color="tab:red", label="needle accuracy")
    for row in rows:
        position = (row.bytes_per_token, row.agreement)
        axis.annotate(row.name, position, fontsize=7, xytext=(3, 3), textcoords="offset points")
    axis.set_xlabel("bytes per token seen (blocks in use)")
    axis.set_ylabel("greedy agreement (o) / needle accuracy (x)")
    axis.set_xscale("log")
    axis.legend(fontsize=8)
    return figure
