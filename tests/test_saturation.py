"""Saturation needs whole units stuck at a bound, not only many saturated outputs: a
well-trained tanh net saturates half its outputs and is still healthy."""

from __future__ import annotations

import pytest
import torch

from gradwatch import stats
from tests.support import zoo


def test_stuck_units_matches_a_float64_count():
    torch.manual_seed(0)
    x = torch.randn(32, 5, 7).tanh()
    x[:, 0, 0] = 0.999   # stuck high for every sample
    x[:, 1, 2] = -0.995  # stuck low
    x[:16, 2, 3] = 0.999  # saturated on half the batch only: not stuck
    xd = x.double().reshape(32, -1)
    m = 0.01 * 2
    want = ((xd <= -1 + m).all(0) | (xd >= 1 - m).all(0)).sum().item()
    assert stats.stuck_units(x, (-1.0, 1.0), 0.01).item() == want == 2
    assert stats.units_of(x) == 35
    # one sample: every saturated output is a stuck unit
    assert stats.stuck_units(x[0, 0], (-1.0, 1.0), 0.01).item() == 1
    assert stats.units_of(x[0, 0]) == 7


@pytest.mark.slow
def test_long_trained_tanh_net_is_not_saturated():
    """1,000 steps of the healthy tanh/Xavier zoo net: its outputs at the bounds pass 40%
    (the element threshold), but no unit is stuck, so no alert."""
    setup = next(s for s in zoo.ZOO if s.name == "tanh_mlp_xavier_dropout")
    res = zoo.run(setup, seed=0, every=50, steps=1000, keep_snapshots=True)
    peak = max(v.get("act_sat_frac", 0.0) for s in res.snapshots for v in s.stats.values())
    assert peak >= 0.4  # the element rule alone would have fired
    assert [a for a in res.alerts if a.kind == "saturated"] == []
