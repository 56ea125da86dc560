"""Plain-text tables of per-layer stats: ``gradwatch report`` and ``Watcher.report()``.

One renderer, one meaning per mark in every view: a cell ending in ``!`` is a layer's stat
that raised an alert (at or before the step shown; the alerts below the table say when and
why), explained in one line under the table (``MARKS``). Columns never drop an alerted stat
for width: the other stats go first (named under the table). Needs nothing beyond the
runtime install (no rich); names are printed with control characters escaped.
"""

from __future__ import annotations

import shutil
import textwrap
from typing import Any, Iterable, Mapping, Sequence

from gradwatch.alerts import group, layer_list
from gradwatch.reader import RunData
from gradwatch.schema import STATS, Alert, fmt, json_number

#: The columns of ``Watcher.report()`` and, most telling first, the stats ``gradwatch report``
#: keeps when the terminal is too narrow for every one.
CORE = ("grad_rms", "grad_max", "update_ratio", "act_mean", "act_std", "act_zero_frac",
        "act_sat_frac", "out_grad_rms", "nonfinite")
MARK = "!"
MARKS = (f"{MARK} = this layer's stat raised an alert at or before the step shown "
         "(the alerts below say when and why)")
#: Under a table with a flagged act_sat_frac: why a higher unflagged value is not an alert.
SATURATION = ("act_sat_frac is flagged only when units also sit at a bound for every sample "
              "(the alert gives their share): a high value without stuck units is not flagged")
GAP = 2  # spaces between columns
PIPE_WIDTH = 100  # output into a pipe or a file (a CI log) with no COLUMNS set
LABEL_MIN = 12  # a layer column narrower than its names when the terminal is narrow


def terminal_width() -> int:
    """``COLUMNS``, else the terminal's width, else (a pipe, a CI log) ``PIPE_WIDTH``."""
    return shutil.get_terminal_size((PIPE_WIDTH, 24)).columns


def printable(text: str) -> str:
    """A name as terminal text: control characters (escape sequences, line breaks) shown
    escaped, never acted on."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def cut(name: str, width: int) -> str:
    """A name in at most ``width`` characters, cut at the front (its end tells most)."""
    return name if len(name) <= width else "…" + name[len(name) - width + 1:]


def cell(v: float | None) -> str:
    return "-" if v is None else fmt(v)


def _head(stat: str) -> tuple[str, str]:
    """A stat's header in two lines, cut at the first underscore: the columns stay as narrow
    as their numbers."""
    first, _, rest = stat.partition("_")
    return (first, rest) if rest else ("", first)


def choose(present: Sequence[str], alerted: Iterable[str], width: int | None, label_w: int,
           order: Sequence[str] = CORE) -> tuple[list[str], list[str]]:
    """(shown, hidden) stats, both in ``present`` order: every alerted stat, then the others
    by ``order`` (most telling first) while they fit in ``width`` (None: all)."""
    if width is None:
        return list(present), []
    must = [s for s in present if s in set(alerted)]
    rest = sorted((s for s in present if s not in must),
                  key=lambda s: order.index(s) if s in order else len(order))
    room = width - label_w
    keep = set(must)
    used = sum(_col_w(s) + GAP for s in must)
    for s in rest:
        if used + _col_w(s) + GAP > room:
            break
        keep.add(s)
        used += _col_w(s) + GAP
    return [s for s in present if s in keep], [s for s in present if s not in keep]


def _col_w(stat: str) -> int:
    return max(9, *(len(p) for p in _head(stat))) + len(MARK)


def table(layers: Sequence[str], stats: Sequence[str],
          values: Mapping[str, Mapping[str, float]], marked: Iterable[tuple[str, str]],
          extra: Sequence[tuple[str, Mapping[str, str]]] = (), width: int | None = None,
          ) -> list[str]:
    """The lines of one table: a row per layer (``extra``: text columns after the layer, as
    (title, layer -> text)), a column per stat, ``!`` on the ``marked`` (layer, stat) cells.
    ``width`` limits the layer column (names cut at the front with ``…``) so that the stat
    columns fit."""
    marks = set(marked)
    names = [printable(la) for la in layers]
    label_w = max([5] + [len(n) for n in names])
    fixed = sum(max([len(t)] + [len(printable(m.get(la, ""))) for la in layers]) + GAP
                for t, m in extra) + sum(_col_w(s) + GAP for s in stats)
    if width is not None and label_w + fixed > width:
        label_w = max(LABEL_MIN, width - fixed)
    heads = [("", "layer"), *(("", t) for t, _ in extra), *(_head(s) for s in stats)]
    rows = []
    for la, name in zip(layers, names):
        row = [cut(name, label_w), *(printable(m.get(la, "")) for _, m in extra)]
        for s in stats:
            v = values.get(la, {}).get(s)
            row.append(cell(v) + (MARK if (la, s) in marks else ""))
        rows.append(row)
    n_text = 1 + len(extra)
    widths = [max([len(h[0]), len(h[1])] + [len(r[i]) for r in rows])
              for i, h in enumerate(heads)]

    def line(cells: Sequence[str]) -> str:
        return (" " * GAP).join(c.ljust(w) if i < n_text else c.rjust(w)
                                for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = []
    if any(h[0] for h in heads):
        out.append(line([h[0] for h in heads]))
    out.append(line([h[1] for h in heads]))
    out.append((" " * GAP).join("─" * w for w in widths))
    out.extend(line(r) for r in rows)
    return out


def notes(stats: Sequence[str], marked: Iterable[tuple[str, str]], hidden: Sequence[str],
          width: int | None) -> list[str]:
    """The lines under a table: the mark's meaning (when a cell is marked), the saturation
    condition (when act_sat_frac is marked), the stats left out for width."""
    marks = set(marked)
    out = []
    if marks:
        out.append(MARKS)
    if any(s == "act_sat_frac" for _, s in marks) and "act_sat_frac" in stats:
        out.append(SATURATION)
    if hidden:
        out.append(f"not shown for width: {', '.join(hidden)} (--stats all, --json or a wider "
                   "terminal show them)")
    if width is None:
        return out
    return [w for line in out for w in wrap(line, width)]


def wrap(text: str, width: int) -> list[str]:
    """Lines of at most ``width`` (a name longer than that stays whole), broken at spaces."""
    return textwrap.wrap(text, width, subsequent_indent="  ", break_on_hyphens=False,
                         break_long_words=False)


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
    out.append("")
    out += notes(shown, [m for m in marked if m[1] in shown], hidden, width)
    out.append("")
    if not run.alerts:
        out.append(f"no alerts in {printable(run.name)}")
        return out
    out.append(f"alerts in {printable(run.name)}: {len(run.alerts)}")
    cols = ("step", "layer", "kind", "stat", "value", "threshold", "cause")
    rows = [[str(a.step), printable(a.layer), a.kind, a.stat, fmt(a.value), fmt(a.threshold),
             a.cause] for a in run.alerts]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
    over = sum(widths) + GAP * (len(cols) - 1) - (width or 0)
    if width and over > 0 and widths[1] > LABEL_MIN:  # cut the layer names at the front
        widths[1] = max(LABEL_MIN, widths[1] - over)
        for r in rows:
            r[1] = cut(r[1], widths[1])
    right = {0, 4, 5}

    def line(cells: Sequence[str]) -> str:
        return (" " * GAP).join(c.rjust(w) if i in right else c.ljust(w)
                                for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out += [line(cols), (" " * GAP).join("─" * w for w in widths), *map(line, rows), ""]
    out += hints(run.alerts, width)
    return out


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
