"""One fault guard per watcher: a part of gradwatch that fails is switched off once and
reported once, as a ``GradwatchWarning`` naming the stage and the layer; the training goes
on. During training gradwatch must never take the training down by accident.

A *part* is what is switched off (``"commit"``, ``"flags"``, ``"act"``...); a *stage* is
what the warning names (``"step commit"``, ``"activation statistics"``...). Each stage is
reported once per watcher, from whichever thread; a report from the background thread is
queued (``deferred``) and issued on the training thread at the next step/flush/close.
"""

from __future__ import annotations

import collections
import threading
import warnings
from typing import Any, Callable

from gradwatch.alerts import GradwatchWarning, logger


def report_fault(msg: str) -> None:
    """Issue a fault warning; where warnings are turned into errors (``-W error``), log it
    instead: a fault inside gradwatch must not stop the training that way either."""
    try:
        warnings.warn(msg, GradwatchWarning, stacklevel=3)
    except Exception:
        logger.warning(msg)


class FaultGuard:
    """``off``: the parts switched off (a set read directly on the hot path);
    ``fail(part, stage, layer, exc)``: switch ``part`` off and report ``stage`` once;
    ``run(part, stage, fn)``: call ``fn`` unless ``part`` is off, switching it off if it
    raises."""

    def __init__(self) -> None:
        self.off: set[str] = set()
        self._reported: set[str] = set()
        self._lock = threading.RLock()
        # fault messages from the background thread, delivered on the training thread
        self.deferred: collections.deque[str] = collections.deque()

    def report(self, stage: str, layer: str, exc: BaseException, defer: bool = False) -> None:
        """Report an internal failure once per stage (the caller switches its part off).

        ``layer`` is the layer being processed, ``"*"`` for a stage that serves all layers.
        ``defer``: called off the training thread; the warning is queued in ``deferred`` and
        issued on the training thread at the next step/flush/close."""
        with self._lock:
            if stage in self._reported:
                return
            self._reported.add(stage)
        where = "all layers" if layer == "*" else f"layer {layer!r}"
        msg = (f"gradwatch: internal error in the {stage} ({where}): "
               f"{type(exc).__name__}: {exc}; this part of the watcher is switched off, "
               "training continues")
        if defer:
            self.deferred.append(msg)
        else:
            report_fault(msg)

    def fail(self, part: str, stage: str, layer: str, exc: BaseException,
             defer: bool = False) -> None:
        self.off.add(part)
        self.report(stage, layer, exc, defer)

    def run(self, part: str, stage: str, fn: Callable[[], Any], defer: bool = False) -> Any:
        """``fn()``, or None when ``part`` is off or ``fn`` raised (then ``part`` is off)."""
        if part in self.off:
            return None
        try:
            return fn()
        except Exception as e:
            self.fail(part, stage, "*", e, defer)
            return None

    def deliver(self) -> None:
        """On the training thread: issue the reports queued by the background thread."""
        d = self.deferred
        while d:
            report_fault(d.popleft())
