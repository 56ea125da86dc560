"""Count host reads of tensor values: at the dispatcher and on the Tensor methods."""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_READ_OPS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.equal.default,
    torch.ops.aten.is_nonzero.default,
}
_METHODS = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__", "numpy")


class HostReadCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READ_OPS:
            self.counts[str(func)] += 1
        elif func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default,
                      torch.ops.aten.index_put.default):
            idx = args[1]
            if any(i is not None and i.dtype == torch.bool for i in idx):
                self.counts["boolean-mask index"] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@contextlib.contextmanager
def count_host_reads():
    """Yields a Counter-holding object; counts dispatcher reads and Tensor method reads."""
    mode = HostReadCounter()
    originals = {name: getattr(torch.Tensor, name) for name in _METHODS}

    def wrap(name, fn):
        def patched(self, *a, **k):
            mode.counts[f"Tensor.{name}"] += 1
            return fn(self, *a, **k)
        return patched

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        with mode:
            yield mode
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
