"""Device -> host without a stall: host memory (pinned on CUDA) and a completion marker.

``host_buffer`` makes the host side of a copy (pinned memory on CUDA, so a non-blocking copy
can land there while the training goes on); ``mark`` records a completion marker in the
device stream behind the copies issued so far (``torch.cuda.Event``); ``landed`` says
whether it has passed, never blocking. ``HostCopy`` is one tensor on its way to the host
(the window at a flush); ``flags.FlagsToHost`` reuses a few buffers for the per-step flags.
The other way, ``device_tensor`` puts a few host values on the device without a stall.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor


def host_buffer(shape: Any, dtype: torch.dtype, pinned: bool, zero: bool = False) -> Tensor:
    if zero:
        return torch.zeros(shape, dtype=dtype, pin_memory=pinned)
    return torch.empty(shape, dtype=dtype, pin_memory=pinned)


def mark(event: Callable[[], Any] | None = None) -> Any:
    """A completion marker recorded behind the copies issued so far (``event``: makes the
    marker, ``torch.cuda.Event`` by default)."""
    ev = (event or torch.cuda.Event)()
    ev.record()
    return ev


def landed(marker: Any) -> bool:
    """Whether the copies before ``marker`` have landed (None/True: synchronous copies)."""
    return marker is None or marker is True or bool(marker.query())


def device_tensor(values: Sequence[float], dtype: torch.dtype,
                  device: torch.device) -> Tensor:
    """A small tensor of host values on ``device``, made while training runs: on CUDA from
    pinned memory without blocking (the pinned allocator keeps the source until the copy is
    done), so a cache miss in the hot path does not sync the device."""
    src = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return src.to(device, non_blocking=True)


class HostCopy:
    """A device tensor on its way to the host.

    On CUDA the copy goes non-blocking into pinned memory and a marker records its end; the
    reader (the background thread) waits on that marker, never the training thread. On CPU
    the copy is a plain memcpy into fresh memory, so the device buffer can be reset at once.
    """

    def __init__(self, t: Tensor) -> None:
        if t.device.type == "cuda":
            self.host = host_buffer(t.shape, t.dtype, pinned=True)
            self.host.copy_(t, non_blocking=True)
            self.event: Any = mark()
        else:
            self.host = t.to("cpu", copy=True)
            self.event = None

    def ready(self) -> bool:
        """Whether the copy has landed (never blocks)."""
        return landed(self.event)

    def numpy(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.host.numpy()
