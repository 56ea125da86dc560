"""``watch()`` and ``Watcher``: the facade. It checks the arguments (``options.WatchConfig``),
builds the parts, attaches the hooks (all owned by one ``handles.HandleRegistry``) and
offers ``step``/``flush``/``close`` and the reads.

No statistics are computed here and nothing is written here: hooks (``hooks.py``) fill the
device buffers (``buffers.py``); the step engine (``engine.py``) ends steps and launches
flushes, driven by ``stepping.py``; the per-step monitor (``monitor.py``) turns each step's
flags into alerts; a flush makes one host copy (``snapshot.py``) that the publisher
(``publish.py``) hands to the rules and the sinks on the background thread. Alerts from
both go to one inbox (``inbox.py``) and are issued on the training thread at the next
``step()``/``flush()``/``close()``. How long a watcher lives: ``lifetime.py``.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from gradwatch import alerts as A
from gradwatch import lifetime, shutdown
from gradwatch.assembly import Parts
from gradwatch.compiled import forget_compiled_code
from gradwatch.options import WatchConfig
from gradwatch.selection import select, unwrap
from gradwatch.sinks.console import report as _report
from gradwatch.sinks.notebook import html_report
from gradwatch.snapshot import Snapshot
from gradwatch.thresholds import Thresholds
from gradwatch.worker import Worker

MAX_ALERTS = 10_000
# models pickled (torch.save) while watched by an earlier version name the marker here
_Attachment = lifetime.Attachment


class Watcher:
    """Watches one model. Create it with ``gradwatch.watch()``.

    Device and syncs: all statistics live in preallocated tensors on the model's device.
    Between flushes nothing is read back to the host; a flush (every ``every`` steps) makes
    one device -> host copy of the whole window (non-blocking into pinned memory on CUDA)
    and hands it to a background thread for the rules and TensorBoard.

    Sampling: a *sampled* step collects the full stat set; the other (*light*) steps only
    check every module's outputs for NaN/Inf (one sum per new tensor) and measure the
    parameter-gradient norms, so non-finite values and exploding gradients are caught on
    the step they appear. Sampled steps are the first step of each window and then one in
    ``sample_every``; ``"auto"`` (the default) samples every step of the first window and of
    the first 100 steps, then one step in 10, whatever ``every`` is (a window shorter than
    that still gets its first step sampled; ``gradwatch.sampling``).

    Steps: without ``optimizer=`` the first optimizer whose ``step()`` updates a watched
    parameter is found and used as if it had been given; with several optimizers, a step
    ends when the driving one's ``step()`` returns, each optimizer's gradients are read at
    its own ``step()`` and count in the step in progress. ``step()`` steps the watcher by
    hand instead (``stepping.py``).

    Lifetime: the model keeps its watcher alive (the result of ``watch()`` may be dropped);
    it is closed by ``gradwatch.unwatch(model)``, ``close()``, the end of a ``with`` block,
    process exit, or when the model and the watcher are garbage-collected together.

    Reads: ``latest``, ``alerts``, ``report()`` wait for a flush in progress on the
    background thread (the only wait, and only when read), so they are never a window
    behind. Reading delivers nothing: alerts found by that flush are in ``alerts`` at once
    and are issued (warned, raised, logged) at the next ``step()``/``flush()``/``close()``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        scaler: Any = None,
        writer: Any = None,
        logdir: str | os.PathLike[str] | None = None,
        tensorboard: bool = True,
        every: int = 100,
        sample_every: int | str = "auto",
        thresholds: Thresholds | Mapping[str, Any] | None = None,
        on_alert: A.OnAlert = "warn",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        histograms: bool = False,
        images: bool = False,
    ) -> None:
        cfg = WatchConfig.check(model, optimizer, scaler, writer, logdir, tensorboard, every,
                                sample_every, thresholds, on_alert, histograms, images)
        self.every, self.thresholds = cfg.every, cfg.thresholds
        self.histograms, self.images = cfg.histograms, cfg.images
        self._root = root = unwrap(model)
        p = self._parts = Parts(cfg, root, select(root, include, exclude), optimizer is not None,
                                writer, logdir, MAX_ALERTS)
        self._infos, self._handles, self._collector = p.infos, p.handles, p.collector
        self._buffers, self._sink, self._pictures = p.buffers, p.sink, p.pictures
        self._publish, self._inbox, self._engine = p.publish, p.inbox, p.engine
        self._lock = p.inbox.lock

        # -- attach: replace an open watcher of the same model first -----------------------------
        prev = lifetime.attached(root)
        if prev is not None:
            warnings.warn(
                "gradwatch: this model was already watched; the previous watcher is closed "
                "(its data flushed, its hooks removed)",
                UserWarning,
                stacklevel=3,
            )
            prev.close()
        forget_compiled_code(model)  # else a compiled model that already ran ignores hooks
        self._stepping = p.attach(optimizer, scaler)
        lifetime.attach(root, self)  # the model keeps its watcher alive
        shutdown.register(self)  # flushed and closed at exit / SIGTERM if left open
        self._pid = os.getpid()  # a forked child's copy never writes (see __del__)
        self._attached = True

    # -- public surface -------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        """Watched module names in forward order (modules not yet called come last)."""
        seen = self._collector.order
        called = set(seen)
        rest = [i for i in range(len(self._infos)) if i not in called]
        return [self._infos[i].name for i in list(seen) + rest]

    @property
    def sample_every(self) -> int:
        """The steps between two sampled steps (``"auto"``: ``sampling.PERIOD``, 10,
        whatever ``every`` is, after the first window and the first 100 steps)."""
        return self._engine.sampler.later_period

    @property
    def latest(self) -> Snapshot | None:
        """The last flushed window; waits for a flush in progress (never stale)."""
        self._settle()
        return self._publish.latest

    @property
    def alerts(self) -> list[A.Alert]:
        """Every alert found so far (the newest ``MAX_ALERTS``), also those of a flush in
        progress (waited for) that the next step/flush/close will issue."""
        self._settle()
        return self._inbox.all()

    @property
    def on_alert(self) -> A.OnAlert:
        return self._inbox.on_alert

    @on_alert.setter
    def on_alert(self, value: A.OnAlert) -> None:
        self._inbox.on_alert = value

    def step(self) -> None:
        """End of one training step, for loops without a torch optimizer.

        Calling it means the watcher is stepped by hand from now on. In a loop that also
        calls ``opt.step()`` each step is counted once: the first call right after a step
        the found optimizer ended confirms that step. An error when ``watch()`` was given
        an optimizer (that optimizer steps the watcher)."""
        if self._stepping.explicit is not None:
            raise RuntimeError(
                "step() must not be called when watch() was given an optimizer: the watcher "
                "steps itself after every optimizer.step()"
            )
        self._stepping.step_by_hand(self._engine)

    def flush(self) -> Snapshot | None:
        """Aggregate the current window now, run the rules, write; return the Snapshot.

        This waits for the background thread (a sync point by design)."""
        if self._engine.window_steps:
            self._engine.launch_flush(force=True)
        else:
            self._publish.flush_sink()
        self._publish.worker.join()
        self._engine.deliver()
        return self._publish.latest

    def close(self) -> None:
        """Flush a non-empty window, remove every hook, close an owned writer. Idempotent.

        If the model ran forward and no step ever ended, what was collected is committed
        as one step and written, with a ``UserWarning`` saying how to step the watcher."""
        self._close(None)

    def _close(self, budget: float | None, wait: bool = True) -> None:
        """``budget``: at most this many seconds waiting for the background thread (at exit,
        where a hang is worse than a lost window); None waits as long as it takes.
        ``wait=False``: wait for nothing (on a background thread: the last window and the
        writer's close are queued there, and the process exit waits for them)."""
        e = self._engine
        if e.closed:
            return
        raised: A.GradientAlertError | None = None
        try:  # the model ran forward but no step ever ended: written as one step
            self._stepping.commit_unstepped(e)
        except A.GradientAlertError as exc:  # on_alert="raise": close first, then raise
            raised = exc
        e.closed = True
        shutdown.unregister(self)
        self._handles.remove_all()  # no gradwatch hook is left on the model or in torch
        self._collector.close()
        lifetime.detach(self._root, self)
        end = None if budget is None else time.monotonic() + budget

        def left() -> float | None:
            return None if end is None else max(0.0, end - time.monotonic())

        if e.window_steps:
            e.launch_flush()
        if wait:
            self._publish.close(left)
        else:
            self._publish.close_later()
            shutdown.drain(self._publish.worker)
        if raised is not None:
            raise raised
        e.deliver()

    def _types(self) -> dict[str, str]:
        """Module type per watched layer (read now: lazy modules change theirs)."""
        return {i.name: i.type_name for i in self._infos}

    def report(self) -> str:
        """A table of the latest window per layer, alerted cells marked with ``!``, then
        the alerts with their cause and hint. Waits for a flush in progress."""
        return _report(self.latest, self.alerts, self._types(), self._waiting())

    def _repr_html_(self) -> str:
        """Jupyter: the report as an HTML table (alerted cells marked), then the alerts."""
        snap = self.latest
        title = (f"gradwatch: {len(self._infos)} layers, every {self.every}, "
                 f"{'closed' if self._closed else 'open'}")
        return html_report(snap, self.alerts, self._types(), title, self._waiting())

    def _waiting(self) -> str | None:
        """Why nothing was flushed yet: forward passes ran and no step ended."""
        s = self._stepping
        return s.no_step_message(s.forwards) if not self._step and s.forwards else None

    def _settle(self) -> None:
        """Before a read: wait for the windows handed to the background thread (never from
        that thread itself, which would wait for itself)."""
        if not Worker.on_worker_thread():
            self._publish.worker.join()

    def __del__(self) -> None:
        # the model and this watcher were dropped together (the model holds its watcher):
        # write what was collected and close the writer before both are freed. Not in a
        # forked child (a DataLoader worker): its copy must not write into the parent's
        # logs, and the writer's thread did not survive the fork.
        if (self.__dict__.get("_attached") and not self._closed
                and self._pid == os.getpid()):
            lifetime.close_collected(self)

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        self._close_at_exit()

    def _close_at_exit(self, budget: float | None = None, wait: bool = True) -> None:
        """Close when the program is already ending (an exception, exit, SIGTERM) or the
        watcher is being collected: alerts are delivered, but ``on_alert="raise"`` does not
        replace what is going on."""
        on_alert = self.on_alert
        if on_alert == "raise":
            self.on_alert = "log"
        try:
            self._close(budget, wait)
        finally:
            self.on_alert = on_alert

    def __repr__(self) -> str:
        return (f"Watcher({len(self._infos)} layers, step={self._step}, every={self.every}, "
                f"{'closed' if self._closed else 'open'})")

    # -- the parts' state, read by name ---------------------------------------------------------
    _closed = property(lambda self: self._engine.closed)
    _step = property(lambda self: self._engine.step)
    _window_steps = property(lambda self: self._engine.window_steps)
    _amp_skipped = property(lambda self: self._engine.amp_skipped)
    _map = property(lambda self: self._parts.map)

def watch(model: nn.Module, **kwargs: Any) -> Watcher:
    """Attach gradwatch to ``model``; see ``Watcher`` and the README for the arguments.

    ``sample_every="auto"`` (the default) collects the full stat set on every step of the
    first window and of the first 100 steps, then on one step in 10 whatever ``every`` is,
    and always on a window's first step; the others only check for NaN/Inf and measure the
    parameter-gradient norms.

    The model keeps the watcher alive: the result may be dropped (``gradwatch.unwatch``
    closes it)."""
    return Watcher(model, **kwargs)


unwatch = lifetime.unwatch
