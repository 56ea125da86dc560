"""Per-step flags, device -> host without a stall and without a torch read op.

Names: the *step flags* are the ``[layers + 1, cols]`` device tensor a step makes
(``buffers.WindowBuffers.step_flags``); ``FlagsToHost`` carries them to the host;
``HostFlags`` is what arrived for one step; ``monitor.StepMonitor`` sends and examines them.
(``modflags.ModuleFlags`` are per-module counts of compiled code, part of the trace payload.)

Each step the step engine pushes a ``[layers + 1, cols]`` device tensor (non-finite counts
in the outputs and in the gradients, summed over steps, then the parameter-gradient RMS and
any further per-layer values, e.g. the update ratio, max over steps; the extra last row
counts the NaN sums of the step's non-finite trace) and, when the
step has one, the trace's rows (``trace.py``) with the host record they belong to.

On CPU the copy is a plain memcpy into host buffers made once, read in the same step. On
CUDA both go, non-blocking, into one of a few pinned host slots, and an event is recorded
behind the copy; the host reads a slot through a numpy view only after its event reports
done (``Event.query()`` never blocks). When the device runs so far behind that no slot is
free, the flags wait in a device accumulator instead of being overwritten, so no
non-finite step goes unseen; the traces of such steps are dropped (their origin is then
named from the flags alone) and they are reported with the last step of the span.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from gradwatch.hostcopy import host_buffer, landed, mark

COLS = 3  # non-finite in outputs, non-finite in gradients, gradient RMS (the least)


@dataclass
class HostFlags:
    """What reached the host for one step (or a span of steps the device ran behind)."""

    step: int
    layers: np.ndarray  # [layers, cols]
    trace_nan: float  # NaN sums in the step's trace (all steps of the span)
    trace: np.ndarray | None  # the step's trace rows, None when none came along
    meta: Any
    dropped: bool = False  # a trace was pushed but dropped (the device ran far behind)


class _Slot:
    def __init__(self, n: int, pin: bool) -> None:
        self.pin = pin
        self.host = host_buffer(n, torch.float32, pin, zero=True)
        self.view = self.host.numpy()  # made once: reading is no torch op
        self.event: Any = None
        self.seq = 0
        self.step = 0
        self.meta: Any = None
        self.n_trace = -1
        self.dropped = False

    def fit(self, n: int) -> None:
        if self.host.numel() < n:
            self.host = host_buffer(max(n, 2 * self.host.numel()), torch.float32, self.pin,
                                    zero=True)
            self.view = self.host.numpy()


class FlagsToHost:
    """Per-step flags of ``n_layers`` layers on ``device``; ``slots`` host copies in flight.

    ``event`` makes the completion marker recorded behind each copy (``torch.cuda.Event``
    on CUDA); None means the copy is synchronous (CPU) and is read in the same step.
    """

    def __init__(self, n_layers: int, device: torch.device, slots: int = 4,
                 event: Callable[[], Any] | None = None, cols: int = COLS) -> None:
        if event is None and device.type == "cuda":
            event = torch.cuda.Event
        self._event = event
        self.n_layers = n_layers
        self._rows = n_layers + 1
        self.cols = cols
        self._head = self._rows * cols
        pin = device.type == "cuda"
        self._slots = [_Slot(self._head + 256, pin)
                       for _ in range(slots if event is not None else 1)]
        self._acc = (torch.zeros(self._rows, cols, dtype=torch.float32, device=device)
                     if event is not None else None)
        self._first: int | None = None
        self._dropped = False
        self._seq = 0
        self._held = False  # a slot may hold flags not polled yet

    def push(self, flags: Tensor, step: int, trace: Tensor | None = None,
             meta: Any = None) -> None:
        """Once per step (training thread): the ``[layers + 1, cols]`` flags of training step
        ``step``, and optionally the step's trace rows and their host record."""
        n_trace = -1 if trace is None else trace.numel()
        if self._acc is None:  # CPU: read in this step
            slot = self._slots[0]
            slot.fit(self._head + max(n_trace, 0))
            slot.host[: self._head].copy_(flags.reshape(-1))
            if trace is not None and n_trace:
                slot.host[self._head: self._head + n_trace].copy_(trace)
            slot.event, slot.step, slot.meta, slot.n_trace = True, step, meta, n_trace
            slot.seq, slot.dropped = step, False
            self._held = True
            return
        acc = self._acc
        acc[:, :2] += flags[:, :2]
        acc[:, 2:].copy_(torch.maximum(acc[:, 2:], flags[:, 2:]))
        if self._first is None:
            self._first = step
        free = next((s for s in self._slots if s.event is None), None)
        if free is None:  # every slot still in flight: keep accumulating on the device
            self._dropped = self._dropped or trace is not None
            return
        slot = free
        slot.fit(self._head + max(n_trace, 0))
        slot.host[: self._head].copy_(acc.reshape(-1), non_blocking=True)
        if trace is not None and n_trace:
            slot.host[self._head: self._head + n_trace].copy_(trace, non_blocking=True)
        acc.zero_()  # stream order: runs after the copy has read the accumulator
        ev = mark(self._event)
        self._seq += 1
        # a trace describes one step: kept only when the span is that one step
        whole = self._first == step
        slot.event, slot.seq, slot.step = ev, self._seq, step
        self._held = True
        slot.meta, slot.n_trace = (meta, n_trace) if whole else (None, -1)
        slot.dropped = self._dropped or (trace is not None and not whole)
        self._first = None
        self._dropped = False

    def read_now(self, flags: Tensor, parts: list[Tensor], step: int, meta: Any) -> HostFlags:
        """CPU: the ``[layers, cols]`` flags of step ``step`` and its payload ``parts`` read at
        once: two copies into host buffers made once, read through their numpy view."""
        assert self._acc is None, "read_now is for a device that is host memory"
        slot = self._slots[0]
        n = sum(t.numel() for t in parts)
        slot.fit(self._head + n)
        slot.host[: self.n_layers * self.cols].copy_(flags.reshape(-1))
        trace = None
        if meta is not None:
            if parts:
                torch.cat(parts, out=slot.host[self._head: self._head + n])
            trace = slot.view[self._head: self._head + n]
        layers = slot.view[: self.n_layers * self.cols].reshape(self.n_layers, self.cols)
        nan = float(np.isnan(trace).sum()) if trace is not None else 0.0
        return HostFlags(step, layers, nan, trace, meta)

    def poll(self) -> list[HostFlags]:
        """The flags that have reached the host, oldest first, for each step (or span) with
        a non-zero value; the arrays are copies, the slots are freed."""
        if not self._held:  # nothing pushed since the last poll freed every slot
            return []
        done = [s for s in self._slots
                if s.event is not None and landed(s.event)]
        out = []
        for s in sorted(done, key=lambda x: x.seq):
            head = s.view[: self._head].reshape(self._rows, self.cols)
            trace = (s.view[self._head: self._head + s.n_trace].copy()
                     if s.n_trace >= 0 else None)
            if head.any() or (trace is not None and not np.isfinite(trace).all()):
                out.append(HostFlags(s.step, head[: self.n_layers].copy(), float(head[-1, 0]),
                                 trace, s.meta, s.dropped))
            s.event, s.meta = None, None
        self._held = any(s.event is not None for s in self._slots)
        return out


StepFlags = FlagsToHost  # the former name
