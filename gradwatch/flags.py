"""Per-step flags, device -> host without a stall and without a torch read op.

Each step the watcher pushes a ``[layers, 3]`` device tensor: non-finite counts in the
outputs and in the gradients (summed over steps), and the parameter-gradient RMS (max over
steps). On CPU the copy is a plain memcpy and the step is read at once. On CUDA the flags
go into a device accumulator; whenever a pinned host slot is free, the accumulator is
copied into it with ``non_blocking=True`` and zeroed, and an event is recorded behind the
copy. The host reads a slot, through a numpy view made once here, only after its event
reports done (``Event.query()`` never blocks). When the device runs several steps behind,
flags wait in the accumulator instead of being overwritten, so nothing is lost; they are
then reported with the last step of the span they cover.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

COLS = 3  # non-finite in outputs, non-finite in gradients, gradient RMS


class StepFlags:
    """Per-step flags of ``n_layers`` layers on ``device``; ``slots`` host copies in flight.

    ``event`` makes the completion marker recorded behind each copy (``torch.cuda.Event``
    on CUDA); None means the copy is synchronous (CPU) and is read in the same step.
    """

    def __init__(self, n_layers: int, device: torch.device, slots: int = 2,
                 event: Callable[[], Any] | None = None) -> None:
        if event is None and device.type == "cuda":
            event = torch.cuda.Event
        self._event = event
        pin = device.type == "cuda"
        self._host = [torch.zeros(n_layers, COLS, dtype=torch.float32, pin_memory=pin)
                      for _ in range(slots if event is not None else 1)]
        self._views = [h.numpy() for h in self._host]  # made once: reading is no torch op
        self._acc = (torch.zeros(n_layers, COLS, dtype=torch.float32, device=device)
                     if event is not None else None)
        self._events: list[Any] = [None] * len(self._host)
        self._span: list[tuple[int, int, int]] = [(0, 0, 0)] * len(self._host)  # seq, first, last
        self._first: int | None = None
        self._seq = 0

    def push(self, flags: Tensor, step: int) -> None:
        """Once per step (training thread): the flags of training step ``step``."""
        if self._acc is None:
            self._host[0].copy_(flags)
            self._span[0] = (0, step, step)
            self._events[0] = True
            return
        acc = self._acc
        acc[:, :2] += flags[:, :2]
        acc[:, 2].copy_(torch.maximum(acc[:, 2], flags[:, 2]))
        if self._first is None:
            self._first = step
        free = next((i for i, e in enumerate(self._events) if e is None), None)
        if free is None:  # every slot still in flight: keep accumulating on the device
            return
        self._host[free].copy_(self._acc, non_blocking=True)
        self._acc.zero_()  # stream order: runs after the copy has read the accumulator
        assert self._event is not None
        ev = self._event()
        ev.record()
        self._events[free] = ev
        self._seq += 1
        self._span[free] = (self._seq, self._first, step)
        self._first = None

    def poll(self) -> list[tuple[int, np.ndarray]]:
        """The flags that have reached the host, oldest first: ``(step, [layers, 3] array)``
        for each span holding a non-zero value. The arrays are copies; slots are freed."""
        done = []
        for i, ev in enumerate(self._events):
            if ev is None:
                continue
            if ev is not True and not ev.query():
                continue
            done.append(i)
        out = []
        for i in sorted(done, key=lambda j: self._span[j][0]):
            view = self._views[i]
            if view.any():
                out.append((self._span[i][2], view.copy()))
            self._events[i] = None
        return out
