"""Which steps collect the full stat set (*sampled* steps); the others are *light* steps.

Sampled steps are aligned on the window: its first step, then one in ``period``. With an
int ``sample_every``, the period is that int from the first step on. With ``"auto"`` (the
default), every step of the first window is sampled (what goes wrong at initialization is
seen in full), then one in ``every // SAMPLED_PER_WINDOW`` (at least 1).

The schedule depends on step counts only, never on timing: two runs of the same loop sample
the same steps and report the same window values. (A schedule spaced by a measured cost
budget was tried: it made the window values of identical runs differ, see
docs/performance.md.)
"""

from __future__ import annotations

#: ``"auto"`` after the first window: this many evenly spaced sampled steps per window
#: (``every // SAMPLED_PER_WINDOW`` apart; windows shorter than twice this are sampled on
#: every step). Chosen by measurement, see docs/performance.md.
SAMPLED_PER_WINDOW = 10


class Sampler:
    """``sampled(window_step)`` says whether a step is sampled (collects the full stat set);
    ``new_window`` is called at every flush. ``period``: the steps between two sampled
    steps in the current window; ``later_period``: the same after the first window."""

    def __init__(self, every: int, sample_every: int | None) -> None:
        self.later_period = (max(1, every // SAMPLED_PER_WINDOW) if sample_every is None
                             else sample_every)
        self.period = 1 if sample_every is None else sample_every

    def sampled(self, window_step: int) -> bool:
        """Whether step ``window_step`` (0-based, within the window) is sampled."""
        return window_step % self.period == 0

    def new_window(self) -> None:
        """A window was flushed: ``"auto"`` leaves the dense first window."""
        self.period = self.later_period
