"""Plain-text tables of per-layer stats: ``gradwatch report`` (``gradwatch.textreport``) and
``Watcher.report()``.

One renderer, one meaning per mark in every view: a cell ending in ``!`` is a layer's stat
that raised an alert (at or before the step shown; the alerts below the table say when and
why), explained in one line under the table (``MARKS``). Columns never drop an alerted stat
for width: the other stats go first (named under the table). Needs nothing beyond the
runtime install (no rich); names are printed with control characters escaped.
"""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

from gradwatch.alerts import Alert, describe, group
from gradwatch.schema import fmt

if TYPE_CHECKING:
    from gradwatch.snapshot import Snapshot

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
LABEL_MIN = 12  # a layer column narrower than its names when the terminal is narrow


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


COLUMNS = CORE
MAX_GROUPS = 20  # alert entries listed by report(), newest last
NOTHING = "gradwatch: nothing flushed yet"


def report(snap: Snapshot | None, alerts: Sequence[Alert], types: dict[str, str],
           waiting: str | None = None) -> str:
    """One row per layer; a cell whose stat raised an alert (at or before this window) ends
    with ``!``, explained under the table. Then the alerts, one entry per step, kind and
    cause: the worst layer's message, the other layers, the cause and the hint. ``waiting``:
    why nothing was flushed yet (forward passes without a step), said instead of the table."""
    if snap is None:
        return NOTHING + (f": {waiting}" if waiting else "")
    shown = [a for a in alerts if a.step <= snap.step]
    marked = {(a.layer, a.stat) for a in shown}
    columns = list(dict.fromkeys([*COLUMNS, *(s for _, s in sorted(marked))]))
    lines = [f"gradwatch report, step {snap.step}"
             + (f", {snap.amp_skipped} AMP-skipped step(s)" if snap.amp_skipped else "")]
    layers = list(snap.stats)
    lines += table(layers, columns, snap.stats, marked, extra=[("type", types)])
    lines += notes(columns, marked, (), None)
    groups = group(shown, lambda a: (a.step, a.kind, a.cause))
    recent = groups[-MAX_GROUPS:]
    if recent:
        lines.append("")
        listed = sum(len(g.alerts) for g in recent)
        lines.append(f"alerts: {len(alerts)} in all, the newest {listed} in {len(recent)} "
                     f"entr{'y' if len(recent) == 1 else 'ies'} (one per step, kind and cause):")
        for g in recent:
            lines.extend("  " + line for line in describe(g).splitlines())
    else:
        lines.append("no alerts")
    return "\n".join(lines)


_cell = cell  # the notebook view's cells
