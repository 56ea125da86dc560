"""``gradwatch report``: the latest value of each stat per layer, per run, and every alert.

A rich table for people, or the same content as JSON for pipelines. Layer names are data:
they go into ``rich.text.Text`` objects, never into markup.
"""

from __future__ import annotations

from typing import Any, Sequence

from gradwatch.alerts import fmt, group, layer_list
from gradwatch.reader import AlertRecord, RunData, json_number
from gradwatch.sinks.console import COLUMNS as CORE

NUM_WIDTH = 11  # a number like -4.4e-05, its padding and the column divider


def require_rich() -> Any:
    try:
        import rich
    except ImportError as e:
        raise ImportError("gradwatch report needs rich: pip install gradwatch[plot]") from e
    return rich


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
            "alerted": [{"layer": la, "stat": st, "step": step}
                        for (la, st), step in sorted(alerted.items())],
            "alerts": [a.to_dict() for a in run.alerts],
            "alert_counts": dict(run.alert_counts),
        })
    return {"logdir": logdir, "runs": out, "alerts": sum(len(r.alerts) for r in runs)}


def print_hints(alerts: Sequence[AlertRecord], console: Any) -> None:
    """Why, and what to try: one paragraph per kind and cause of a run, naming its layers
    and carrying the hint of the worst alert (the oldest of equals: alerts come oldest first)."""
    from rich.text import Text

    for g in group(alerts, lambda a: (a.kind, a.cause)):
        w = g.worst
        if not w.hint:
            continue
        names = g.layers
        where = f"'{names[0]}'" if len(names) == 1 else f"{len(names)} layers: {layer_list(names)}"
        line = Text(f"{g.kind}, cause {g.cause} ({len(g.alerts)} alert(s), {where}): ",
                    style="bold")
        line.append(Text(f"{w.hint} (at '{w.layer}', step {w.step})"))
        console.print(line)


def print_report(runs: Sequence[RunData], console: Any,
                 stats: Sequence[str] | None = None) -> None:
    """One table per run (``!`` alerted in the latest window, ``*`` alerted earlier),
    then the run's alerts. ``stats``: the columns to show (default: every stat present)."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    for run in runs:
        latest = run.latest()
        alerted = run.alerted()
        last = run.last_step
        shown = [s for s in run.stats if stats is None or s in stats]
        label_w = min(40, max((len(la) for la in run.layers), default=5))
        hidden: list[str] = []
        fit = max(1, (console.width - label_w - 4) // NUM_WIDTH)
        if stats is None and len(shown) > fit:  # narrow terminal: the most telling stats
            keep = sorted(shown, key=lambda s: CORE.index(s) if s in CORE else len(CORE))[:fit]
            hidden = [s for s in shown if s not in keep]
            shown = [s for s in shown if s in keep]
        table = Table(title=Text(f"run {run.name} · step {last}", style="bold"),
                      title_justify="left", header_style="bold", box=box.SIMPLE_HEAD,
                      pad_edge=False)
        table.add_column("layer", overflow="fold", min_width=label_w)
        for stat in shown:
            # stacked header words keep the columns as narrow as their numbers
            table.add_column(stat.replace("_", "\n"), justify="right", no_wrap=True,
                             min_width=NUM_WIDTH - 3)
        for layer in run.layers:
            cells: list[Any] = [Text(layer)]
            for stat in shown:
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
        if hidden:
            console.print(Text(f"(not shown for width: {', '.join(hidden)}; "
                               "--stats all, --json or a wider terminal show them)",
                               style="dim"))
        if run.alerts:
            at = Table(title=Text(f"alerts in {run.name}: {len(run.alerts)}", style="bold red"),
                       title_justify="left", header_style="bold", box=box.SIMPLE_HEAD,
                       pad_edge=False)
            for c in ("step", "layer", "kind", "stat", "value", "threshold", "cause"):
                at.add_column(c, justify="right" if c in ("step", "value", "threshold")
                              else "left")
            for a in run.alerts:
                at.add_row(Text(str(a.step)), Text(a.layer), Text(a.kind), Text(a.stat),
                           Text(fmt(a.value)), Text(fmt(a.threshold)), Text(a.cause))
            console.print(at)
            print_hints(run.alerts, console)
        else:
            console.print(Text(f"no alerts in {run.name}", style="green"))
        console.print()
    total = sum(len(r.alerts) for r in runs)
    console.print(Text(f"{len(runs)} run(s), {total} alert(s)  "
                       "(! alerted in the latest window, * alerted earlier)"))
