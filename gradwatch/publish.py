"""The background half of a flush: host copy -> Snapshot -> rules -> sinks.

Runs on the worker thread, so the training thread only launches the device -> host copy.
Alerts found here go to the watcher's inbox (``inbox.AlertInbox``), which the training
thread delivers from (at its next ``step()``/``flush()``/``close()``). Each part (rules,
sink, pictures) is switched off by the fault guard after its first failure, reported once.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from gradwatch.alerts import Alert
from gradwatch.buffers import FINAL_KEYS
from gradwatch.distributed import is_writer_rank
from gradwatch.faults import FaultGuard
from gradwatch.hostcopy import HostCopy
from gradwatch.inbox import AlertInbox
from gradwatch.rules import Rules
from gradwatch.selection import LayerInfo
from gradwatch.snapshot import Layout, Snapshot, final_values
from gradwatch.worker import Worker


class Publisher:
    """The background side of one watcher: windows in, ``latest`` and alerts out."""

    def __init__(self, infos: Sequence[LayerInfo], applies: Sequence[tuple[str, ...]],
                 rules: Rules, sink: Any, pictures: Any, guard: FaultGuard,
                 inbox: AlertInbox) -> None:
        self._infos = infos  # shared with the watcher: lazy modules replace its items
        self._applies = applies
        self._rules = rules
        self._sink: Any = sink if is_writer_rank() else None
        self._pictures: Any = pictures if is_writer_rank() else None
        self._faults = guard
        self.off = guard.off  # "rules", "sink", "pictures": switched off after a failure
        self.inbox = inbox
        self.latest: Snapshot | None = None
        self._layout: Layout | None = None  # the last window's (``Snapshot.build``)
        self._names: list[str] = []  # its layers in forward order (the rules' order)
        self._layers: list[tuple[str, str]] = []  # all its layers (the sink's): name, type
        self.worker = Worker(lambda e: guard.report("background writer", "*", e, defer=True))

    # -- from the training thread -----------------------------------------------------------
    def window(self, step: int, copy: HostCopy, order: list[int], amp: int,
               hist: Any = None, force: bool = False, host_nf: Any = None) -> None:
        """Queue a window (it may wait for the worker's next tick, ``worker.py``);
        ``force``: taken at once and pushed to disk (an explicit flush); ``host_nf``: per
        layer, non-finite outputs counted on the host (light steps, from the trace)."""
        self.worker.submit(lambda: self._process(step, copy, order, amp, hist, force,
                                                 host_nf), later=not force)

    def flush_sink(self) -> None:
        """Queue a writer flush (an explicit flush of an empty window)."""
        if self._sink is not None:
            self.worker.submit(lambda: self._guard("sink", "TensorBoard sink",
                                                   self._sink.flush))

    def write_step_alert(self, a: Alert, step: int) -> None:
        """A per-step alert (found on the training thread, already in the inbox): written."""
        if self._sink is not None:
            self.worker.submit(lambda: self._guard("sink", "TensorBoard sink",
                                                   lambda: self._sink.write_alerts([a], step)))

    def close(self, left: Callable[[], float | None]) -> None:
        """Wait for the queued windows (within ``left()`` seconds), close the sink, stop."""
        try:
            done = self.worker.join(left())
            if self._sink is not None:
                if done:
                    self.worker.submit(self._close_sink)
                    self.worker.join(left())
                else:  # the background thread is stuck: close the writer from here
                    self._close_sink()
        finally:
            self.worker.close(left())

    def close_later(self) -> None:
        """``close`` for the worker thread itself (a watcher collected there): queue the
        sink's close and the thread's end behind the queued windows; wait for nothing."""
        if self._sink is not None:
            self.worker.submit(self._close_sink)
        self.worker.stop_later()

    # -- on the worker thread ---------------------------------------------------------------
    def _guard(self, part: str, stage: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` unless ``part`` is off; a failure (e.g. the disk is full) switches it
        off, reported from the training thread."""
        return self._faults.run(part, stage, fn, defer=True)

    def _process(self, step: int, copy: HostCopy, order: list[int], amp: int,
                 hist: Any, force: bool, host_nf: Any = None) -> None:
        values = final_values(copy.numpy())
        if host_nf is not None and host_nf.any():
            for key in ("nonfinite", "_act_nonfinite"):
                values[:, FINAL_KEYS.index(key)] += host_nf
        snap = Snapshot.build(step, values, self._infos, order, self._applies, amp,
                              self._layout)
        lay = snap.layout
        if lay is not None and lay is not self._layout:  # a new layout: its names and types
            # its rows: the layers in forward order, never-called ones last
            self._names = list(lay.names[: len(order)])
            self._layers = [(name, self._infos[i].type_name)
                            for name, i in zip(lay.names, lay.rows.tolist())]
            self._layout = lay
        names, layers = self._names, self._layers
        found = self._guard("rules", "rules", lambda: self._rules.evaluate(
            step, snap.stats, names, snap.act_nonfinite, snap.act_stuck)) or []
        self.latest = snap
        if self._sink is not None:
            self._guard("sink", "TensorBoard sink",
                        lambda: self._sink.write(snap, found, force, layers))
            if self._pictures is not None and "sink" not in self.off:
                self._guard("pictures", "TensorBoard pictures", lambda: self._pictures.write(
                    snap, found, hist, [i.name for i in self._infos]))
        self.inbox.put(found)

    def _close_sink(self) -> None:
        """Draw the last pictures, flush and close the sink; a part already switched off
        after a failure is closed without a second report."""
        if self._pictures is not None and "sink" not in self.off:
            self._guard("pictures", "TensorBoard pictures", self._pictures.close)
        try:
            self._sink.close()
        except Exception as e:
            if "sink" not in self.off:
                self._faults.fail("sink", "TensorBoard sink", "*", e, defer=True)
