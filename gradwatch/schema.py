"""What gradwatch writes and reads, in one place, without torch.

The stat names and their order, the TensorBoard tags (built and parsed here only), the alert
record (``Alert``: its fields are the one field list; its markdown table and the parser of
that table are derived from it), the layer-order record, and the one number format of every
view (``fmt``). The writer (``sinks.tensorboard``), the reader, the TensorBoard plugin, the
``gradwatch`` command and the reports all import these names from here, so a TensorBoard
server or ``gradwatch report`` never loads torch.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Sequence

# -- statistics ---------------------------------------------------------------------------------
#: The public statistics, in display order (API.md). Also the TensorBoard tag names.
STATS: tuple[str, ...] = (
    "grad_norm",
    "grad_rms",
    "grad_max",
    "weight_norm",
    "update_ratio",
    "act_mean",
    "act_std",
    "act_max",
    "act_zero_frac",
    "act_sat_frac",
    "out_grad_rms",
    "nonfinite",
)
#: ``Alert.kind``, in the order the reports list them.
KINDS = ("vanishing", "exploding", "nonfinite", "dead", "saturated")
#: The stat a kind of alert is about (the cell a report marks).
ALERT_STAT = {"vanishing": "grad_rms", "exploding": "grad_rms", "dead": "act_zero_frac",
              "saturated": "act_sat_frac", "nonfinite": "nonfinite"}


def unknown_stats(names: Iterable[str]) -> list[str]:
    return [n for n in names if n not in STATS]


# -- numbers -------------------------------------------------------------------------------------
def fmt(v: float) -> str:
    """Every number a person reads (hints, messages, tables, the alert log, the dashboard):
    3 significant digits (``0.547``, ``1.23e-05``, ``2.5e+03``); ``nan``/``inf``/``-inf``
    spelled; zero is ``0``."""
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == 0:
        return "0"
    return f"{v:.3g}"


def json_number(v: float) -> float | str:
    """JSON has no NaN/Infinity: non-finite floats become the strings nan, inf, -inf."""
    if math.isfinite(v):
        return v
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")


# -- TensorBoard tags ------------------------------------------------------------------------------
PREFIX = "gradwatch/"
#: The plugin name of gradwatch's own summaries (the layer-order record) and of its dashboard.
PLUGIN_NAME = "gradwatch"
ALERT_COUNT = "alert_count"
AMP_SKIPPED_TAG = PREFIX + "amp_skipped"
#: The alerts of a step: a markdown table (``alerts_markdown``) in a text summary, one event per
#: step holding every alert of that step.
ALERT_TEXT_TAG = PREFIX + "alerts"
#: ``SummaryWriter.add_text`` files a text under ``<tag>/text_summary``: both are read.
ALERT_TEXT_TAGS = (ALERT_TEXT_TAG, ALERT_TEXT_TAG + "/text_summary")
#: The layer-order record: the watched layers in forward order with their module types, as
#: JSON in a string tensor summary of plugin ``PLUGIN_NAME``.
LAYERS_TAG = PREFIX + "layers"
LAYERS_TAGS = (LAYERS_TAG, LAYERS_TAG + "/text_summary")
LAYERS_VERSION = 1


def scalar_tag(stat: str, layer: str) -> str:
    """The one place where a stat's TensorBoard scalar tag is built."""
    return f"{PREFIX}{stat}/{layer}"


def split_tag(tag: str) -> tuple[str, str] | None:
    """``gradwatch/<stat>/<layer>`` -> (stat, layer); None for any other tag."""
    if not tag.startswith(PREFIX):
        return None
    parts = tag[len(PREFIX):].split("/", 1)
    if len(parts) != 2 or parts[0] not in STATS or not parts[1]:
        return None
    return parts[0], parts[1]


def alert_count_tag(kind: str) -> str:
    return f"{PREFIX}{ALERT_COUNT}/{kind}"


def is_alert_count(tag: str) -> bool:
    return tag.startswith(PREFIX + ALERT_COUNT + "/")


# -- the alert record ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Alert:
    """One finding of the rules: ``kind`` at ``layer`` on ``stat`` at training ``step``.

    ``cause`` (one of ``alerts.CAUSES``) says why, from evidence the watcher measured;
    ``hint`` is one or two sentences with that evidence in numbers and what to try ("" when
    none). The same record is written to the log and read back from it (``alerts_markdown``,
    ``parse_alerts_markdown``)."""

    step: int
    layer: str
    kind: str
    stat: str
    value: float
    threshold: float
    message: str
    cause: str = "unknown"
    hint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> dict[str, Any]:
        """``to_dict`` with non-finite numbers as strings (JSON has no NaN/Infinity)."""
        return {k: json_number(v) if isinstance(v, float) else v
                for k, v in asdict(self).items()}


