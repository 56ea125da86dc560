"""``StepEngine``: what happens at the end of a training step and at a flush, on the
training thread.

Its hops: the parameter reads (``params.ParamTracker``, each behind the fault guard under
its own name: ``read_grads``, ``copy_before_update``, and at the end of a sampled step the
weights and update ratios); ``end_step`` commits the step's staged statistics into the
window (``buffers.WindowBuffers``) or drops them (a step the GradScaler skipped), hands the
step's flags to the per-step monitor (``monitor.StepMonitor``), and every ``every`` steps
``launch_flush`` starts the window's host copy (``hostcopy.HostCopy``) and hands it to the
publisher (``publish.Publisher``: rules and sinks on the background thread). ``Stepping``
(``stepping.py``) decides when a step ends and calls these methods; it never touches the
engine's fields.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch

from gradwatch.distributed import world_size
from gradwatch.faults import FaultGuard
from gradwatch.hostcopy import HostCopy
from gradwatch.inbox import AlertInbox
from gradwatch.params import merge_grads
from gradwatch.sampling import Sampler

if TYPE_CHECKING:
    from gradwatch.amp import ScalerTap
    from gradwatch.buffers import ParamStepStats, WindowBuffers
    from gradwatch.histograms import DeviceHistograms
    from gradwatch.hooks import Collector
    from gradwatch.monitor import StepMonitor
    from gradwatch.params import ParamTracker
    from gradwatch.publish import Publisher


class StepEngine:
    """The step and flush machinery of one watcher (see the module docstring)."""

    def __init__(self, every: int, sampler: Sampler, buffers: WindowBuffers,
                 collector: Collector, params: ParamTracker, monitor: StepMonitor,
                 publisher: Publisher, hist: DeviceHistograms | None, guard: FaultGuard,
                 inbox: AlertInbox) -> None:
        self.every = every
        self.sampler = sampler
        self.buffers = buffers
        self.collector = collector
        self.params = params  # replaced when lazy modules materialize
        self.monitor = monitor
        self.publisher = publisher
        self.hist = hist
        self.guard = guard
        self.inbox = inbox
        self.amp: ScalerTap | None = None
        # the optimizer whose update ratios are measured (``Stepping.optimizer``)
        self.optimizer: Callable[[], Any] = lambda: None
        self.ended_by_driver: Callable[[], None] = lambda: None
        self.on_optimizer_known: Callable[[], None] = lambda: None
        self.step = 0  # training steps ended
        self.window_steps = 0
        self.amp_skipped = 0
        self.closed = False
        self.pending_grads: ParamStepStats | None = None  # this step's gradient statistics

    # -- parameter reads, each switched off on its own after a failure ---------------------
    def _params(self, what: str, fn: Callable[[], Any]) -> Any:
        if what in self.guard.off:
            return None
        try:
            with torch.no_grad():  # optimizer hooks run outside the step's own no_grad
                return fn()
        except Exception as e:
            self.guard.fail(what, f"parameter statistics ({what})", "*", e)
            return None

    def read_grads(self, only: frozenset[int] | None, merge: bool = True) -> None:
        """Read the gradients of ``only`` (indices into the tracked parameters; None: all)
        for the step in progress; ``merge``: over what another optimizer's step read."""
        def read() -> Any:
            if self.hist is not None and self.collector.full:
                mine = self.params.trainable
                self.hist.add_grads(
                    mine if only is None else [t for k, t in enumerate(mine) if k in only])
            return self.params.grad_stats(self.collector.full, only)

        grads = self._params("grad", read)
        self.pending_grads = merge_grads(self.pending_grads, grads) if merge else grads

    def copy_before_update(self, only: frozenset[int] | None) -> None:
        """The weights before the first optimizer update of a sampled step."""
        self._params("before", lambda: self.params.before_update(only))

    def set_amp_optimizer(self, opt: Any) -> None:
        """The optimizer whose skipped steps (GradScaler) end a step; None: ``step()``."""
        if self.amp is not None:
            self.amp.optimizer = opt

    # -- the step's end ---------------------------------------------------------------------
    def start_take(self) -> Any:
        """Before ``read_grads``: what ``take_trace`` needs of the trace, taken
        (``StepMonitor.start_take``)."""
        return self.monitor.start_take(self.step + 1)

    def take_trace(self, taken: Any = None) -> None:
        """At the first optimizer's pre-step: the step's non-finite trace to the host."""
        self.monitor.take_trace(self.buffers.no_flags(), self.pending_grads,
                                self.collector.full, self.step + 1, before_update=True,
                                taken=taken)

    def end_step(self, skipped: bool = False) -> None:
        sampled = self.collector.full and not skipped
        grads, self.pending_grads = self.pending_grads, None
        weights = self._params("weight", self.params.weight_norms) if sampled else None
        updates = (self._params("update", self.params.update_ratios)
                   if sampled and self.optimizer() is not None else None)
        if skipped:  # its staged stats see the inf/NaN that made the scaler skip: drop them
            self.collector.discard_batches()
            self.buffers.discard_step()
            if self.collector.trace is not None:
                self.collector.trace.discard()
            self.amp_skipped += 1
        else:
            self._commit(grads, weights, updates)
            self.params.recycle(grads)
        self.collector.end_step()
        if self.amp is not None:
            self.amp.new_step()
        self.step += 1
        self.window_steps += 1
        self.monitor.poll()
        if self.window_steps >= self.every:
            self.launch_flush()
        # sampled steps are aligned on the window (sampling.py)
        self.collector.full = self.sampler.sampled(self.step, self.window_steps)
        self.deliver()

    def _commit(self, grads: Any, weights: Any, updates: Any) -> None:
        try:
            if "commit" in self.guard.off:  # switched off: drop the staged step
                self.buffers.discard_step()
                return
            sampled = self.collector.full
            if sampled:
                self.collector.flush_batches()
            if self.monitor.clean(grads, self.step + 1):
                if sampled:  # CPU: nothing to flag; the update ratios are read at once
                    self.monitor.see_updates(updates, self.step + 1)
            else:
                self.monitor.send(self.buffers.step_flags(grads, sampled, updates), grads,
                                  sampled, self.step + 1)
            self.buffers.commit_step(grads, weights, updates, sampled)
        except Exception as e:
            self.guard.fail("commit", "step commit", "*", e)

    def eval_done(self) -> None:
        """A forward without gradients ended: check its trace as a record of its own."""
        try:
            if self.monitor.eval_done(self.buffers.no_flags(), self.step):
                self.deliver()  # an evaluation loop may have no step to deliver at
        except Exception as e:
            self.guard.fail("commit", "step commit", "*", e)

    # -- AMP (amp.ScalerTap) ------------------------------------------------------------------
    def amp_unscale(self, factor: torch.Tensor) -> None:
        try:
            self.collector.flush_batches()
            self.buffers.scale_out_grads(factor)
        except Exception as e:
            self.collector.fault("AMP unscale", "*", e)

    def amp_skip(self) -> None:
        """The GradScaler skipped the driving optimizer's step (inf/NaN gradients)."""
        if not self.closed:
            self.end_step(skipped=True)
            self.ended_by_driver()

    # -- the window -----------------------------------------------------------------------------
    def launch_flush(self, force: bool = False) -> None:
        """On the training thread: launch the copy, reset the window, hand over."""
        step, amp = self.step, self.amp_skipped
        order = list(self.collector.order)
        try:
            if "flush" in self.guard.off:
                return
            if world_size() > 1:
                self.buffers.reduce_across_ranks()
            copy = HostCopy(self.buffers.window)  # made final on the background thread
            hist = self.hist.take() if self.hist is not None and self.hist.on else None
        except Exception as e:
            self.guard.fail("flush", "flush", "*", e)
            return
        finally:
            self.buffers.reset_window()
            self.window_steps = 0
            self.amp_skipped = 0
            self.sampler.new_window()
            self.collector.full = True  # a new window starts with a sampled step
        self.publisher.window(step, copy, order, amp, hist, force,
                              self.monitor.tracker.take_counts())

    def deliver(self) -> None:
        """Faults and alerts reach the user here, on the training thread."""
        if self.guard.deferred:
            self.guard.deliver()
        self.inbox.deliver()
