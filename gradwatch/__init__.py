"""gradwatch: per-layer gradient and activation health for PyTorch training loops."""

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
from gradwatch.rules import Thresholds
from gradwatch.snapshot import Snapshot
from gradwatch.watcher import Watcher, unwatch, watch

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
