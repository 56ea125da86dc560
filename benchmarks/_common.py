"""Shared pieces of the benchmarks: workloads, a host-read counter, memory readings."""

from __future__ import annotations

import platform
import resource
import threading
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

# -- workloads ------------------------------------------------------------------------------
# Each returns (model, inputs, targets, loss function). Fixed seed, CPU.


def mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor, Callable[..., torch.Tensor]]:
    """8 Linear 512-wide with Tanh between, batch 128, MSE."""
    layers: list[nn.Module] = []
    for i in range(8):
        layers.append(nn.Linear(512, 512))
        if i < 7:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers), torch.randn(128, 512), torch.randn(128, 512), F.mse_loss


def cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor, Callable[..., torch.Tensor]]:
    """4 x (Conv3x3 + BatchNorm + ReLU(inplace)), 32/64/64/128 channels, batch 32 of 3x32x32.

    A 2x2 max-pool follows each of the first three blocks and a linear head closes it, so
    one step takes tens of milliseconds on one core (without pooling it is ~0.5 s)."""
    layers: list[nn.Module] = []
    c = 3
    for i, o in enumerate((32, 64, 64, 128)):
        layers += [nn.Conv2d(c, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]
        if i < 3:
            layers.append(nn.MaxPool2d(2))
        c = o
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10)]
    x = torch.randn(32, 3, 32, 32)
    return nn.Sequential(*layers), x, torch.randint(0, 10, (32,)), F.cross_entropy


class _LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(64, 256, num_layers=2, batch_first=True)
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


def lstm() -> tuple[nn.Module, torch.Tensor, torch.Tensor, Callable[..., torch.Tensor]]:
    """2-layer LSTM, hidden 256, sequence 50, batch 32 (64 input features), linear head."""
    return _LSTMNet(), torch.randn(32, 50, 64), torch.randint(0, 10, (32,)), F.cross_entropy


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x).mean(1))


def transformer() -> tuple[nn.Module, torch.Tensor, torch.Tensor, Callable[..., torch.Tensor]]:
    """Transformer encoder, 4 layers, d=256, 4 heads, sequence 64, batch 16."""
    return _Encoder(), torch.randn(16, 64, 256), torch.randint(0, 10, (16,)), F.cross_entropy


WORKLOADS: dict[str, Callable[[], Any]] = {
    "mlp": mlp, "cnn": cnn, "lstm": lstm, "transformer": transformer,
}

# -- host reads -----------------------------------------------------------------------------

_READ_OPS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.equal.default,
}
_PATCHED = ("item", "tolist", "cpu", "__bool__", "__float__")


class HostReads(TorchDispatchMode):
    """Counts reads of device values on the host, on the thread that enters it.

    At the dispatcher: ``_local_scalar_dense`` (``.item()``, ``float(t)``, ``bool(t)``),
    ``nonzero``, ``equal`` and boolean-mask indexing; plus calls of the Python methods
    ``Tensor.item/tolist/cpu/__bool__/__float__`` (``.cpu()`` and ``.tolist()`` of a CPU
    tensor dispatch nothing, but stall the stream on a GPU). A method call counts once, not
    again for the ops it dispatches.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self._depth = threading.local()
        self._saved: dict[str, Any] = {}

    def _inside(self) -> int:
        return getattr(self._depth, "n", 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        kwargs = kwargs or {}
        if self._inside() == 0:
            if func in _READ_OPS:
                self.count += 1
            elif func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default):
                idx = args[1] if len(args) > 1 else []
                if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx
                       if i is not None):
                    self.count += 1
        return func(*args, **kwargs)

    def __enter__(self) -> HostReads:
        mode = self

        for name in _PATCHED:
            orig = getattr(torch.Tensor, name)
            self._saved[name] = orig

            def wrapped(t: torch.Tensor, *a: Any, _orig: Any = orig, **k: Any) -> Any:
                outer = mode._inside() == 0
                if outer:
                    mode.count += 1
                mode._depth.n = mode._inside() + 1
                try:
                    return _orig(t, *a, **k)
                finally:
                    mode._depth.n -= 1

            setattr(torch.Tensor, name, wrapped)
        return super().__enter__()  # type: ignore[return-value]

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for name, orig in self._saved.items():
            setattr(torch.Tensor, name, orig)
        self._saved.clear()


# -- memory / machine -----------------------------------------------------------------------


def rss_mb() -> float:
    """Current resident set size of this process, MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine() -> dict[str, Any]:
    import os

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
