"""TensorBoard sink: scalars ``gradwatch/<stat>/<layer>``, a custom-scalars layout, alerts,
and the layer-order record ``gradwatch/layers``.

Runs on the watcher's background thread. Uses ``add_scalar`` with hierarchical tags (never
``add_scalars``, which makes one event file per tag).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from typing import Any, Sequence

from gradwatch.alerts import KINDS, Alert
from gradwatch.buffers import STATS
from gradwatch.snapshot import Snapshot

ALERT_TEXT_TAG = "gradwatch/alerts"
#: The layer-order record: the watched layers in forward order with their module types, as
#: JSON in a string tensor summary of this plugin name (TensorBoard's TEXT tab ignores it;
#: its event reader and data provider both serve it). Written with the first window and
#: again only when the order changes (a layer first called later).
LAYERS_TAG = "gradwatch/layers"
LAYERS_PLUGIN = "gradwatch"
LAYERS_VERSION = 1


def scalar_tag(stat: str, layer: str) -> str:
    """The one place where a TensorBoard scalar tag is built."""
    return f"gradwatch/{stat}/{layer}"


def alert_count_tag(kind: str) -> str:
    return f"gradwatch/alert_count/{kind}"


def layout() -> dict[str, Any]:
    """Custom-scalars layout: category ``gradwatch``, one multi-line chart per stat."""
    charts = {s: ["Multiline", ["^" + re.escape(scalar_tag(s, ""))]] for s in STATS}
    charts["alert_count"] = ["Multiline", ["^" + re.escape(alert_count_tag(""))]]
    return {"gradwatch": charts}


def _code_span(name: str) -> str:
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


def alerts_markdown(alerts: Sequence[Alert]) -> str:
    head = ("| step | layer | kind | stat | value | threshold | cause | hint |\n"
            "|---:|---|---|---|---:|---:|---|---|\n")
    rows = "".join(
        f"| {a.step} | {_code_span(a.layer)} | {a.kind} | {a.stat} "
        f"| {a.value:.4g} | {a.threshold:.4g} | {a.cause} | {text_cell(a.hint)} |\n"
        for a in alerts
    )
    return head + rows


def add_text(writer: Any, tag: str, text: str, step: int) -> None:
    """A markdown text summary under exactly ``tag`` (``SummaryWriter.add_text`` would file
    it under ``<tag>/text_summary``)."""
    get_file_writer = getattr(writer, "_get_file_writer", None)
    if get_file_writer is None:
        writer.add_text(tag, text, step)
        return
    from torch.utils.tensorboard.summary import text as text_summary

    summary = text_summary(tag, text)
    summary.value[0].tag = tag
    get_file_writer().add_summary(summary, step)


def layers_json(layers: Sequence[tuple[str, str]]) -> str:
    """The record's text: ``{"version": 1, "layers": [{"name": ..., "type": ...}, ...]}``,
    layers in forward order (modules never called yet last)."""
    return json.dumps({"version": LAYERS_VERSION,
                       "layers": [{"name": n, "type": t} for n, t in layers]})


def add_layers(writer: Any, layers: Sequence[tuple[str, str]], step: int) -> None:
    """Write the layer-order record at ``step``. Writers other than a SummaryWriter get it
    through ``add_text`` (filed under ``gradwatch/layers/text_summary``, read back too)."""
    text = layers_json(layers)
    get_file_writer = getattr(writer, "_get_file_writer", None)
    if get_file_writer is None:
        writer.add_text(LAYERS_TAG, text, step)
        return
    from tensorboard.compat.proto import types_pb2
    from tensorboard.compat.proto.summary_pb2 import DataClass, Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto

    meta = SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(plugin_name=LAYERS_PLUGIN,
                                               content=str(LAYERS_VERSION).encode()),
        data_class=DataClass.DATA_CLASS_TENSOR,  # else neither data provider lists it
        summary_description="gradwatch layer order (JSON)")
    tensor = TensorProto(dtype=types_pb2.DT_STRING, string_val=[text.encode("utf-8")])
    tensor.tensor_shape.SetInParent()  # a scalar string
    get_file_writer().add_summary(
        Summary(value=[Summary.Value(tag=LAYERS_TAG, metadata=meta, tensor=tensor)]), step)


#: Windows are pushed to disk at most this often (seconds), and on every explicit flush:
#: with ``every=1`` a file flush per window would cost more than the window itself.
FLUSH_SECS = 1.0


class TensorBoardSink:
    def __init__(self, writer: Any, owns: bool) -> None:
        self.writer = writer
        self.owns = owns
        self._layout_written = False
        self._layers_written: tuple[tuple[str, str], ...] | None = None
        self._counts: Counter[str] = Counter()
        self._flushed = time.monotonic()

    def write(self, snap: Snapshot, alerts: Sequence[Alert], force: bool = False,
              layers: Sequence[tuple[str, str]] | None = None) -> None:
        """One window; ``layers``: (name, module type) in forward order, recorded when it
        differs from the order recorded last."""
        w = self.writer
        if not self._layout_written:
            w.add_custom_scalars(layout())
            self._layout_written = True
        if layers is not None and tuple(layers) != self._layers_written:
            add_layers(w, layers, snap.step)
            self._layers_written = tuple(layers)
        values = [(scalar_tag(stat, layer), v) for layer, stats in snap.stats.items()
                  for stat, v in stats.items() if not math.isnan(v)]
        values.append(("gradwatch/amp_skipped", float(snap.amp_skipped)))
        self._alerts(alerts, snap.step, values)
        if force or time.monotonic() - self._flushed >= FLUSH_SECS:
            self.flush()

    def flush(self) -> None:
        self.writer.flush()
        self._flushed = time.monotonic()

    def _write_window(self, values: Sequence[tuple[str, float]], step: int) -> None:
        """All scalars of a window in one event (one Summary with many values: the same
        records ``add_scalar`` writes one by one, at a fraction of the cost). Writers other
        than a SummaryWriter get ``add_scalar`` calls."""
        get = getattr(self.writer, "_get_file_writer", None)
        if get is None:
            for tag, v in values:
                self.writer.add_scalar(tag, v, step)
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=t, simple_value=v) for t, v in values])
        get().add_summary(summary, step)

    def write_alerts(self, alerts: Sequence[Alert], step: int) -> None:
        """Alerts found between windows (a per-step alert): their counts and table."""
        self._alerts(alerts, step, [])

    def _alerts(self, alerts: Sequence[Alert], step: int,
                values: list[tuple[str, float]]) -> None:
        """``values`` and the alert counts as one event at ``step``, then the alerts' table."""
        for a in alerts:
            self._counts[a.kind] += 1
        values += [(alert_count_tag(kind), float(self._counts[kind])) for kind in KINDS]
        self._write_window(values, step)
        if alerts:
            add_text(self.writer, ALERT_TEXT_TAG, alerts_markdown(alerts), step)

    def close(self) -> None:
        self.writer.flush()
        if self.owns:
            self.writer.close()
