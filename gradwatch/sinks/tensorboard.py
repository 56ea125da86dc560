"""TensorBoard sink: scalars ``gradwatch/<stat>/<layer>``, a custom-scalars layout, the
alerts (one text event per step holding every alert of that step) and the layer-order record
``gradwatch/layers``. Tags and record formats come from ``gradwatch.schema``.

Runs on the watcher's background thread. A window's scalars go out as one event of many
values (never ``add_scalars``, which makes one event file per tag).
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections import Counter
from typing import Any, Mapping, Sequence

from gradwatch import checksums
from gradwatch.schema import (
    ALERT_TEXT_TAG,
    AMP_SKIPPED_TAG,
    KINDS,
    LAYERS_TAG,
    LAYERS_VERSION,
    PLUGIN_NAME,
    STATS,
    Alert,
    alert_count_tag,
    alerts_markdown,
    layers_json,
    scalar_tag,
)
from gradwatch.snapshot import Snapshot

#: The most lines in one custom-scalars chart: a stat with more layers gets one chart per
#: module (the name with its block numbers as ``*``: a depth profile of every
#: ``h.*.attn.c_attn``), and a module with more layers is cut in depth order.
MAX_LINES = 12
_DIGITS = re.compile(r"^\d+$")


def module_key(name: str) -> str:
    """``transformer.h.3.attn.c_attn`` -> ``transformer.h.*.attn.c_attn``."""
    return ".".join("*" if _DIGITS.match(p) else p for p in name.split("."))


def _chunks(names: Sequence[str]) -> list[list[str]]:
    return [list(names[i:i + MAX_LINES]) for i in range(0, len(names), MAX_LINES)]


def _exact(stat: str, names: Sequence[str]) -> str:
    return "^" + re.escape(scalar_tag(stat, "")) + "(?:" + "|".join(
        re.escape(n) for n in names) + ")$"


def stat_charts(stat: str, layers: Sequence[str]) -> list[tuple[str, str]]:
    """(title, tag regex) of the charts of one stat over ``layers`` (forward order)."""
    if len(layers) <= MAX_LINES:
        return [(stat, "^" + re.escape(scalar_tag(stat, "")))]
    by: dict[str, list[str]] = {}
    for la in layers:
        by.setdefault(module_key(la), []).append(la)
    charts: list[tuple[str, str]] = []
    single: list[str] = []
    for key, names in by.items():
        if len(names) == 1:
            single.append(names[0])
            continue
        parts = _chunks(names)
        for k, part in enumerate(parts):
            title = f"{stat} · {key}" + (f" ({k + 1}/{len(parts)})" if len(parts) > 1 else "")
            if len(parts) == 1 and "*" in key:  # every layer of this module, also later ones
                rx = "^" + re.escape(scalar_tag(stat, "")) + ".".join(
                    r"\d+" if p == "*" else re.escape(p) for p in key.split(".")) + "$"
            else:
                rx = _exact(stat, part)
            charts.append((title, rx))
    parts = _chunks(single)
    for k, part in enumerate(parts):
        title = f"{stat} · other layers" + (f" ({k + 1}/{len(parts)})" if len(parts) > 1 else "")
        charts.append((title, _exact(stat, part)))
    return charts


def layout(layers: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """Custom-scalars layout. ``layers``: stat -> the layers having it, in forward order
    (None: one chart per stat). A stat with at most ``MAX_LINES`` layers is one chart in the
    category ``gradwatch``; a stat with more gets a category of its own, one chart per
    module (``stat_charts``); a stat no layer has gets none."""
    main: dict[str, Any] = {}
    out: dict[str, Any] = {"gradwatch": main}
    for s in STATS:
        if layers is not None and not layers.get(s):
            continue
        charts = stat_charts(s, layers.get(s, ()) if layers is not None else ())
        if len(charts) == 1:
            main[s] = ["Multiline", [charts[0][1]]]
        else:
            out[f"gradwatch · {s}"] = {t: ["Multiline", [rx]] for t, rx in charts}
    main["alert_count"] = ["Multiline", ["^" + re.escape(alert_count_tag(""))]]
    return out


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
        plugin_data=SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME,
                                               content=str(LAYERS_VERSION).encode()),
        data_class=DataClass.DATA_CLASS_TENSOR,  # else neither data provider lists it
        summary_description="gradwatch layer order (JSON)")
    tensor = TensorProto(dtype=types_pb2.DT_STRING, string_val=[text.encode("utf-8")])
    tensor.tensor_shape.SetInParent()  # a scalar string
    get_file_writer().add_summary(
        Summary(value=[Summary.Value(tag=LAYERS_TAG, metadata=meta, tensor=tensor)]), step)


class _WindowTemplate:
    """The serialized ``Summary`` of a window's stats, built once per layer/stat set.

    Byte for byte what ``Summary(value=[Summary.Value(tag=t, simple_value=v), ...])``
    serializes to (each value: its tag, then its fp32 ``simple_value``), with the floats
    written into a prebuilt buffer by numpy and the NaN values (not collected) cut out, so
    a window of 15,000 scalars costs a few array operations instead of 15,000 protos made
    one by one in Python. Tags do not change between windows; the set is rebuilt only when
    the layers or their stats do (a lazy module materialised).
    """

    def __init__(self) -> None:
        self._key: tuple[tuple[str, tuple[str, ...]], ...] | None = None
        self._buf: Any = None  # uint8: every value record, floats zero
        self._at: Any = None  # [n, 4] indices of each record's float bytes in _buf
        self._owner: Any = None  # per byte of _buf: the index of its record
        self._n = 0
        self._layout: Any = None  # the snapshot layout ``_key`` was last checked against

    def _build(self, key: tuple[tuple[str, tuple[str, ...]], ...]) -> None:
        import numpy as np

        parts: list[bytes] = []
        at: list[int] = []
        sizes: list[int] = []
        pos = 0
        for layer, stats in key:
            for stat in stats:
                tag = scalar_tag(stat, layer).encode("utf-8")
                body = b"\x0a" + _varint(len(tag)) + tag + b"\x15"  # tag=1, simple_value=2
                rec = b"\x0a" + _varint(len(body) + 4) + body  # Summary.value=1
                parts.append(rec + b"\0\0\0\0")
                at.append(pos + len(rec))
                sizes.append(len(rec) + 4)
                pos += len(rec) + 4
        self._buf = np.frombuffer(b"".join(parts), dtype=np.uint8)
        self._at = np.asarray(at, dtype=np.intp)[:, None] + np.arange(4)
        self._owner = np.repeat(np.arange(len(sizes)), sizes)
        self._n = len(sizes)
        self._key = key

    def summary(self, stats: Mapping[str, Mapping[str, float]], amp_skipped: float,
                snap: Snapshot | None = None) -> bytes:
        """The window's serialized Summary: every non-NaN stat (layers and stats in
        ``stats``' order), then ``AMP_SKIPPED_TAG``. ``snap``: the snapshot ``stats`` are
        of; one that keeps its host array (``Snapshot.build``) gives the values in one read
        of it."""
        import itertools

        import numpy as np

        values = None if snap is None else snap.values
        lay = None if snap is None else snap.layout
        if values is not None and lay is not None and lay.unique:
            if lay is not self._layout:  # the same layers and stats as ``lay.keys``
                if lay.keys != self._key:
                    self._build(lay.keys)
                self._layout = lay
            flat = f32 = values[lay.flat_rows, lay.flat_cols].astype("<f4")
        else:
            key = tuple((layer, tuple(s)) for layer, s in stats.items())
            if key != self._key:
                self._build(key)
            self._layout = None
            flat = np.fromiter(itertools.chain.from_iterable(
                s.values() for s in stats.values()), dtype=np.float64, count=self._n)
            with np.errstate(over="ignore"):  # beyond fp32: inf, as the proto stores it
                f32 = flat.astype("<f4")
        buf = self._buf.copy()
        buf[self._at] = f32.view(np.uint8).reshape(-1, 4)
        nan = np.isnan(flat)
        if nan.any():
            buf = buf[~nan[self._owner]]
        return buf.tobytes() + _values_bytes(((AMP_SKIPPED_TAG, amp_skipped),))


@functools.lru_cache(maxsize=256)
def _values_bytes(values: tuple[tuple[str, float], ...]) -> bytes:
    """A serialized Summary of ``values`` (tag, simple_value): appended to another one's
    bytes, its values follow that one's (a repeated field's records concatenate). Kept
    for the values seen last: a window's counts (alerts by kind, skipped AMP steps) are
    the same from one window to the next."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    return Summary(value=[Summary.Value(tag=t, simple_value=v) for t, v in values]
                   ).SerializeToString()


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


