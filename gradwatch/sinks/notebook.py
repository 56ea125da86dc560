"""HTML form of ``Watcher.report()`` for Jupyter (``Watcher._repr_html_``).

The same table as the text report (the latest window per layer, alerted cells marked),
then the alerts with their cause and hint. Layer names, types and alert texts are data:
every one is HTML-escaped.
"""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING, Sequence

from gradwatch.alerts import Alert
from gradwatch.sinks.console import COLUMNS, MARK, MARKS, NOTHING, SATURATION, _cell

if TYPE_CHECKING:
    from gradwatch.snapshot import Snapshot

#: newest alerts listed below the table (all are counted)
MAX_LISTED = 20
_MARK = "background:#fdd;font-weight:bold"
_NUM = "text-align:right;font-family:monospace"


def html_report(snap: Snapshot | None, alerts: Sequence[Alert], types: dict[str, str],
                title: str = "gradwatch", waiting: str | None = None) -> str:
    """A ``<div>`` with the table and the alerts; ``title`` heads it (plain text).
    ``waiting``: why nothing was flushed yet (as in ``console.report``)."""
    out = [f'<div class="gradwatch-report"><p><b>{escape(title)}</b>']
    if snap is None:
        why = NOTHING.split(": ", 1)[1] + (f": {waiting}" if waiting else "")
        out.append(f": {escape(why)}</p></div>")
        return "".join(out)
    out.append(f" &mdash; step {snap.step}")
    if snap.amp_skipped:
        out.append(f", {snap.amp_skipped} AMP-skipped step(s)")
    out.append("</p>")
    shown = [a for a in alerts if a.step <= snap.step]
    marked: dict[tuple[str, str], Alert] = {(a.layer, a.stat): a for a in shown}
    columns = list(dict.fromkeys([*COLUMNS, *(s for _, s in sorted(marked))]))
    out.append("<table><thead><tr><th>layer</th><th>type</th>")
    out.extend(f"<th>{escape(c)}</th>" for c in columns)
    out.append("</tr></thead><tbody>")
    for layer, stats in snap.stats.items():
        out.append(f"<tr><td><code>{escape(layer)}</code></td>"
                   f"<td>{escape(types.get(layer, ''))}</td>")
        for c in columns:
            text = escape(_cell(stats.get(c)))
            a = marked.get((layer, c))
            if a is None:
                out.append(f'<td style="{_NUM}">{text}</td>')
            else:
                out.append(f'<td class="alerted" style="{_NUM};{_MARK}" '
                           f'title="{escape(a.kind)}">{text}{MARK}</td>')
        out.append("</tr>")
    out.append("</tbody></table>")
    if marked:
        out.append(f'<p class="gradwatch-marks">{escape(MARKS)}</p>')
    if any(s == "act_sat_frac" for _, s in marked):
        out.append(f'<p class="gradwatch-marks">{escape(SATURATION)}</p>')
    recent = shown[-MAX_LISTED:]
    if not recent:
        out.append("<p>no alerts</p></div>")
        return "".join(out)
    out.append(f"<p>alerts ({len(alerts)} in all, newest {len(recent)}):</p>")
    out.append("<table><thead><tr><th>step</th><th>layer</th><th>kind</th><th>message</th>"
               "<th>cause</th><th>hint</th></tr></thead><tbody>")
    for a in recent:
        out.append(f"<tr><td>{a.step}</td><td><code>{escape(a.layer)}</code></td>"
                   f"<td>{escape(a.kind)}</td><td>{escape(a.message)}</td>"
                   f"<td>{escape(a.cause)}</td><td>{escape(a.hint)}</td></tr>")
    out.append("</tbody></table></div>")
    return "".join(out)
