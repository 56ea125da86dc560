"""Which steps collect the full stat set (*sampled* steps); the others are *light* steps.

Sampled steps are aligned on the window: its first step, then one in ``k``. With an int
``sample_every``, ``k`` is that int. With ``"auto"`` (the default) ``k`` follows a cost
budget the watcher measures on itself: the host time spent in the work only sampled steps
do (activation and output-gradient statistics, weight norms, update ratios, max |g|),
against the rest of the step.

* The first window is sampled on every step, or, where the full stat set costs more than
  ``FIRST_BUDGET`` of the rest of a step, as densely as that budget allows.
* Later windows spend at most ``STEADY_BUDGET`` of the step time on it, and sample at most
  ``every // SAMPLED_PER_WINDOW`` steps apart (10 sampled steps a window of 100).

Times come from ``time.perf_counter`` (host time, the user's own work in the step
included); nothing is read from the device.
"""

from __future__ import annotations

import math
import time

#: Extra time a sampled step may cost, as a fraction of the rest of the step: the first
#: window...
FIRST_BUDGET = 1.0
#: ... and later windows, averaged over the window.
STEADY_BUDGET = 0.03
#: The densest default after the first window: ``every // SAMPLED_PER_WINDOW`` steps apart.
SAMPLED_PER_WINDOW = 10
_EMA = 0.7  # weight of the past in the step-time averages


class Sampler:
    """``full(window_step)`` says whether a step collects the full stat set; ``observe``
    takes each finished step (sampled or not, and the host seconds its sampled-only work
    took); ``new_window`` is called at every flush."""

    def __init__(self, every: int, sample_every: int | None) -> None:
        self.every = every
        self.fixed = sample_every
        self.floor = max(1, every // SAMPLED_PER_WINDOW)
        self.k = sample_every if sample_every is not None else 1
        self.first = sample_every is None  # still in the first window of "auto"
        self.steps = 0  # steps observed
        self.cost: float | None = None  # sampled-only work / the rest of a step (EMA)
        self._last: float | None = None

    def full(self, window_step: int) -> bool:
        """Whether step ``window_step`` (0-based, within the window) is sampled."""
        return window_step % self.k == 0

    def observe(self, full: bool, work: float) -> None:
        """A step ended; ``work``: host seconds of its sampled-only work (0 if light)."""
        now = time.perf_counter()
        last, self._last = self._last, now
        self.steps += 1
        if not full or last is None or self.fixed is not None:
            return
        rest = (now - last) - work
        if rest <= 0 or self.steps <= 2:  # the first steps warm caches and allocators up
            return
        r = work / rest
        self.cost = r if self.cost is None else _EMA * self.cost + (1 - _EMA) * r
        if self.first:
            self.k = self._k(FIRST_BUDGET, 1)

    def _k(self, budget: float, floor: int) -> int:
        if self.cost is None:
            return floor
        return max(floor, min(self.every, math.ceil(self.cost / budget - 1e-9)))

    def new_window(self) -> None:
        """A window was flushed: the next one follows the steady budget."""
        if self.fixed is None:
            self.first = False
            self.k = self._k(STEADY_BUDGET, self.floor)
