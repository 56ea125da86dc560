"""Per-step learning-rate evidence (steplr.py): the median update ratio of the steps before an
alert, and the update-ratio column of the per-step flags it is read from (max over a span
of steps the device ran ahead, like the gradient RMS)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradwatch.flags import StepFlags
from gradwatch.steplr import KEEP, StepUpdates


def test_the_evidence_is_the_largest_median_of_the_steps_before() -> None:
    s = StepUpdates(limit=0.05)
    s.see(1, np.array([0.0, 0.0]))  # nothing measured (a light step): not kept
    s.see(2, np.array([2.0, 0.5, 1.0]))  # median 1.0
    s.see(3, np.array([0.01, 0.02, 0.0]))  # median 0.015 of the two measured
    assert s.before(2) is None  # the update of the alert's own step does not count
    assert s.before(3) == (1.0, 2)
    assert s.before(9) == (1.0, 2)
    hint = s.hint(9, "'fc' blew up")
    assert hint is not None and "update_ratio 1 " in hint and "at step 2" in hint
    assert "lower the learning rate" in hint and "'fc' blew up" in hint


def test_the_median_is_numpys_over_the_measured_layers() -> None:
    """Odd and even counts, unmeasured layers (0) and NaN ratios left out, float32 flags."""
    rng = np.random.default_rng(0)
    for step in range(1, 200):
        n = int(rng.integers(1, 40))
        r = rng.lognormal(-7, 2, n).astype(np.float32)
        r[rng.random(n) < 0.2] = 0.0
        r[rng.random(n) < 0.1] = np.nan
        s = StepUpdates(limit=0.0)
        s.see(step, r)
        got = r[r > 0]
        if got.size == 0:
            assert s.before(step + 1) is None
        else:
            u, at = s.before(step + 1)  # type: ignore[misc]
            # numpy takes the mean of the middle two in float32, this in float64
            assert at == step and u == pytest.approx(float(np.median(got)), rel=1e-6)


def test_healthy_updates_are_no_evidence_and_old_steps_are_forgotten() -> None:
    s = StepUpdates(limit=0.05)
    s.see(1, np.array([0.3]))
    for step in range(2, KEEP + 2):
        s.see(step, np.array([1e-3, 2e-3]))
    assert s.before(KEEP + 5) is None  # step 1 fell out of the bounded history
    assert s.hint(KEEP + 5, "x") is None
    s.see(KEEP + 6, np.array([math.inf, 0.01]))  # an overflowed norm: median inf
    assert s.before(KEEP + 7) is None  # not a measured ratio


def test_the_update_column_of_a_span_is_its_max() -> None:
    """On CUDA a span of steps the host had no free slot for arrives as one row set."""

    class Done:
        def __init__(self) -> None:
            self.ok = False

        def record(self) -> None:
            pass

        def query(self) -> bool:
            return self.ok

    evs: list[Done] = []

    def event() -> Done:
        evs.append(Done())
        return evs[-1]

    f = StepFlags(2, torch.device("cpu"), slots=1, event=event, cols=4)

    def flags(upd: float) -> torch.Tensor:
        t = torch.zeros(3, 4)
        t[0, 2] = 1.0  # a gradient RMS: every step is handed on
        t[0, 3] = upd
        return t

    f.push(flags(0.5), 1)  # in flight
    f.push(flags(3.0), 2)  # no free slot: accumulated
    f.push(flags(0.1), 3)
    evs[0].ok = True
    (first,) = f.poll()
    assert first.step == 1 and first.layers.shape == (2, 4) and first.layers[0, 3] == 0.5
    f.push(flags(0.2), 4)  # the span 2..4 in one copy
    evs[1].ok = True
    (span,) = f.poll()
    assert span.step == 4 and span.layers[0, 3] == 3.0
