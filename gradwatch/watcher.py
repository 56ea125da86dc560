"""``watch()`` and ``Watcher``: choose modules, own every hook handle, step/flush/close.

No statistics are computed here and nothing is written here: hooks (``hooks.py``) fill the
device buffers (``buffers.py``); a flush makes one host copy (``snapshot.py``) and hands it
to the background worker, which runs the rules (``rules.py``) and the sinks (``sinks/``).
Alerts are delivered on the training thread, at the next ``step()``/``flush()``/``close()``.
What ends a step is decided in ``stepping.py``, how long a watcher lives in ``lifetime.py``.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
import warnings
import weakref
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from gradwatch import alerts as A
from gradwatch import lifetime, shutdown
from gradwatch.amp import ScalerTap
from gradwatch.audit import measure
from gradwatch.buffers import WindowBuffers
from gradwatch.compiled import forget_compiled_code
from gradwatch.distributed import is_writer_rank, world_size
from gradwatch.flags import Flags, StepFlags
from gradwatch.hooks import (
    Collector,
    ForwardDoneHook,
    ForwardHook,
    ParamTracker,
    report_fault,
)
from gradwatch.lazy import MaterializedHook, any_lazy
from gradwatch.nonfinite import Meta, NonFiniteTracker
from gradwatch.options import check_bool, check_int, check_sample_every, given, open_writer
from gradwatch.origin import ModelMap
from gradwatch.publish import Publisher
from gradwatch.rules import Rules, Thresholds
from gradwatch.sampling import Sampler
from gradwatch.selection import (
    ROOT_NAME,
    LayerInfo,
    assign_params,
    describe,
    grad_safe,
    passes_finite,
    select,
    unwrap,
)
from gradwatch.sinks.console import report as _report
from gradwatch.sinks.notebook import html_report
from gradwatch.sinks.pictures import Pictures
from gradwatch.snapshot import HostCopy, Snapshot, applicable
from gradwatch.stepping import Stepping, warn_usage
from gradwatch.trace import ModuleFlags, StepTrace
from gradwatch.worker import Worker

MAX_ALERTS = 10_000
# models pickled (torch.save) while watched by an earlier version name the marker here
_Attachment = lifetime.Attachment


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


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
        # -- validate everything before touching the model ----------------------------------
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {given(model)}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer or None, got {given(optimizer)}"
            )
        if scaler is not None and not (hasattr(scaler, "get_scale") and hasattr(scaler, "step")):
            raise TypeError(
                f"scaler must be a torch.amp.GradScaler or None, got {given(scaler)}"
            )
        self.every = check_int("every", every)
        k = check_sample_every(sample_every)
        self._sampler = Sampler(self.every, k)
        tensorboard = check_bool("tensorboard", tensorboard)
        self.histograms = check_bool("histograms", histograms)
        self.images = check_bool("images", images)
        A.validate_on_alert(on_alert)
        self.thresholds = Thresholds.coerce(thresholds)
        if logdir is not None and not isinstance(logdir, (str, os.PathLike)):
            raise TypeError(f"logdir must be a path (str or os.PathLike), got {logdir!r}")
        if writer is not None and not hasattr(writer, "add_scalar"):
            raise TypeError(
                f"writer must be a torch.utils.tensorboard.SummaryWriter, got {given(writer)}"
            )
        root = unwrap(model)
        chosen = select(root, include, exclude)

        self.on_alert = on_alert
        self._root = root
        self._chosen = chosen
        owners = assign_params(root, chosen)
        self._infos = self._describe(owners)
        self._applies = [applicable(i, optimizer is not None) for i in self._infos]
        self._device = _device_of(root)
        L = len(chosen)
        self._buffers = WindowBuffers(L, self._device)
        self._collector = Collector(self._buffers, self._infos, self.thresholds.saturation_margin)
        self._rules = Rules(self.thresholds, self._infos,
                            measure(root, chosen, self._collector.fault), self._collector.fault)
        # lazy modules: parameters are tracked once materialized, at the first forward
        lazy = any_lazy(p for p, _ in owners)
        self._params = ParamTracker([] if lazy else owners, L, self._device)
        # the non-finite trace covers every module of the model, watched or not
        self._mods = [(n or ROOT_NAME, m) for n, m in root.named_modules()]
        hooked = [not grad_safe(m) for _, m in self._mods]
        self._map = ModelMap.build(self._mods, hooked)
        self._nonfinite = NonFiniteTracker(self._map, self._mods, chosen, self._params)
        self._collector.trace = StepTrace(
            self._device, [passes_finite(m) for _, m in self._mods],
            [bool(getattr(m, "inplace", False)) for _, m in self._mods], hooked,
            self._collector.fault)
        self._collector.mflags = ModuleFlags(len(self._mods), self._device, hooked,
                                             self._map.children_first())

        self._step = 0
        self._window_steps = 0
        self._amp_skipped = 0
        self._closed = False
        self._alerts: collections.deque[A.Alert] = collections.deque(maxlen=MAX_ALERTS)
        self._off: set[str] = set()  # internal parts switched off after a failure
        self._pending_grads: Any = None
        self._trace_step = -1  # the step whose non-finite trace was taken already
        self._only: frozenset[int] | None = None
        self._sink: Any = None
        # distributed: only rank 0 opens a writer, so a run has one event file
        if tensorboard and is_writer_rank():
            from gradwatch.sinks.tensorboard import TensorBoardSink

            if writer is not None:
                self._sink = TensorBoardSink(writer, owns=False)
            else:
                self._sink = TensorBoardSink(open_writer(logdir), owns=True)
        self._pictures = Pictures.create(self._sink, L, self._device, self.histograms,
                                         self.images, self._collector.fault)
        self._collector.hist = self._pictures.hist if self._pictures is not None else None
        self._publish = Publisher(self._infos, self._applies, self._rules, self._sink,
                                  self._pictures, self._collector.fault)
        self._lock = self._publish.lock
        # per-step non-finite flags, read on the host without a stall (flags.py)
        self._flags = StepFlags(L, self._device)

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
        self._handles: list[Any] = []
        forget_compiled_code(model)  # else a compiled model that already ran ignores hooks
        slot_of = {id(m): slot for slot, (_, m) in enumerate(chosen)}
        for i, (_, m) in enumerate(self._mods):
            self._handles.append(m.register_forward_hook(
                ForwardHook(self._collector, i, slot_of.get(id(m), -1)), with_kwargs=True))
        self._handles.append(root.register_forward_hook(ForwardDoneHook(self._collector, -1)))
        self._collector.on_eval_done = weakref.WeakMethod(self._eval_done)
        self._lazy_hook = (root.register_forward_hook(MaterializedHook(self))
                           if lazy else None)
        # torch's global optimizer step hooks and a forward counter on the root
        self._stepping = Stepping(self, root, root.parameters(), optimizer)
        self._amp: ScalerTap | None = None
        if scaler is not None:
            self._amp = ScalerTap(scaler, optimizer, self._amp_unscale, self._amp_skip,
                                  self._stepping.accepts)
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
        return self._sampler.later

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
        found = list(self._alerts)
        if is_writer_rank():
            with self._publish.lock:
                found.extend(self._publish.pending)
        return found[-MAX_ALERTS:]

    def step(self) -> None:
        """End of one training step, for loops without a torch optimizer.

        Calling it means the watcher is stepped by hand from now on. In a loop that also
        calls ``opt.step()`` each step is counted once: the first call right after a step
        the found optimizer ended confirms that step. An error when ``watch()`` was given
        an optimizer (that optimizer steps the watcher)."""
        s = self._stepping
        if s.explicit is not None:
            raise RuntimeError(
                "step() must not be called when watch() was given an optimizer: the watcher "
                "steps itself after every optimizer.step()"
            )
        if self._closed or not s.manual_step(self):
            return
        early = s.take_early_grads(self)
        if self._amp is not None and self._amp.take_pending_skip():
            self._end_step(skipped=True)
            return
        if not early:  # else: read at an optimizer step of this step, still current
            s.read(self, None, merge=False)
        self._end_step()

    def flush(self) -> Snapshot | None:
        """Aggregate the current window now, run the rules, write; return the Snapshot.

        This waits for the background thread (a sync point by design)."""
        if self._window_steps:
            self._launch_flush(force=True)
        else:
            self._publish.flush_sink()
        self._publish.worker.join()
        self._deliver()
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
        if self._closed:
            return
        raised: A.GradientAlertError | None = None
        try:
            self._commit_unstepped()
        except A.GradientAlertError as e:  # on_alert="raise": close first, then raise
            raised = e
        self._closed = True
        shutdown.unregister(self)
        c = self._collector
        c.act_on = c.grad_on = False
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._lazy_hook is not None:
            self._lazy_hook.remove()
        self._stepping.remove()
        c.remove_tensor_hooks()
        if self._amp is not None:
            self._amp.remove()
        lifetime.detach(self._root, self)
        end = None if budget is None else time.monotonic() + budget

        def left() -> float | None:
            return None if end is None else max(0.0, end - time.monotonic())

        if self._window_steps:
            self._launch_flush()
        if wait:
            self._publish.close(left)
        else:
            self._publish.close_later()
            shutdown.drain(self._publish.worker)
        if raised is not None:
            raise raised
        self._deliver()

    def _commit_unstepped(self) -> None:
        """At close: the model ran forward but no step ever ended. Commit what was
        collected as one step (it is written as one window) and say how to step."""
        if self._step or not self._collector.order:
            return
        self._stepping.read(self, None, merge=False)
        self._end_step()
        warn_usage(self._stepping.no_step_message(self._stepping.forwards)
                   + "; what was collected is written as one step", stacklevel=5)

    def _types(self) -> dict[str, str]:
        """Module type per watched layer (read now: lazy modules change theirs)."""
        return {i.name: i.type_name for i in self._infos}

    def report(self) -> str:
        """A table of the latest window per layer, alerted cells marked with ``!``, then
        the alerts with their cause and hint. Waits for a flush in progress."""
        return _report(self.latest, self.alerts, self._types())

    def _repr_html_(self) -> str:
        """Jupyter: the report as an HTML table (alerted cells marked), then the alerts."""
        snap = self.latest
        title = (f"gradwatch: {len(self._infos)} layers, every {self.every}, "
                 f"{'closed' if self._closed else 'open'}")
        return html_report(snap, self.alerts, self._types(), title)

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

    # -- step machinery ---------------------------------------------------------------------------
    def _params_safe(self, what: str) -> Any:
        if what in self._off:
            return None
        try:
            with torch.no_grad():  # optimizer hooks run outside the step's own no_grad
                return self._params_op(what)
        except Exception as e:
            self._off.add(what)
            self._collector.fault(f"parameter statistics ({what})", "*", e)
            return None


    def _params_op(self, what: str) -> Any:
        if what == "grad":
            only = self._only  # one optimizer's parameters (None: all)
            if self._collector.hist is not None and self._collector.full:
                mine = self._params.trainable
                self._collector.hist.add_grads(
                    mine if only is None else [t for k, t in enumerate(mine) if k in only])
            return self._params.grad_stats(self._collector.full, only)
        if what == "weight":
            return self._params.weight_norms()
        if what == "before":
            self._params.before_update(self._only)
            return None
        return self._params.update_ratios()

    # -- the optimizer (stepping.Stepping reads at its steps) ----------------------------------
    @property
    def _optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer whose steps are measured: given, found, or (when stepped by hand)
        one that updated watched parameters; None before any."""
        return self._stepping.optimizer

    def _describe(self, owners: Sequence[tuple[nn.Parameter, int]]) -> list[LayerInfo]:
        own: list[list[nn.Parameter]] = [[] for _ in self._chosen]
        for p, slot in owners:
            own[slot].append(p)
        return [describe(n, m, own[i]) for i, (n, m) in enumerate(self._chosen)]

    def _materialized(self) -> None:
        """After a forward of a model with lazy modules: once every parameter has its
        shape, track them (the parameter statistics of this very step included)."""
        try:
            owners = assign_params(self._root, self._chosen)
            if any_lazy(p for p, _ in owners):
                return
            self._params = ParamTracker(owners, len(self._infos), self._device)
            self._stepping.forget()  # which parameters each optimizer holds, by index
            self._map = ModelMap.build(self._mods, self._map.hooked)  # LazyLinear -> Linear
            self._nonfinite = NonFiniteTracker(self._map, self._mods, self._chosen,
                                               self._params)
            self._infos[:] = self._describe(owners)  # LazyLinear -> Linear; shared list
        except Exception as e:
            self._collector.fault("lazy parameters", "*", e)
        if self._lazy_hook is not None:
            self._lazy_hook.remove()

    def _amp_unscale(self, factor: torch.Tensor) -> None:
        try:
            self._collector.flush_batches()
            self._buffers.scale_out_grads(factor)
        except Exception as e:
            self._collector.fault("AMP unscale", "*", e)

    def _amp_skip(self) -> None:
        """The GradScaler skipped the driving optimizer's step (inf/NaN gradients)."""
        if not self._closed:
            self._end_step(skipped=True)
            self._stepping.ended_by_driver()

    def _end_step(self, skipped: bool = False) -> None:
        full = self._collector.full and not skipped
        grads, self._pending_grads = self._pending_grads, None
        weights = self._params_safe("weight") if full else None
        updates = self._params_safe("update") if full and self._optimizer is not None else None
        if skipped:  # its staged stats see the inf/NaN that made the scaler skip: drop them
            self._collector.discard_batches()
            self._buffers.discard_step()
            if self._collector.trace is not None:
                self._collector.trace.discard()
            self._amp_skipped += 1
        else:
            self._commit(grads, weights, updates)
        self._collector.end_step()
        if self._amp is not None:
            self._amp.new_step()
        self._step += 1
        self._window_steps += 1
        self._check_flags()
        if self._window_steps >= self.every:
            self._launch_flush()
        # sampled steps are aligned on the window (sampling.py)
        self._collector.full = self._sampler.full(self._step, self._window_steps)
        self._deliver()

    def _commit(self, grads: Any, weights: Any, updates: Any) -> None:
        try:
            if "commit" in self._off:  # switched off: drop the staged step
                self._buffers.discard_step()
                return
            full = self._collector.full
            if full:
                self._collector.flush_batches()
            self._push_flags(self._buffers.step_flags(grads, full), grads, full)
            self._buffers.commit_step(grads, weights, updates, full)
        except Exception as e:
            self._off.add("commit")
            self._collector.fault("step commit", "*", e)

    def _push_flags(self, flags: torch.Tensor, grads: Any, full: bool,
                    step: int | None = None, before_update: bool = False) -> None:
        """The step's flags, with its non-finite trace unless taken already, to the host:
        on CUDA device ops and a non-blocking copy (``flags.StepFlags``), read a step or so
        later; on CPU, where device memory is host memory, read at once through numpy (no
        torch read op either way)."""
        step = self._step + 1 if step is None else step
        tr = self._collector.trace
        rec = None
        rows: list[torch.Tensor] = []
        mf = self._collector.mflags
        order = None
        if tr is not None and tr.on and self._trace_step != step:
            self._trace_step = step
            rec, fv, gv = tr.take()
            rows = [fv, gv]
            if mf is not None and mf.ran:  # compiled code ran: its per-module counts
                rows.append(mf.take())
                order = mf.order
        # the weights as the forward used them: read lazily on CPU when the record is taken
        # before the update (the analysis runs at once), else summed with the payload
        sums = rec is not None and not (before_update and self._device.type == "cpu")
        parts: list[torch.Tensor] = []
        present: tuple[int, ...] = ()
        shadow: tuple[int, ...] = ()
        # without a trace the payload only adds its NaN count to the flags (CUDA), which the
        # push that took this step's trace at the optimizer's pre-step has counted already
        if rec is not None or (self._device.type != "cpu" and self._trace_step != step):
            parts, (present, shadow) = self._nonfinite.payload(rows, grads, param_sums=sums)
        meta = (Meta(rec, present, shadow, full, before_update, sums, order)
                if rec is not None else None)
        if self._device.type == "cpu":
            item = self._flags.read_now(flags, parts, step, meta)
            if rec is not None:
                tr.clear(rec)  # type: ignore[union-attr]
            self._on_flags(item)
            return
        payload = torch.cat(parts) if parts else flags.new_zeros(0)
        if rec is not None:
            tr.clear(rec)  # type: ignore[union-attr]  # after the copy, in stream order
        nan = torch.isnan(payload).sum(dtype=torch.float32)
        extra = torch.stack([nan, torch.zeros_like(nan), torch.zeros_like(nan)])
        head = torch.cat([flags, extra.unsqueeze(0)])
        self._flags.push(head, step, payload if meta is not None else None, meta)

    def _take_trace(self, grads: Any, before_update: bool) -> None:
        """The step's trace to the host now (at the optimizer's pre-step), and on CPU read
        at once: the weights a NaN may come from are still those the forward used."""
        tr, mf = self._collector.trace, self._collector.mflags
        if "commit" in self._off or tr is None:
            return
        if tr.empty() and not (mf is not None and mf.ran):
            return  # no forward since the last take (an optimizer stepping after the driver)
        try:
            zero = self._buffers.no_flags()
            self._push_flags(zero, grads, self._collector.full, before_update=before_update)
        except Exception as e:
            self._off.add("commit")
            self._collector.fault("step commit", "*", e)
            return
        self._check_flags()

    def _eval_done(self) -> None:
        """A forward without gradients ended (evaluation): its trace becomes a record of its
        own, so an evaluation loop keeps the trace bounded and is checked as it runs."""
        tr = self._collector.trace
        if tr is None or tr.rec.g_roles or "commit" in self._off:
            return  # a training step's record: its gradients are still to come
        try:
            self._trace_step = -1
            self._push_flags(self._buffers.no_flags(), None, True, step=self._step,
                             before_update=True)
            self._check_flags()
            self._deliver()  # an evaluation loop may have no step to deliver at
        except Exception as e:
            self._off.add("commit")
            self._collector.fault("step commit", "*", e)

    def _check_flags(self) -> None:
        """Per-step flags that reached the host (this step's on CPU, a step or so later on
        CUDA) -> a non-finite alert at the module where the NaN was born (``nonfinite.py``),
        or an exploding alert for a gradient above ``extreme_rms``. No torch read op."""
        if self._off & {"commit", "flags"}:
            return
        try:
            for f in self._nonfinite.settle():
                self._nonfinite_alert(f)
            for item in self._flags.poll():
                self._on_flags(item)
        except Exception as e:
            self._off.add("flags")
            self._rules.per_step_nonfinite = False  # the window names it from now on
            self._collector.fault("non-finite flags", "*", e)

    def _on_flags(self, item: Flags) -> None:
        """One step's flags on the host: a non-finite origin, or an extreme gradient."""
        if self._off & {"commit", "flags"}:
            return
        try:
            nf = self._nonfinite
            bad = item.layers[:, :2].any() or item.trace_nan
            if not bad:
                self._extreme(item.step, item.layers)
                return
            for f in nf.read(item):
                self._nonfinite_alert(f)
            if item.meta is None and nf.armed and nf.last_bad != item.step:
                # nothing named from a trace for this step (none came along, or it held
                # Inf without NaN, e.g. an Inf parameter gradient): name a layer
                self._flag_alert(item.step, item.layers)
        except Exception as e:
            self._off.add("flags")
            self._rules.per_step_nonfinite = False  # the window names it from now on
            self._collector.fault("non-finite flags", "*", e)

    def _nonfinite_alert(self, f: Any) -> None:
        a = self._rules.nonfinite_now(f.step, f.layer, f.count, note=f.message)
        if a is not None:
            self._pend(dataclasses.replace(a, cause=f.cause, hint=f.hint), f.step)

    def _extreme(self, step: int, view: np.ndarray) -> None:
        """A finite step: only a gradient above ``extreme_rms`` is reported at once."""
        limit = self.thresholds.extreme_rms
        for i in np.flatnonzero(view[:, 2] > limit):
            self._pend(self._rules.exploding_now(step, self._infos[i].name,
                                                 float(view[i, 2])), step)

    def _flag_alert(self, step: int, view: np.ndarray) -> None:
        """Without a trace (switched off, or the device ran too far ahead): the first
        watched layer in forward order whose output went non-finite, else the last one
        whose gradients did."""
        order = self._collector.order
        acts = view[:, 0]
        origin = next((i for i in order if acts[i] > 0), None)
        if origin is None:
            grads = view[:, 1]
            origin = next((i for i in reversed(order) if grads[i] > 0), None)
            if origin is None:
                origin = int(np.argmax(grads))
        count = float(view[origin, :2].sum())
        self._pend(self._rules.nonfinite_now(step, self._infos[origin].name, count), step)

    def _pend(self, a: A.Alert | None, step: int) -> None:
        """A per-step alert: delivered at the end of this step, and written to TensorBoard."""
        if a is not None:
            self._publish.step_alert(a, step)

    def _launch_flush(self, force: bool = False) -> None:
        """On the training thread: launch the copy, reset the window, hand over."""
        step, amp = self._step, self._amp_skipped
        order = list(self._collector.order)
        try:
            if "flush" in self._off:
                return
            if world_size() > 1:
                self._buffers.reduce_across_ranks()
            copy = HostCopy(self._buffers.finalize())
            hist = self._pictures.take() if self._pictures is not None else None
        except Exception as e:
            self._off.add("flush")
            self._collector.fault("flush", "*", e)
            return
        finally:
            self._buffers.reset_window()
            self._window_steps = 0
            self._amp_skipped = 0
            self._sampler.new_window()
            self._collector.full = True  # a new window starts with a sampled step
        self._publish.window(step, copy, order, amp, hist, force,
                             self._nonfinite.take_counts())

    def _deliver(self) -> None:
        """Alerts and faults reach the user here, on the training thread."""
        faults = self._collector.deferred
        while faults:
            report_fault(faults.popleft())
        if not self._publish.pending:
            return
        found = self._publish.take()
        if not is_writer_rank():
            return
        if not A.one_by_one(self.on_alert):  # one warning per kind and cause
            self._alerts.extend(found)
            A.deliver_grouped(found, self.on_alert)
            return
        for i, a in enumerate(found):
            self._alerts.append(a)
            try:
                A.deliver(a, self.on_alert)
            except A.GradientAlertError:
                self._publish.put_back(found[i + 1:])
                raise


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
