"""``watch()`` and ``Watcher``: choose modules, own every hook handle, step/flush/close.

No statistics are computed here and nothing is written here: hooks (``hooks.py``) fill the
device buffers (``buffers.py``); a flush makes one host copy (``snapshot.py``) and hands it
to the background worker, which runs the rules (``rules.py``) and the sinks (``sinks/``).
Alerts are delivered on the training thread, at the next ``step()``/``flush()``/``close()``.
"""

from __future__ import annotations

import collections
import os
import threading
import warnings
import weakref
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from gradwatch import alerts as A
from gradwatch.buffers import WindowBuffers
from gradwatch.hooks import Collector, ForwardHook, ParamTracker, _StepHook
from gradwatch.rules import Rules, Thresholds
from gradwatch.selection import describe, select, unwrap
from gradwatch.sinks.console import report as _report
from gradwatch.snapshot import HostCopy, Snapshot, applicable
from gradwatch.worker import Worker

MAX_ALERTS = 10_000
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


def _check_int(name: str, v: object) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{name} must be an int >= 1, got {v!r}")
    if v < 1:
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    return v


def _check_bool(name: str, v: object) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be True or False, got {v!r}")
    return v


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _open_writer(logdir: str | os.PathLike[str] | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # pragma: no cover - tensorboard is a dependency
        raise ImportError("gradwatch needs tensorboard: pip install tensorboard") from e
    if logdir is not None:
        path = os.fspath(logdir)
        try:
            os.makedirs(path, exist_ok=True)
            probe = os.path.join(path, ".gradwatch-write-test")
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError as e:
            raise ValueError(f"logdir {path!r} cannot be written: {e}") from e
        return SummaryWriter(log_dir=path)
    return SummaryWriter()


class Watcher:
    """Watches one model. Create it with ``gradwatch.watch()``.

    Device and syncs: all statistics live in preallocated tensors on the model's device.
    Between flushes nothing is read back to the host; a flush (every ``every`` steps) makes
    one device -> host copy of the whole window (non-blocking into pinned memory on CUDA)
    and hands it to a background thread for the rules and TensorBoard.
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
        sample_every: int = 1,
        thresholds: Thresholds | Mapping[str, Any] | None = None,
        on_alert: A.OnAlert = "warn",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        histograms: bool = False,
        images: bool = False,
    ) -> None:
        # -- validate everything before touching the model ----------------------------------
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer or None, got "
                f"{type(optimizer).__name__}"
            )
        if scaler is not None and not (hasattr(scaler, "get_scale") and hasattr(scaler, "step")):
            raise TypeError(
                f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}"
            )
        self.every = _check_int("every", every)
        self.sample_every = _check_int("sample_every", sample_every)
        tensorboard = _check_bool("tensorboard", tensorboard)
        self.histograms = _check_bool("histograms", histograms)
        self.images = _check_bool("images", images)
        A.validate_on_alert(on_alert)
        self.thresholds = Thresholds.coerce(thresholds)
        if logdir is not None and not isinstance(logdir, (str, os.PathLike)):
            raise TypeError(f"logdir must be a path (str or os.PathLike), got {logdir!r}")
        if writer is not None and not hasattr(writer, "add_scalar"):
            raise TypeError(
                f"writer must be a torch.utils.tensorboard.SummaryWriter, got "
                f"{type(writer).__name__}"
            )
        root = unwrap(model)
        chosen = select(root, include, exclude)

        self.on_alert = on_alert
        self._optimizer = optimizer
        self._scaler = scaler
        self._root = root
        self._infos = [describe(n, m) for n, m in chosen]
        self._applies = [applicable(i, optimizer is not None) for i in self._infos]
        self._types = {i.name: i.type_name for i in self._infos}
        self._device = _device_of(root)
        L = len(chosen)
        self._buffers = WindowBuffers(L, self._device)
        self._collector = Collector(self._buffers, self._infos, self.thresholds.saturation_margin)
        self._rules = Rules(self.thresholds, self._infos)
        owner: dict[int, int] = {}
        for slot, (_, m) in enumerate(chosen):
            for p in m._parameters.values():
                if p is not None and id(p) not in owner:
                    owner[id(p)] = slot
        owners = [(p, owner[id(p)]) for p in root.parameters() if id(p) in owner]
        self._params = ParamTracker(owners, L, self._device)

        self._step = 0
        self._window_steps = 0
        self._amp_skipped = 0
        self._closed = False
        self._latest: Snapshot | None = None
        self._alerts: collections.deque[A.Alert] = collections.deque(maxlen=MAX_ALERTS)
        self._pending: collections.deque[A.Alert] = collections.deque()
        self._faults: collections.deque[str] = collections.deque()
        self._lock = threading.Lock()
        self._pending_grads: Any = None
        self._sink: Any = None
        if tensorboard:
            from gradwatch.sinks.tensorboard import TensorBoardSink

            if writer is not None:
                self._sink = TensorBoardSink(writer, owns=False)
            else:
                self._sink = TensorBoardSink(_open_writer(logdir), owns=True)
        self._worker = Worker(self._worker_error)
        # per-step non-finite flags: [layers, 2] copied each step without waiting
        self._flags = [self._host_flags(L) for _ in range(2)]
        self._flag_views = [f.numpy() for f in self._flags]
        self._flag_events: list[Any] = [None, None]

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
        for slot, (_, m) in enumerate(chosen):
            self._handles.append(m.register_forward_hook(ForwardHook(self._collector, slot)))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(_StepHook(self._pre_step)))
            self._handles.append(optimizer.register_step_post_hook(_StepHook(self._post_step)))
        root.__dict__[_ATTACH] = _Attachment(self)

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
        return self._latest

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
        self._pending_grads = self._params_safe("grad")
        self._end_step()

    def flush(self) -> Snapshot | None:
        """Aggregate the current window now, run the rules, write; return the Snapshot.

        This waits for the background thread (a sync point by design)."""
        if self._window_steps:
            self._launch_flush()
        self._worker.join()
        self._deliver()
        return self._latest

    def close(self) -> None:
        """Flush a non-empty window, remove every hook, close an owned writer. Idempotent."""
        if self._closed:
            return
        self._closed = True
        c = self._collector
        c.act_on = c.grad_on = False
        for h in self._handles:
            h.remove()
        self._handles.clear()
        c.remove_tensor_hooks()
        if self._root.__dict__.get(_ATTACH) is not None:
            att = self._root.__dict__[_ATTACH]
            if isinstance(att, _Attachment) and att.get() is self:
                del self._root.__dict__[_ATTACH]
        try:
            if self._window_steps:
                self._launch_flush()
            self._worker.join()
            if self._sink is not None:
                self._worker.submit(self._sink.close)
            self._worker.join()
        finally:
            self._worker.close()
        self._deliver()

    def report(self) -> str:
        """A table of the latest window per layer, alerted cells marked with ``!``."""
        return _report(self._latest, self.alerts, self._types)

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        # the block is already failing: do not let an alert replace its exception
        on_alert = self.on_alert
        if on_alert == "raise":
            self.on_alert = "log"
        try:
            self.close()
        finally:
            self.on_alert = on_alert

    def __repr__(self) -> str:
        return (f"Watcher({len(self._infos)} layers, step={self._step}, every={self.every}, "
                f"{'closed' if self._closed else 'open'})")

    # -- step machinery ---------------------------------------------------------------------------
    def _params_safe(self, what: str) -> Any:
        try:
            if what == "grad":
                return self._params.grad_stats(self._collector.full)
            if what == "weight":
                return self._params.weight_norms()
            if what == "before":
                self._params.before_update()
                return None
            return self._params.update_ratios()
        except Exception as e:
            self._collector.fault(f"parameter statistics ({what})", "*", e)
            return None

    def _pre_step(self) -> None:
        self._pending_grads = self._params_safe("grad")
        if self._collector.full:
            self._params_safe("before")

    def _post_step(self) -> None:
        self._end_step()

    def _end_step(self) -> None:
        full = self._collector.full
        grads, self._pending_grads = self._pending_grads, None
        weights = self._params_safe("weight") if full else None
        updates = self._params_safe("update") if full and self._optimizer is not None else None
        k = self._step % 2
        try:
            flags = self._buffers.step_flags(grads)
            self._flags[k].copy_(flags, non_blocking=self._flags[k].is_pinned())
            if self._flags[k].is_pinned():
                ev = torch.cuda.Event()
                ev.record()
                self._flag_events[k] = ev
            self._buffers.commit_step(grads, weights, updates)
        except Exception as e:
            self._collector.fault("step commit", "*", e)
        self._collector.end_step()
        self._step += 1
        self._window_steps += 1
        self._check_flags(k)
        self._collector.full = self._step % self.sample_every == 0
        if self._window_steps >= self.every:
            self._launch_flush()
        self._deliver()

    @staticmethod
    def _host_flags(n: int) -> torch.Tensor:
        pin = torch.cuda.is_available()
        return torch.zeros(n, 2, dtype=torch.float32, pin_memory=pin)

    def _check_flags(self, k: int) -> None:
        """Read a step's non-finite flags on the host: this step's on CPU (the copy is done),
        the previous step's on CUDA once its event has completed. No torch read op."""
        if self._flag_events[k] is not None:  # CUDA: look at the previous step instead
            k = 1 - k
            ev = self._flag_events[k]
            if ev is None or not ev.query():
                return
            self._flag_events[k] = None
            step = self._step - 1
        else:
            step = self._step
        view = self._flag_views[k]
        if not view.any():
            return
        order = self._collector.order
        acts = view[:, 0]
        origin = next((i for i in order if acts[i] > 0), None)
        if origin is None:
            grads = view[:, 1]
            origin = next((i for i in reversed(order) if grads[i] > 0), None)
            if origin is None:
                origin = int(np.argmax(grads))
        count = float(view[origin].sum())
        view[:] = 0
        a = self._rules.nonfinite_now(step, self._infos[origin].name, count)
        if a is not None:
            with self._lock:
                self._pending.append(a)

    def _launch_flush(self) -> None:
        """On the training thread: launch the copy, reset the window, hand over."""
        step, amp = self._step, self._amp_skipped
        order = list(self._collector.order)
        try:
            if self._distributed():
                self._buffers.reduce_across_ranks()
            copy = HostCopy(self._buffers.finalize())
        except Exception as e:
            self._collector.fault("flush", "*", e)
            return
        finally:
            self._buffers.reset_window()
            self._window_steps = 0
            self._amp_skipped = 0
        self._worker.submit(lambda: self._process(step, copy, order, amp))

    def _distributed(self) -> bool:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _is_writer_rank(self) -> bool:
        import torch.distributed as dist

        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0

    def _process(self, step: int, copy: HostCopy, order: list[int], amp: int) -> None:
        """On the background thread: host values -> Snapshot -> rules -> sinks."""
        snap = Snapshot.build(step, copy.numpy(), self._infos, order, self._applies, amp)
        names = [self._infos[i].name for i in order]
        found = self._rules.evaluate(step, snap.stats, names, snap.act_nonfinite)
        self._latest = snap
        if self._sink is not None and self._is_writer_rank():
            self._sink.write(snap, found)
        with self._lock:
            self._pending.extend(found)

    def _worker_error(self, e: BaseException) -> None:
        with self._lock:
            self._faults.append(f"gradwatch: internal error in the background writer: "
                                f"{type(e).__name__}: {e}; training continues")

    def _deliver(self) -> None:
        """Alerts and faults reach the user here, on the training thread."""
        if not self._pending and not self._faults:
            return
        with self._lock:
            found = list(self._pending)
            self._pending.clear()
            faults = list(self._faults)
            self._faults.clear()
        for f in faults:
            warnings.warn(f, A.GradwatchWarning, stacklevel=3)
        if not self._is_writer_rank():
            return
        for i, a in enumerate(found):
            self._alerts.append(a)
            try:
                A.deliver(a, self.on_alert)
            except A.GradientAlertError:
                with self._lock:
                    self._pending.extendleft(reversed(found[i + 1:]))
                raise


def watch(model: nn.Module, **kwargs: Any) -> Watcher:
    """Attach gradwatch to ``model``; see ``Watcher`` and the README for the arguments."""
    return Watcher(model, **kwargs)
