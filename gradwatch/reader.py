"""Read gradwatch data back from a TensorBoard log directory.

Uses TensorBoard's own event reader (``EventAccumulator``), one per run directory (a
directory that directly holds ``*tfevents*`` files). The tag scheme and the record formats
are ``gradwatch.schema``'s: scalars ``gradwatch/<stat>/<layer>``, cumulative alert counts
``gradwatch/alert_count/<kind>``, the alerts as a markdown table under the text tag
``gradwatch/alerts`` (one event per step holding all of that step's alerts; logs of older
versions are read too) and the layer-order record ``gradwatch/layers`` (JSON). Imports no
torch.

Layer order: the newest layer-order record gives it (forward order). Logs written before
the record existed fall back to the order in which the layers' tags first appear in the
event files (``read_logdir``: the first window's order, which is forward order for every
layer called in the first step), or, where the tag order is not defined (TensorBoard's
data provider), to a natural sort of the names (numbers compared as numbers).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from gradwatch.schema import (
    ALERT_COUNT,
    ALERT_STAT,
    ALERT_TEXT_TAGS,
    LAYERS_TAGS,
    PREFIX,
    STATS,
    Alert,
    alerts_of_events,
    is_alert_count,
    json_number,
    parse_alerts_markdown,
    parse_layers_record,
    split_tag,
)

#: An alert read back from a log: the same record the watcher raised.
AlertRecord = Alert
__all__ = ["ALERT_COUNT", "ALERT_STAT", "ALERT_TEXT_TAGS", "LAYERS_TAGS", "PREFIX", "STATS",
           "Alert", "AlertRecord", "LogdirError", "RunData", "json_number", "read_logdir",
           "parse_alerts_markdown", "parse_layers_record", "split_tag", "natural_sort",
           "newest_record", "build_run", "read_run", "find_runs", "run_name"]


class LogdirError(ValueError):
    """A log directory that is missing, empty, or holds no gradwatch data."""


@dataclass
class RunData:
    """Everything gradwatch wrote into one run directory."""

    name: str
    path: str
    layers: list[str] = field(default_factory=list)  # forward order (see the module doc)
    types: dict[str, str] = field(default_factory=dict)  # layer -> module type (the record)
    order: str = "record"  # where the order came from: "record", "first-seen" or "natural"
    stats: list[str] = field(default_factory=list)  # present stats, in STATS order
    # stat -> layer -> [(step, value)] sorted by step
    series: dict[str, dict[str, list[tuple[int, float]]]] = field(default_factory=dict)
    alerts: list[Alert] = field(default_factory=list)
    alert_counts: dict[str, int] = field(default_factory=dict)

    @property
    def last_step(self) -> int:
        return max((pts[-1][0] for by in self.series.values() for pts in by.values() if pts),
                   default=0)

    def steps(self) -> list[int]:
        """Every step at which some stat was written, ascending."""
        return sorted({s for by in self.series.values() for pts in by.values() for s, _ in pts})

    def latest(self) -> dict[str, dict[str, tuple[int, float]]]:
        """layer -> stat -> (step, value) of the newest point."""
        out: dict[str, dict[str, tuple[int, float]]] = {la: {} for la in self.layers}
        for stat in self.stats:
            for layer, pts in self.series[stat].items():
                if pts:
                    out[layer][stat] = pts[-1]
        return out

    def matrix(self, stat: str) -> tuple[list[str], list[int], list[list[float]]]:
        """(layers having ``stat``, steps, values[layer][step]) with NaN where absent."""
        by = self.series.get(stat, {})
        layers = [la for la in self.layers if la in by]
        steps = self.steps()
        col = {s: j for j, s in enumerate(steps)}
        rows = []
        for la in layers:
            row = [math.nan] * len(steps)
            for s, v in by[la]:
                row[col[s]] = v
            rows.append(row)
        return layers, steps, rows

    def alerted(self) -> dict[tuple[str, str], int]:
        """(layer as in tags, the alert's stat) -> step of the newest alert on it."""
        out: dict[tuple[str, str], int] = {}
        for a in self.alerts:
            key = (a.layer, a.stat)
            out[key] = max(out.get(key, a.step), a.step)
        return out


def newest_record(records: Iterable[tuple[int, str]]) -> list[tuple[str, str]] | None:
    """The readable layer-order record of the highest step (the last one written there)."""
    best: tuple[int, list[tuple[str, str]]] | None = None
    for step, text in records:
        parsed = parse_layers_record(text)
        if parsed is not None and (best is None or step >= best[0]):
            best = (step, parsed)
    return None if best is None else best[1]


_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key comparing the digit runs of a name as numbers: ``h.2`` before ``h.10``."""
    return tuple((1, int(p), p) if p.isdigit() else (0, 0, p)
                 for p in _DIGITS.split(name) if p)


def natural_sort(names: Sequence[str]) -> list[str]:
    return sorted(names, key=natural_key)


def run_name(rel: str, logdir: str) -> str:
    """A run's name: its path relative to the logdir; the logdir itself (``.``) is named
    after its directory."""
    if rel not in (".", ""):
        return rel
    return os.path.basename(os.path.abspath(logdir)) or logdir or "."


def find_runs(logdir: str) -> list[str]:
    """Directories under ``logdir`` (itself included) that directly hold event files."""
    if not os.path.exists(logdir):
        raise LogdirError(f"logdir {logdir!r} does not exist")
    if not os.path.isdir(logdir):
        what = "is a file" if os.path.isfile(logdir) else "is not a directory"
        raise LogdirError(f"logdir {logdir!r} {what}: give the directory that holds the runs")
    runs = []
    for root, dirs, files in os.walk(logdir):
        dirs.sort()
        if any("tfevents" in f for f in files):
            runs.append(root)
    if not runs:
        raise LogdirError(f"logdir {logdir!r} holds no TensorBoard event files")
    return runs


def build_run(name: str, path: str, scalars: Iterable[tuple[str, list[tuple[int, float]]]],
              alert_texts: Iterable[tuple[int, str]],
              layer_records: Iterable[tuple[int, str]] = (),
              natural: bool = False) -> RunData:
    """A RunData from (tag, points) pairs, the alert texts and the layer-order records, both as
    (step, text) in log order. The newest record orders the layers (layers it does not name follow);
    without one, the layers come in the order of ``scalars``, or sorted by name with
    ``natural`` (``natural_sort``: for readers whose tag order is not defined)."""
    def fallback(names: list[str]) -> list[str]:
        return natural_sort(names) if natural else names

    run = RunData(name, path)
    seen_layers: dict[str, None] = {}
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for tag, pts in scalars:
        if is_alert_count(tag):
            if pts:
                run.alert_counts[tag.rsplit("/", 1)[1]] = int(max(pts)[1])
            continue
        st = split_tag(tag)
        if st is None:
            continue
        stat, layer = st
        seen_layers.setdefault(layer, None)
        series.setdefault(stat, {})[layer] = sorted(pts)
    record = newest_record(layer_records)
    if record is None:
        run.layers = fallback(list(seen_layers))
        run.order = "natural" if natural else "first-seen"
    else:
        named = [n for n, _ in record if n in seen_layers]
        listed = set(named)
        run.layers = named + fallback([la for la in seen_layers if la not in listed])
        run.types = {n: t for n, t in record if n in seen_layers and t}
    run.stats = [s for s in STATS if s in series]
    run.series = {s: series[s] for s in run.stats}
    run.alerts = alerts_of_events(alert_texts)
    return run


def decode_strings(arr: Any) -> list[str]:
    """The strings of a string tensor (numpy array of bytes) as text."""
    return [item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)
            for item in arr.flat]


def _texts(acc: Any, tag: str) -> list[tuple[int, str]]:
    from tensorboard.util import tensor_util

    return [(ev.step, text) for ev in acc.Tensors(tag)
            for text in decode_strings(tensor_util.make_ndarray(ev.tensor_proto))]


def read_run(path: str, name: str) -> RunData:
    from tensorboard.backend.event_processing import event_accumulator as ea

    from gradwatch import checksums

    checksums.install()  # TensorBoard's reader checks each record's CRC32C in Python

    # 0 keeps every event: "every alert" means every one, not a reservoir sample
    acc = ea.EventAccumulator(path, size_guidance={ea.SCALARS: 0, ea.TENSORS: 0,
                                                   ea.HISTOGRAMS: 1, ea.IMAGES: 1})
    acc.Reload()
    tags = acc.Tags()
    scalars = [(t, [(e.step, float(e.value)) for e in acc.Scalars(t)])
               for t in tags.get("scalars", []) if t.startswith(PREFIX)]
    # SummaryWriter.add_text stores the text under "<tag>/text_summary"
    tensors = tags.get("tensors", [])
    texts = [x for t in tensors if t in ALERT_TEXT_TAGS for x in _texts(acc, t)]
    records = [x for t in tensors if t in LAYERS_TAGS for x in _texts(acc, t)]
    return build_run(name, path, scalars, texts, records)


def read_logdir(logdir: str | os.PathLike[str]) -> list[RunData]:
    """Every run under ``logdir`` that holds gradwatch data, in directory order.

    Raises ``LogdirError`` (naming the path) when the directory is missing, has no event
    files, or none of them holds gradwatch data.
    """
    path = os.fspath(logdir)
    runs = []
    for d in find_runs(path):
        run = read_run(d, run_name(os.path.relpath(d, path), path))
        if run.layers or run.alerts:
            runs.append(run)
    if not runs:
        raise LogdirError(f"the event files under {path!r} hold no gradwatch data")
    return runs
