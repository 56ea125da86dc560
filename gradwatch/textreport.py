"""``gradwatch report``: per run, the latest value of each stat per layer, every alert, and
the hints once per kind and cause; or the same as JSON for pipelines.

Drawn with the plain-text renderer of ``Watcher.report()`` (``gradwatch.sinks.console``):
the same mark, explained under the table, the same number format; an alerted stat is never
dropped for width. Needs nothing beyond the runtime install.
"""

from __future__ import annotations

import shutil
from typing import Any, Sequence

from gradwatch.alerts import group, layer_list
from gradwatch.reader import RunData
from gradwatch.schema import STATS, Alert, fmt, json_number
from gradwatch.sinks.console import GAP, LABEL_MIN, choose, cut, notes, printable, table, wrap

PIPE_WIDTH = 100  # output into a pipe or a file (a CI log) with no COLUMNS set


def terminal_width() -> int:
    """``COLUMNS``, else the terminal's width, else (a pipe, a CI log) ``PIPE_WIDTH``."""
    return shutil.get_terminal_size((PIPE_WIDTH, 24)).columns


# -- gradwatch report ----------------------------------------------------------------------------
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
            "alerts": [a.to_json() for a in run.alerts],
            "alert_counts": dict(run.alert_counts),
        })
    return {"logdir": logdir, "runs": out, "alerts": sum(len(r.alerts) for r in runs)}


def hints(alerts: Sequence[Alert], width: int | None) -> list[str]:
    """Why, and what to try: one paragraph per kind and cause of a run, naming its layers
    and carrying the hint of the worst alert (the oldest of equals: alerts come oldest first)."""
    out = []
    for g in group(alerts, lambda a: (a.kind, a.cause)):
        w = g.worst
        if not w.hint:
            continue
        names = [printable(n) for n in g.layers]
        where = f"'{names[0]}'" if len(names) == 1 else f"{len(names)} layers: {layer_list(names)}"
        text = (f"{g.kind}, cause {g.cause} ({len(g.alerts)} alert(s), {where}): "
                f"{printable(w.hint)} (at '{printable(w.layer)}', step {w.step})")
        out += wrap(text, width) if width else [text]
    return out


def run_lines(run: RunData, stats: Sequence[str] | None, width: int | None) -> list[str]:
    """One run: its table (every alerted stat kept), the notes, its alerts, their hints."""
    latest = run.latest()
    marked = set(run.alerted())
    alerted_stats = {s for _, s in marked}
    present = [s for s in run.stats if stats is None or s in stats]
    label_w = min(max([5] + [len(printable(la)) for la in run.layers]), 40)
    shown, hidden = choose(present, alerted_stats, None if stats is not None else width,
                           min(label_w, 20) + GAP)
    values = {la: {s: v for s, (_step, v) in by.items()} for la, by in latest.items()}
    out = [f"run {printable(run.name)} · step {run.last_step}", ""]
    out += table(run.layers, shown, values, marked, width=width)
    below = notes(shown, [m for m in marked if m[1] in shown], hidden, width)
    out += ["", *below, ""] if below else [""]
    if not run.alerts:
        out.append(f"no alerts in {printable(run.name)}")
        return out
    out.append(f"alerts in {printable(run.name)}: {len(run.alerts)}")
    out += alert_rows(run.alerts, width)
    out += hints(run.alerts, width)
    return out


def alert_rows(alerts: Sequence[Alert], width: int | None) -> list[str]:
    """The alerts as a table (layer names cut at the front to fit ``width``); in a terminal
    too narrow even for that, two lines an alert: its numbers, then its layer."""
    cols = ("step", "layer", "kind", "stat", "value", "threshold", "cause")
    rows = [[str(a.step), printable(a.layer), a.kind, a.stat, fmt(a.value), fmt(a.threshold),
             a.cause] for a in alerts]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
    over = sum(widths) + GAP * (len(cols) - 1) - (width or 0)
    if width and over > 0 and widths[1] > LABEL_MIN:  # cut the layer names at the front
        widths[1] = max(LABEL_MIN, widths[1] - over)
        for r in rows:
            r[1] = cut(r[1], widths[1])
    if width and sum(widths) + GAP * (len(cols) - 1) > width:
        step_w = widths[0]
        return [line for a, r in zip(alerts, rows) for line in (
            f"{r[0]:>{step_w}}  {a.kind}  {a.stat}  {r[4]} (threshold {r[5]})  {a.cause}",
            " " * (step_w + GAP) + cut(printable(a.layer), max(8, width - step_w - GAP)))
        ] + [""]
    right = {0, 4, 5}

    def line(cells: Sequence[str]) -> str:
        return (" " * GAP).join(c.rjust(w) if i in right else c.ljust(w)
                                for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(cols), (" " * GAP).join("─" * w for w in widths), *map(line, rows), ""]


def report_text(runs: Sequence[RunData], stats: Sequence[str] | None = None,
                width: int | None = None) -> str:
    """``gradwatch report``: a table per run, then its alerts and hints; ``stats``: the
    columns to show (default: every stat present that fits ``width``, alerted ones always)."""
    out: list[str] = []
    for run in runs:
        out += run_lines(run, stats, width)
        out.append("")
    total = sum(len(r.alerts) for r in runs)
    out.append(f"{len(runs)} run(s), {total} alert(s)")
    return "\n".join(out)


def parse_stats(text: str | None) -> list[str] | None:
    """``--stats``: comma-separated names or ``all``; a ValueError names the unknown ones
    and lists the valid names."""
    if text is None or text.strip() == "all":
        return None if text is None else list(STATS)
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in STATS]
    if bad or not names:
        raise ValueError(f"--stats: unknown stat(s) {', '.join(map(repr, bad)) or repr(text)}; "
                         f"valid: {', '.join(STATS)} or all")
    return names
