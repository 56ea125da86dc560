"""Gradient-flow pictures with matplotlib (the ``plot`` extra).

A heatmap of ``grad_rms`` (layers x steps, log colour scale, alerts marked) beside the last
window's per-layer bars. Drawn on a bare ``Figure`` with the Agg canvas, never pyplot, so it
is safe on the watcher's background thread and needs no display.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from gradwatch.reader import RunData

STAT = "grad_rms"
DPI = 100
WIDTH_IN = 12.0


def require_matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(
            "gradwatch plots need matplotlib: pip install 'gradwatch[plot]' (in a clone of "
            "the repository: .venv/bin/pip install -e '.[plot]')"
        ) from e
    return matplotlib


@dataclass
class Flow:
    """What one heatmap panel shows: ``values[layer][step]`` of ``grad_rms`` (NaN: none)."""

    title: str
    layers: list[str]
    steps: list[int]
    values: list[list[float]]
    alerts: list[tuple[str, int, str]] = field(default_factory=list)  # (layer, step, kind)

    @classmethod
    def from_run(cls, run: RunData, stat: str = STAT) -> Flow:
        layers, steps, values = run.matrix(stat)
        alerts = [(a.layer, a.step, a.kind) for a in run.alerts]
        return cls(f"{run.name}: {stat}", layers, steps, values, alerts)


def panel_height(flow: Flow) -> float:
    """Inches for one run's panel: room for every layer label."""
    return max(2.5, 0.22 * len(flow.layers) + 1.4)


def default_size(flows: Sequence[Flow]) -> tuple[int, int]:
    """The figure size in pixels when none is asked for."""
    h = sum(panel_height(f) for f in flows)
    return int(WIDTH_IN * DPI), int(round(h * DPI))


def _positive_range(flows: Sequence[Flow]) -> tuple[float, float]:
    vals = [v for f in flows for row in f.values for v in row if math.isfinite(v) and v > 0]
    if not vals:
        return 1e-8, 1.0
    lo, hi = min(vals), max(vals)
    if hi <= lo:
        lo, hi = lo / 10, hi * 10
    return lo, hi


def draw(flows: Sequence[Flow], size: tuple[int, int] | None = None) -> Any:
    """A matplotlib ``Figure`` (Agg canvas attached) of ``flows``, ``size`` in pixels."""
    require_matplotlib()
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    w, h = size or default_size(flows)
    fig = Figure(figsize=(w / DPI, h / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    if not flows:
        fig.text(0.5, 0.5, "no gradwatch data", ha="center", va="center")
        return fig
    lo, hi = _positive_range(flows)
    norm = LogNorm(vmin=lo, vmax=hi)
    cmap = colormaps["viridis"].with_extremes(bad="#d9d9d9", under="#000000")
    grid = fig.add_gridspec(len(flows), 2, width_ratios=[4, 1],
                            height_ratios=[panel_height(f) for f in flows])
    image = None
    for r, flow in enumerate(flows):
        ax = fig.add_subplot(grid[r, 0])
        bars = fig.add_subplot(grid[r, 1], sharey=ax)
        ax.set_title(flow.title, loc="left", fontsize=10)
        if not flow.layers or not flow.steps:
            ax.text(0.5, 0.5, "no grad_rms in this run", ha="center", va="center",
                    transform=ax.transAxes)
            continue
        data = np.array(flow.values, dtype=float)
        data = np.ma.masked_invalid(np.where(data > 0, data, np.nan))
        image = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
        ax.set_yticks(range(len(flow.layers)), flow.layers, fontsize=7)
        ticks = np.unique(np.linspace(0, len(flow.steps) - 1, min(8, len(flow.steps))).round())
        ax.set_xticks(ticks, [str(flow.steps[int(t)]) for t in ticks], fontsize=7)
        ax.set_xlabel("step", fontsize=8)
        row = {la: i for i, la in enumerate(flow.layers)}
        xs, ys = [], []
        for layer, step, _kind in flow.alerts:
            if layer not in row:
                continue
            col = next((j for j, s in enumerate(flow.steps) if s >= step), len(flow.steps) - 1)
            xs.append(col)
            ys.append(row[layer])
        if xs:
            ax.scatter(xs, ys, marker="x", s=28, c="#ff2d2d", linewidths=1.5,
                       label="alert")
            ax.legend(loc="upper right", fontsize=7, framealpha=0.8)
        last = []
        for vals in flow.values:
            finite = [v for v in vals if math.isfinite(v)]
            last.append(finite[-1] if finite else math.nan)
        colours = [cmap(norm(v)) if math.isfinite(v) and v > 0 else "#d9d9d9" for v in last]
        bars.barh(range(len(last)), [v if math.isfinite(v) and v > 0 else 0 for v in last],
                  color=colours, left=0)
        bars.set_xscale("log")
        bars.set_xlim(lo / 2, hi * 2)
        bars.tick_params(labelleft=False, labelsize=7)
        bars.set_title(f"last window (step {flow.steps[-1]})", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=fig.axes, shrink=0.8, label="grad_rms (log)")
    return fig


def render_rgb(flows: Sequence[Flow], size: tuple[int, int] | None = None) -> Any:
    """The figure as a ``[H, W, 3]`` uint8 numpy array (for ``add_image``)."""
    import numpy as np

    fig = draw(flows, size)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save_png(flows: Sequence[Flow], path: str, size: tuple[int, int] | None = None) -> None:
    draw(flows, size).savefig(path, format="png", dpi=DPI)


def plot_runs(runs: Sequence[RunData], path: str, size: tuple[int, int] | None = None) -> None:
    save_png([Flow.from_run(r) for r in runs], path, size)