#: Windows are pushed to disk at most this often (seconds), and on every explicit flush:
#: with ``every=1`` a file flush per window would cost more than the window itself.
FLUSH_SECS = 1.0


class TensorBoardSink:
    def __init__(self, writer: Any, owns: bool) -> None:
        checksums.install()  # TensorBoard's Python CRC32C: ~40 ms per 1,000-layer flush
        self.writer = writer
        self.owns = owns
        self._layout_written = False
        self._layers_written: tuple[tuple[str, str], ...] | None = None
        self._counts: Counter[str] = Counter()
        # the alerts written at the newest step: a second write at that step rewrites them all
        # (TensorBoard keeps one event per step and tag)
        self._step_alerts: tuple[int, list[Alert]] = (-1, [])
        self._flushed = time.monotonic()
        self._template = _WindowTemplate()

    def write(self, snap: Snapshot, alerts: Sequence[Alert], force: bool = False,
              layers: Sequence[tuple[str, str]] | None = None) -> None:
        """One window; ``layers``: (name, module type) in forward order, recorded when it
        differs from the order recorded last."""
        w = self.writer
        if not self._layout_written:
            have = {st: [la for la, by in snap.stats.items()
                         if not math.isnan(by.get(st, math.nan))] for st in STATS}
            w.add_custom_scalars(layout(have))
            self._layout_written = True
        if layers is not None and tuple(layers) != self._layers_written:
            add_layers(w, layers, snap.step)
            self._layers_written = tuple(layers)
        if getattr(w, "_get_file_writer", None) is not None:
            head = self._template.summary(snap.stats, float(snap.amp_skipped), snap)
            self._alerts(alerts, snap.step, [], head)
        else:
            values = [(scalar_tag(stat, layer), v) for layer, stats in snap.stats.items()
                      for stat, v in stats.items() if not math.isnan(v)]
            values.append((AMP_SKIPPED_TAG, float(snap.amp_skipped)))
            self._alerts(alerts, snap.step, values)
        if force or time.monotonic() - self._flushed >= FLUSH_SECS:
            self.flush()

    def flush(self) -> None:
        self.writer.flush()
        self._flushed = time.monotonic()

    def _write_window(self, values: Sequence[tuple[str, float]], step: int,
                      head: bytes = b"") -> None:
        """All scalars of a window in one event (one Summary with many values: the same
        records ``add_scalar`` writes one by one, at a fraction of the cost): ``head`` (a
        serialized Summary holding the window's stats) then ``values``. The Event is parsed
        once from its bytes (its summary is field 5) and handed to the file writer, which
        sets its time and step and serialises it: ``add_summary`` would first copy the
        Summary into a new Event, as long again as the parse. Writers other than a
        SummaryWriter get ``add_scalar`` calls."""
        get = getattr(self.writer, "_get_file_writer", None)
        if get is None:
            for tag, v in values:
                self.writer.add_scalar(tag, v, step)
            return
        from tensorboard.compat.proto.event_pb2 import Event

        body = head + _values_bytes(tuple(values))
        get().add_event(Event.FromString(b"\x2a" + _varint(len(body)) + body), step)

    def write_alerts(self, alerts: Sequence[Alert], step: int) -> None:
        """Alerts found between windows (a per-step alert): their counts and table."""
        self._alerts(alerts, step, [])

    def _alerts(self, alerts: Sequence[Alert], step: int,
                values: list[tuple[str, float]], head: bytes = b"") -> None:
        """``head`` (see ``_write_window``), ``values`` and the alert counts as one event at
        ``step``, then the table of every alert written at ``step`` (this call's and earlier
        calls' at the same step)."""
        for a in alerts:
            self._counts[a.kind] += 1
        values += [(alert_count_tag(kind), float(self._counts[kind])) for kind in KINDS]
        self._write_window(values, step, head)
        if alerts:
            at, those = self._step_alerts
            if at != step:
                at, those = step, []
            those = those + list(alerts)
            self._step_alerts = (at, those)
            add_text(self.writer, ALERT_TEXT_TAG, alerts_markdown(those), step)

    def close(self) -> None:
        self.writer.flush()
        if self.owns:
            self.writer.close()
