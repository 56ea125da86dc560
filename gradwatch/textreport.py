"""``gradwatch report``: the latest value of each stat per layer, per run, and every alert.

A rich table for people, or the same content as JSON for pipelines. Layer names are data:
they go into ``rich.text.Text`` objects, never into markup.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from gradwatch.reader import RunData, json_number


def require_rich() -> Any:
    try:
        import rich
    except ImportError as e:
        raise ImportError("gradwatch report needs rich: pip install gradwatch[plot]") from e
    return rich


def fmt(v: float) -> str:
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == 0:
        return "0"
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 else f"{v:.2e}"


def to_json(runs: Sequence[RunData], logdir: str) -> dict[str, Any]:
    out = []
    for run in runs:
        latest = run.latest()
        alerted = run.alerted()
        out.append({
            "run": run.name,
            "step": run.last_step,
            "layers": {
                layer: {stat: json_number(v) for stat, (_s, v) in stats.items()}
                for layer, stats in latest.items()
            },
            "alerted": sorted({f"{la}/{st}" for la, st in alerted}),
            "alerts": [a.to_dict() for a in run.alerts],
            "alert_counts": dict(run.alert_counts),
        })
    return {"logdir": logdir, "runs": out, "alerts": sum(len(r.alerts) for r in runs)}


def print_report(runs: Sequence[RunData], console: Any) -> None:
    """One table per run (``!`` alerted in the latest window, ``*`` alerted earlier),
    then the run's alerts."""
    from rich.table import Table
    from rich.text import Text

    for run in runs:
        latest = run.latest()
        alerted = run.alerted()
        last = run.last_step
        table = Table(title=Text(f"run {run.name} · step {last}", style="bold"),
                      title_justify="left", header_style="bold", pad_edge=False)
        table.add_column("layer", no_wrap=True)
        for stat in run.stats:
            table.add_column(stat, justify="right")
        for layer in run.layers:
            cells: list[Any] = [Text(layer)]
            for stat in run.stats:
                if stat not in latest[layer]:
                    cells.append(Text("-", style="dim"))
                    continue
                step, v = latest[layer][stat]
                when = alerted.get((layer, stat))
                if when is None:
                    cells.append(Text(fmt(v)))
                elif when >= step:
                    cells.append(Text(fmt(v) + "!", style="bold red"))
                else:
                    cells.append(Text(fmt(v) + "*", style="yellow"))
            table.add_row(*cells)
        console.print(table)
        if run.alerts:
            at = Table(title=Text(f"alerts in {run.name}: {len(run.alerts)}", style="bold red"),
                       title_justify="left", header_style="bold", pad_edge=False)
            for c in ("step", "layer", "kind", "stat", "value", "threshold"):
                at.add_column(c, justify="right" if c in ("step", "value", "threshold")
                              else "left")
            for a in run.alerts:
                at.add_row(Text(str(a.step)), Text(a.layer), Text(a.kind), Text(a.stat),
                           Text(fmt(a.value)), Text(fmt(a.threshold)))
            console.print(at)
        else:
            console.print(Text(f"no alerts in {run.name}", style="green"))
        console.print()
    total = sum(len(r.alerts) for r in runs)
    console.print(Text(f"{len(runs)} run(s), {total} alert(s)  "
                       "(! alerted in the latest window, * alerted earlier)"))
