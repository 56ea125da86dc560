"""``AlertInbox``: where every alert of one watcher goes, and where it is read from.

Two producers put alerts in: the per-step monitor (``monitor.py``, training thread) and the
publisher's window evaluation (``publish.py``, background thread). ``Watcher.alerts`` reads
them all; ``deliver`` issues the waiting ones (warn, raise, log, callback) on the training
thread at the next ``step()``/``flush()``/``close()``.
"""

from __future__ import annotations

import collections
import threading
from typing import Callable, Sequence

from gradwatch import alerts as A


def _step(a: A.Alert) -> int:
    return a.step


class AlertInbox:
    """``pending``: found, not yet issued; ``issued``: the newest ``limit`` issued ones.

    ``on_alert``: what issuing does (``close`` at exit swaps "raise" for "log")."""

    def __init__(self, on_alert: A.OnAlert, limit: int, writer: Callable[[], bool]) -> None:
        self.on_alert = on_alert
        self.limit = limit
        self._writer = writer  # whether this rank issues alerts (distributed: rank 0 only)
        self.pending: collections.deque[A.Alert] = collections.deque()
        self.issued: collections.deque[A.Alert] = collections.deque(maxlen=limit)
        # re-entrant: the SIGTERM handler closes on the training thread, maybe inside it
        self.lock = threading.RLock()

    def put(self, found: Sequence[A.Alert]) -> None:
        """From either thread: alerts to issue at the next delivery."""
        with self.lock:
            self.pending.extend(found)

    def all(self) -> list[A.Alert]:
        """Every alert so far (the newest ``limit``), the pending ones included, in the
        order of their steps, as the log lists them: the two producers put alerts in at
        different moments (a window's alerts arrive after the per-step alerts of the steps
        that followed it, later still on a loaded machine), so the order they were put in
        depends on timing; alerts of one step keep the order they were put in."""
        found = list(self.issued)
        if self._writer():
            with self.lock:
                found.extend(self.pending)
        found.sort(key=_step)  # stable
        return found[-self.limit:]

    def _take(self) -> list[A.Alert]:
        with self.lock:
            found = list(self.pending)
            self.pending.clear()
        return found

    def _put_back(self, found: Sequence[A.Alert]) -> None:
        with self.lock:
            self.pending.extendleft(reversed(found))

    def deliver(self) -> None:
        """On the training thread: issue the pending alerts (one warning per kind and cause
        where ``on_alert`` groups them); ``"raise"`` raises at the first and keeps the rest
        pending."""
        if not self.pending:
            return
        found = self._take()
        if not self._writer():
            return
        if not A.one_by_one(self.on_alert):
            self.issued.extend(found)
            A.deliver_grouped(found, self.on_alert)
            return
        for i, a in enumerate(found):
            self.issued.append(a)
            try:
                A.deliver(a, self.on_alert)
            except A.GradientAlertError:
                self._put_back(found[i + 1:])
                raise
