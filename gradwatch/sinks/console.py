"""Plain-text table of a Snapshot (``Watcher.report()``), drawn by ``gradwatch.textreport``
(the renderer of ``gradwatch report`` too: the same marks, the same number format)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from gradwatch.alerts import Alert, describe, group
from gradwatch.schema import fmt
from gradwatch.textreport import CORE, notes, table

if TYPE_CHECKING:
    from gradwatch.snapshot import Snapshot

COLUMNS = CORE
MAX_GROUPS = 20  # alert entries listed by report(), newest last
NOTHING = "gradwatch: nothing flushed yet"


def _cell(v: float | None) -> str:
    return "-" if v is None else fmt(v)


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
