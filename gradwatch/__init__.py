"""gradwatch: per-layer gradient and activation health for PyTorch training loops.

The names that need torch (``watch``, ``Watcher``, ``Snapshot``, ...) load on first use (PEP
562), so ``import gradwatch.reader`` or the TensorBoard plugin never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gradwatch.alerts import (
    Alert,
    DeadActivationWarning,
    ExplodingGradientWarning,
    GradientAlertError,
    GradwatchWarning,
    NonFiniteWarning,
    SaturationWarning,
    VanishingGradientWarning,
)

if TYPE_CHECKING:
    from gradwatch.snapshot import Snapshot
    from gradwatch.thresholds import Thresholds
    from gradwatch.watcher import Watcher, unwatch, watch

#: public name -> the module that defines it (imported on first access)
_LAZY = {
    "Thresholds": "gradwatch.thresholds",
    "Snapshot": "gradwatch.snapshot",
    "Watcher": "gradwatch.watcher",
    "unwatch": "gradwatch.watcher",
    "watch": "gradwatch.watcher",
}

__all__ = [
    "Alert",
    "DeadActivationWarning",
    "ExplodingGradientWarning",
    "GradientAlertError",
    "GradwatchWarning",
    "NonFiniteWarning",
    "SaturationWarning",
    "Snapshot",
    "Thresholds",
    "VanishingGradientWarning",
    "Watcher",
    "unwatch",
    "watch",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
