"""Which steps collect the full stat set (*sampled* steps); the others are *light* steps.

Sampled steps are aligned on the window: its first step, then one in ``k``. With an int
``sample_every``, ``k`` is that int from the first step on. With ``"auto"`` (the default),
every step of the first window and of the run's first ``FIRST_STEPS`` (100) steps is sampled
(what goes wrong at initialization is seen completely), then ``k = PERIOD`` (10) steps,
whatever ``every`` is: ``every=10`` samples one step in 10 after step 100, as ``every=100``
does, not every step. A window shorter than the period still gets its sampled step (its
first), so with ``every < 10`` one step per window is sampled.

The schedule depends on step counts only, never on timing: two runs of the same loop sample
the same steps and report the same window values. (A schedule spaced by a measured cost
budget was tried: it made the window values of identical runs differ, see
docs/performance.md.)
"""

from __future__ import annotations

#: ``"auto"``: one sampled step in ``PERIOD`` after the first window and the first
#: ``FIRST_STEPS`` steps, whatever ``every`` is. Chosen by measurement, see
#: docs/performance.md.
PERIOD = 10
#: ``"auto"`` samples every one of the run's first ``FIRST_STEPS`` steps.
FIRST_STEPS = 100


class Sampler:
    """``sampled(step, window_step)`` says whether a step is sampled (collects the full stat
    set); ``new_window`` is called at every flush. ``later_period``: the steps between two
    sampled steps after the dense start (``"auto"``) or from the first step (an int)."""

    def __init__(self, every: int, sample_every: int | None) -> None:
        self.auto = sample_every is None
        self.later_period = PERIOD if sample_every is None else sample_every
        self.first = True  # in the first window

    def sampled(self, step: int, window_step: int) -> bool:
        """Whether step ``step`` (0-based since ``watch()``), step ``window_step`` of its
        window (0-based), is sampled."""
        if self.auto and (self.first or step < FIRST_STEPS):
            return True
        return window_step % self.later_period == 0

    def new_window(self) -> None:
        """A window was flushed."""
        self.first = False
