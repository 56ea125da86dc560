"""``watch()`` and ``Watcher``: choose modules, own every hook handle, step/flush/close.

No statistics are computed here and nothing is written here: hooks (``hooks.py``) fill the
device buffers (``buffers.py``); a flush makes one host copy (``snapshot.py``) and hands it
to the background worker, which runs the rules (``rules.py``) and the sinks (``sinks/``).
Alerts are delivered on the training thread, at the next ``step()``/``flush()``/``close()``.
"""

from __future__ import annotations

import collections
import os
import time
import warnings
import weakref
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from gradwatch import alerts as A
from gradwatch import shutdown
from gradwatch.amp import ScalerTap
from gradwatch.audit import measure
from gradwatch.buffers import WindowBuffers
from gradwatch.compiled import forget_compiled_code
from gradwatch.distributed import is_writer_rank, world_size
from gradwatch.flags import StepFlags
from gradwatch.hooks import (
    Collector,
    ForwardDoneHook,
    ForwardHook,
    ParamTracker,
    _StepHook,
    report_fault,
)
from gradwatch.options import check_bool, check_int, check_sample_every, given, open_writer
from gradwatch.publish import Publisher
from gradwatch.rules import Rules, Thresholds
from gradwatch.selection import assign_params, describe, select, unwrap
from gradwatch.sinks.console import report as _report
from gradwatch.sinks.pictures import Pictures
from gradwatch.snapshot import HostCopy, Snapshot, applicable

MAX_ALERTS = 10_000
#: ``sample_every="auto"``: after the first window (read on every step), the full stat set
#: on this many evenly spaced steps per window (``every // SAMPLED_PER_WINDOW``, at least 1:
#: windows shorter than twice this are read on every step). Chosen by measurement, see
#: docs/performance.md.
SAMPLED_PER_WINDOW = 10
_ATTACH = "_gradwatch_attachment"


