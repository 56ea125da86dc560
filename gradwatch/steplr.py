"""Per-step learning-rate evidence: the update ratios of the last few steps, on the host.

A learning rate far too high blows a model up within a few steps, before the first window is
flushed, so the window history (``diagnosis.py``) has nothing to read yet. The per-step
flags (``flags.py``) carry each layer's ``update_ratio`` of the sampled steps (every step of
the dense first window); this keeps the median over the layers of the last ``keep`` such
steps, and names ``learning_rate`` for an alert that no window history explains yet when
those updates were far above the usual ~1e-3 before it. Host data only, bounded; written on
the training thread, read there and on the background thread (under a lock).
"""

from __future__ import annotations

import collections
import math
import threading

import numpy as np

from gradwatch.alerts import fmt
from gradwatch.diagnosis import LIMITS

#: Steps with measured updates kept.
KEEP = 16


class StepUpdates:
    """The median ``update_ratio`` over the layers of the last ``keep`` measured steps."""

    def __init__(self, limit: float = LIMITS.update_ratio, keep: int = KEEP) -> None:
        self.limit = limit
        self._steps: collections.deque[tuple[int, float]] = collections.deque(maxlen=keep)
        self._lock = threading.Lock()

    def see(self, step: int, ratios: np.ndarray) -> None:
        """One step's per-layer update ratios (0: not measured; a span of steps the device
        ran ahead is read as its last step)."""
        # sorted in Python: a median of a few hundred values at most, where numpy's own
        # runs through many more layers of code (in a step that has just evicted the caches)
        got = sorted(r for r in ratios.tolist() if r > 0)  # NaN is left out, as not > 0
        n = len(got)
        if n:
            u = got[n // 2] if n % 2 else (got[n // 2 - 1] + got[n // 2]) / 2
            with self._lock:
                self._steps.append((step, u))

    def before(self, step: int) -> tuple[float, int] | None:
        """The largest median update ratio of the kept steps before ``step`` (their updates
        made the weights step ``step`` ran with) when it is at least ``limit``, with its
        step; None otherwise."""
        with self._lock:
            past = [(u, s) for s, u in self._steps if s < step and math.isfinite(u)]
        if not past:
            return None
        u, s = max(past)
        return (u, s) if u >= self.limit else None

    def hint(self, step: int, what: str) -> str | None:
        """A ``learning_rate`` hint for ``what`` (an alert found at ``step``), None without
        the evidence."""
        found = self.before(step)
        if found is None:
            return None
        u, s = found
        return (f"the updates were far too large for the weights before {what}: median "
                f"update_ratio {fmt(u)} over the layers at step {s} (about 1e-3 is usual): "
                "lower the learning rate (or its warm-up peak), or clip gradients "
                "(torch.nn.utils.clip_grad_norm_)")
