"""Plain-text table of a Snapshot (``Watcher.report()``)."""

from __future__ import annotations

import math
from typing import Sequence

from gradwatch.alerts import Alert, describe, group
from gradwatch.snapshot import Snapshot

COLUMNS = ("grad_rms", "grad_max", "update_ratio", "act_mean", "act_std", "act_zero_frac",
           "act_sat_frac", "out_grad_rms", "nonfinite")
MAX_GROUPS = 20  # alert entries listed by report(), newest last


def _cell(v: float | None) -> str:
    if v is None:
        return "-"
    if math.isnan(v):
        return "nan"
    if v == 0:
        return "0"
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 else f"{v:.2e}"


def report(snap: Snapshot | None, alerts: Sequence[Alert], types: dict[str, str]) -> str:
    """One row per layer; a cell whose stat was alerted in this window ends with ``!``.
    Then the alerts, one entry per step, kind and cause: the worst layer's message, the
    other layers, the cause and the hint."""
    if snap is None:
        return "gradwatch: nothing flushed yet"
    marked = {(a.layer, a.stat) for a in alerts if a.step <= snap.step}
    head = ["layer", "type", *COLUMNS]
    rows = [head]
    for layer, stats in snap.stats.items():
        row = [layer, types.get(layer, "")]
        for c in COLUMNS:
            cell = _cell(stats.get(c))
            row.append(cell + ("!" if (layer, c) in marked else ""))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [f"gradwatch report, step {snap.step}"
             + (f", {snap.amp_skipped} AMP-skipped step(s)" if snap.amp_skipped else "")]
    for k, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    groups = group([a for a in alerts if a.step <= snap.step],
                   lambda a: (a.step, a.kind, a.cause))
    recent = groups[-MAX_GROUPS:]
    if recent:
        lines.append("")
        shown = sum(len(g.alerts) for g in recent)
        lines.append(f"alerts ({len(alerts)} in all; the newest {shown}, one entry per "
                     f"step, kind and cause):")
        for g in recent:
            lines.extend("  " + line for line in describe(g).splitlines())
    else:
        lines.append("no alerts")
    return "\n".join(lines)
