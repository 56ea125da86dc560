"""Which steps collect the full stat set (*sampled* steps); the others are *light* steps.

Sampled steps are aligned on the window: its first step, then one in ``k``. With an int
``sample_every``, ``k`` is that int. With ``"auto"`` (the default) ``k`` follows a cost
budget the watcher measures on itself: the host time of a sampled step against a light one.

* The first steps alternate sampled and light (``CALIBRATE``), which measures both.
* The rest of the first window is sampled as densely as ``FIRST_BUDGET`` allows: every step
  for most models, where the full stat set costs less than a light step; every second or
  third for a model of a thousand small modules, where Python time per module dominates.
* Later windows spend at most ``STEADY_BUDGET`` of the step time on the full stat set, and
  sample at least ``every // SAMPLED_PER_WINDOW`` steps apart (10 sampled steps a window of
  100; windows shorter than 20 steps are sampled on every step, as with a small model).

Times come from ``time.perf_counter`` at each step's end (the step's wall time, the user's
own work included); nothing is read from the device.
"""

from __future__ import annotations

import math
import time

#: Steps at the start of a watch that alternate sampled and light; the first pair is a
#: warm-up and not measured.
CALIBRATE = 6
#: Extra time a sampled step may cost, as a fraction of a light step: the first window...
FIRST_BUDGET = 1.0
#: ... and later windows, averaged over the window.
STEADY_BUDGET = 0.02
#: The densest default after the first window: ``every // SAMPLED_PER_WINDOW`` steps apart.
SAMPLED_PER_WINDOW = 10
_EMA = 0.7  # weight of the past in the step-time averages


class Sampler:
    """``full(window_step)`` says whether a step collects the full stat set; ``observe``
    takes each finished step's type; ``new_window`` is called at every flush."""

    def __init__(self, every: int, sample_every: int | None) -> None:
        self.every = every
        self.fixed = sample_every
        self.floor = max(1, every // SAMPLED_PER_WINDOW)
        self.k = sample_every if sample_every is not None else 1
        self.first = sample_every is None  # still in the first window of "auto"
        self.steps = 0  # steps observed
        self._t_full: float | None = None
        self._t_light: float | None = None
        self._last: float | None = None

    def full(self, window_step: int) -> bool:
        """Whether step ``window_step`` (0-based, within the window) is sampled."""
        if self.first and self.steps < CALIBRATE:
            return self.steps % 2 == 0
        return window_step % self.k == 0

    def observe(self, full: bool) -> None:
        """A step ended (sampled or light): its wall time updates the averages."""
        now = time.perf_counter()
        last, self._last = self._last, now
        self.steps += 1
        if last is None or self.steps <= 2 or self.fixed is not None:
            return  # the first steps warm caches and allocators up
        dt = now - last
        if full:
            self._t_full = dt if self._t_full is None else _EMA * self._t_full + (1 - _EMA) * dt
        else:
            self._t_light = (dt if self._t_light is None
                             else _EMA * self._t_light + (1 - _EMA) * dt)
        if self.first and self.steps == CALIBRATE:
            self.k = self._k(FIRST_BUDGET, 1)

    @property
    def cost(self) -> float | None:
        """Measured extra time of a sampled step, as a fraction of a light step."""
        if self._t_full is None or not self._t_light:
            return None
        return max(0.0, self._t_full / self._t_light - 1.0)

    def _k(self, budget: float, floor: int) -> int:
        r = self.cost
        if r is None:
            return floor
        return max(floor, min(self.every, math.ceil(r / budget - 1e-9)))

    def new_window(self) -> None:
        """A window was flushed: the next one follows the steady budget."""
        if self.fixed is not None:
            return
        if self.steps < CALIBRATE:  # a window shorter than the calibration: go on with it
            return
        self.first = False
        self.k = self._k(STEADY_BUDGET, self.floor)