class _Attachment:
    """Marks a model as watched. Pickles and deep-copies as an empty marker, so a copy of
    the model is not watched."""

    __slots__ = ("ref",)

    def __init__(self, watcher: Watcher | None = None) -> None:
        self.ref = weakref.ref(watcher) if watcher is not None else None

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_Attachment, ())

    def get(self) -> Watcher | None:
        return self.ref() if self.ref is not None else None


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
    check every watched output for NaN/Inf (one sum each) and measure the parameter-gradient
    norms, so non-finite values and exploding gradients are caught on the step they
    appear. Sampled steps are the first step of each window and then one in
    ``sample_every``; ``"auto"`` (the default) samples every step of the first window and
    then one step in ``every // SAMPLED_PER_WINDOW``.
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
        self.sample_every = k if k is not None else max(1, self.every // SAMPLED_PER_WINDOW)
        # "auto" reads the whole first window on every step (what goes wrong at
        # initialization is seen completely); later windows are sampled
        self._dense = k is None
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
        self._optimizer = optimizer
        self._scaler = scaler
        self._root = root
        owners = assign_params(root, chosen)
        own: list[list[nn.Parameter]] = [[] for _ in chosen]
        for p, slot in owners:
            own[slot].append(p)
        self._infos = [describe(n, m, own[i]) for i, (n, m) in enumerate(chosen)]
        self._applies = [applicable(i, optimizer is not None) for i in self._infos]
        self._types = {i.name: i.type_name for i in self._infos}
        self._device = _device_of(root)
        L = len(chosen)
        self._buffers = WindowBuffers(L, self._device)
        self._collector = Collector(self._buffers, self._infos, self.thresholds.saturation_margin)
        self._rules = Rules(self.thresholds, self._infos,
                            measure(root, chosen, self._collector.fault), self._collector.fault)
        self._params = ParamTracker(owners, L, self._device)

        self._step = 0
        self._window_steps = 0
        self._amp_skipped = 0
        self._closed = False
        self._alerts: collections.deque[A.Alert] = collections.deque(maxlen=MAX_ALERTS)
        self._off: set[str] = set()  # internal parts switched off after a failure
        self._pending_grads: Any = None
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
        old = root.__dict__.get(_ATTACH)
        prev = old.get() if isinstance(old, _Attachment) else None
        if prev is not None and not prev._closed:
            warnings.warn(
                "gradwatch: this model was already watched; the previous watcher is closed "
                "(its data flushed, its hooks removed)",
                UserWarning,
                stacklevel=3,
            )
            prev.close()
        self._handles: list[Any] = []
        forget_compiled_code(model)  # else a compiled model that already ran ignores hooks
        for slot, (_, m) in enumerate(chosen):
            self._handles.append(m.register_forward_hook(ForwardHook(self._collector, slot)))
        self._handles.append(root.register_forward_hook(ForwardDoneHook(self._collector, -1)))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(_StepHook(self._pre_step)))
            self._handles.append(optimizer.register_step_post_hook(_StepHook(self._post_step)))
        self._amp: ScalerTap | None = None
        if scaler is not None:
            self._amp = ScalerTap(scaler, optimizer, self._amp_unscale, self._amp_skip)
        root.__dict__[_ATTACH] = _Attachment(self)
        shutdown.register(self)  # flushed and closed at exit / SIGTERM if left open

    # -- public surface -------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        """Watched module names in forward order (modules not yet called come last)."""
        seen = self._collector.order
        called = set(seen)
        rest = [i for i in range(len(self._infos)) if i not in called]
        return [self._infos[i].name for i in list(seen) + rest]

    @property
    def latest(self) -> Snapshot | None:
        return self._publish.latest

    @property
    def alerts(self) -> list[A.Alert]:
        return list(self._alerts)

    def step(self) -> None:
        """End of one training step (only when no optimizer was given to ``watch()``)."""
        if self._optimizer is not None:
            raise RuntimeError(
                "step() must not be called when watch() was given an optimizer: the watcher "
                "steps itself after every optimizer.step()"
            )
        if self._closed:
            return
        if self._amp is not None and self._amp.take_pending_skip():
            self._end_step(skipped=True)
            return
        self._pending_grads = self._params_safe("grad")
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
        """Flush a non-empty window, remove every hook, close an owned writer. Idempotent."""
        self._close(None)

    def _close(self, budget: float | None) -> None:
        """``budget``: at most this many seconds waiting for the background thread (at exit,
        where a hang is worse than a lost window); None waits as long as it takes."""
        if self._closed:
            return
        self._closed = True
        shutdown.unregister(self)
        c = self._collector
        c.act_on = c.grad_on = False
        for h in self._handles:
            h.remove()
        self._handles.clear()
        c.remove_tensor_hooks()
        if self._amp is not None:
            self._amp.remove()
        if self._root.__dict__.get(_ATTACH) is not None:
            att = self._root.__dict__[_ATTACH]
            if isinstance(att, _Attachment) and att.get() is self:
                del self._root.__dict__[_ATTACH]
        end = None if budget is None else time.monotonic() + budget

        def left() -> float | None:
            return None if end is None else max(0.0, end - time.monotonic())

        if self._window_steps:
            self._launch_flush()
        self._publish.close(left)
        self._deliver()

    def report(self) -> str:
        """A table of the latest window per layer, alerted cells marked with ``!``."""
        return _report(self._publish.latest, self.alerts, self._types)

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        self._close_at_exit()

    def _close_at_exit(self, budget: float | None = None) -> None:
        """Close when the program is already ending (an exception, exit, SIGTERM): alerts
        are delivered, but ``on_alert="raise"`` does not replace what is going on."""
        on_alert = self.on_alert
        if on_alert == "raise":
            self.on_alert = "log"
        try:
            self._close(budget)
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
            if self._collector.hist is not None and self._collector.full:
                self._collector.hist.add_grads(self._params.trainable)
            return self._params.grad_stats(self._collector.full)
        if what == "weight":
            return self._params.weight_norms()
        if what == "before":
            self._params.before_update()
            return None
        return self._params.update_ratios()

    def _pre_step(self, closure: bool) -> None:
        # with a closure (Lightning, LBFGS) the backward runs inside step(): read the
        # gradients after it, in _post_step (optimizers do not modify .grad in place)
        if not closure:
            self._pending_grads = self._params_safe("grad")
        if self._collector.full:
            self._params_safe("before")

    def _post_step(self, closure: bool) -> None:
        if closure:
            self._pending_grads = self._params_safe("grad")
        self._end_step()

    def _amp_unscale(self, factor: torch.Tensor) -> None:
        try:
            self._buffers.scale_out_grads(factor)
        except Exception as e:
            self._collector.fault("AMP unscale", "*", e)

    def _amp_skip(self) -> None:
        """The GradScaler skipped the optimizer step (inf/NaN gradients)."""
        if not self._closed:
            self._end_step(skipped=True)

    def _end_step(self, skipped: bool = False) -> None:
        full = self._collector.full and not skipped
        grads, self._pending_grads = self._pending_grads, None
        weights = self._params_safe("weight") if full else None
        updates = self._params_safe("update") if full and self._optimizer is not None else None
        if skipped:  # its staged stats see the inf/NaN that made the scaler skip: drop them
            self._buffers.discard_step()
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
        # sampled steps are aligned on the window: its first step, then one in k
        k = 1 if self._dense else self.sample_every
        self._collector.full = self._window_steps % k == 0
        self._deliver()

    def _commit(self, grads: Any, weights: Any, updates: Any) -> None:
        try:
            if "commit" in self._off:  # switched off: drop the staged step
                self._buffers.discard_step()
                return
            full = self._collector.full
            self._flags.push(self._buffers.step_flags(grads, full), self._step + 1)
            self._buffers.commit_step(grads, weights, updates, full)
        except Exception as e:
            self._off.add("commit")
            self._collector.fault("step commit", "*", e)

    def _check_flags(self) -> None:
        """Per-step flags that reached the host (this step's on CPU, a step or so later on
        CUDA) -> a non-finite alert at the layer where the NaN started, or an exploding
        alert for a gradient above ``extreme_rms``. No torch read op."""
        if self._off & {"commit", "flags"}:
            return
        try:
            for step, view in self._flags.poll():
                self._flag_alert(step, view)
        except Exception as e:
            self._off.add("flags")
            self._collector.fault("non-finite flags", "*", e)

    def _flag_alert(self, step: int, view: np.ndarray) -> None:
        if not view[:, :2].any():  # finite: only an extreme gradient is reported at once
            limit = self.thresholds.extreme_rms
            for i in np.flatnonzero(view[:, 2] > limit):
                self._pend(self._rules.exploding_now(step, self._infos[i].name,
                                                     float(view[i, 2])), step)
            return
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
            self._dense = False
            self._collector.full = True  # a new window starts with a sampled step
        self._publish.window(step, copy, order, amp, hist, force)

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
    """Attach gradwatch to ``model``; see ``Watcher`` and the README for the arguments."""
    return Watcher(model, **kwargs)