#: The record's fields, in order: the columns of the alert table.
ALERT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Alert))
_NUMBERS = ("value", "threshold")
_TEXTS = ("message", "hint")  # free text: escaped in a cell
#: Columns of the tables written before the record carried a message (8: with cause and
#: hint) or a cause (6): still read.
_OLD_COLUMNS = {8: ("step", "layer", "kind", "stat", "value", "threshold", "cause", "hint"),
                6: ("step", "layer", "kind", "stat", "value", "threshold")}


def code_span(name: str) -> str:
    """A layer name as one markdown table cell: a code span (so markup in it is shown, not
    rendered) without the characters that would end the span, the cell or the row."""
    for ch, to in (("|", "/"), ("`", ""), ("\r", " "), ("\n", " ")):
        name = name.replace(ch, to)
    return f"`{name}`"


#: Characters escaped in a plain-text markdown cell: they would end the cell or make markup.
_MARKUP = re.compile(r"([\\`*_\[\]<>|])")


def text_cell(text: str) -> str:
    """Free text (a hint, which may quote layer names) as one markdown table cell, shown as
    written: markup characters are backslash-escaped, line breaks become spaces."""
    return _MARKUP.sub(r"\\\1", text.replace("\r", " ").replace("\n", " "))


def _cell(a: Alert, name: str) -> str:
    v = getattr(a, name)
    if name == "layer":
        return code_span(v)
    if name in _NUMBERS:
        return fmt(v)
    if name in _TEXTS:
        return text_cell(v)
    return str(v)


def alerts_markdown(alerts: Sequence[Alert]) -> str:
    """The alerts as one markdown table, a column per field of ``Alert``."""
    head = "| " + " | ".join(ALERT_FIELDS) + " |\n"
    rule = "|" + "|".join("---:" if f in _NUMBERS or f == "step" else "---"
                          for f in ALERT_FIELDS) + "|\n"
    rows = "".join("| " + " | ".join(_cell(a, f) for f in ALERT_FIELDS) + " |\n"
                   for a in alerts)
    return head + rule + rows


_CELL_SPLIT = re.compile(r"(?<!\\)\|")
_UNESCAPE = re.compile(r"\\(.)")


def parse_alerts_markdown(text: str) -> list[Alert]:
    """The rows of a table written by ``alerts_markdown`` (and of the 8- and 6-column tables
    of older versions: their alerts read with an empty message, cause ``unknown``)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("|"):
            line = line[1:]
        if line.endswith("|") and not line.endswith("\\|"):
            line = line[:-1]
        cells = [c.strip() for c in _CELL_SPLIT.split(line)]
        names = ALERT_FIELDS if len(cells) == len(ALERT_FIELDS) else _OLD_COLUMNS.get(len(cells))
        if names is None or not cells[0].lstrip("-").isdigit():
            continue  # header, separator or a foreign line
        raw = dict(zip(names, cells))
        try:
            values: dict[str, Any] = {
                "step": int(raw["step"]), "layer": raw["layer"].strip("`"),
                "value": float(raw["value"]), "threshold": float(raw["threshold"]),
                "message": ""}
        except ValueError:
            continue
        for name in ("kind", "stat", "cause"):
            if name in raw:
                values[name] = raw[name]
        for name in _TEXTS:
            if name in raw:
                values[name] = _UNESCAPE.sub(r"\1", raw[name])
        out.append(Alert(**values))
    return out


def is_cumulative(text: str) -> bool:
    """A table of this version: it holds every alert of its step (an event written later at
    the same step replaces it). Older tables held one write's alerts each."""
    first = text.lstrip().split("\n", 1)[0]
    return first.replace(" ", "") == "|" + "|".join(ALERT_FIELDS) + "|"


def alerts_of_events(events: Iterable[tuple[int, str]]) -> list[Alert]:
    """Every alert of the alert-table events ``(step, text)`` in log order: of several tables
    of this version at one step the last holds them all; older tables all count."""
    last: dict[int, str] = {}
    old: list[tuple[int, str]] = []
    for step, text in events:
        if is_cumulative(text):
            last[step] = text
        else:
            old.append((step, text))
    out = [a for _, text in old for a in parse_alerts_markdown(text)]
    out += [a for text in last.values() for a in parse_alerts_markdown(text)]
    out.sort(key=lambda a: a.step)  # stable: arrival order within a step
    return out


# -- the layer-order record ----------------------------------------------------------------------
def layers_json(layers: Sequence[tuple[str, str]]) -> str:
    """The record's text: ``{"version": 1, "layers": [{"name": ..., "type": ...}, ...]}``,
    layers in forward order (modules never called yet last)."""
    return json.dumps({"version": LAYERS_VERSION,
                       "layers": [{"name": n, "type": t} for n, t in layers]})


def parse_layers_record(text: str) -> list[tuple[str, str]] | None:
    """(name, module type) pairs of a layer-order record, or None when ``text`` is not one
    (a newer version is read as long as it keeps the ``layers`` list)."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("version"), int):
        return None
    items = data.get("layers")
    if not isinstance(items, list):
        return None
    out = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        kind = item.get("type")
        out.append((item["name"], kind if isinstance(kind, str) else ""))
    return out
