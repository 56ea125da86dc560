"""WindowBuffers: staged per-call vectors -> per-step stats -> window values."""

from __future__ import annotations

import math

import torch

from gradwatch import stats as S
from gradwatch.buffers import FINAL_KEYS, ST_NF, WindowBuffers
from gradwatch.snapshot import final_values


def test_commit_gives_float64_reference_stats():
    buf = WindowBuffers(1, torch.device("cpu"))
    x = torch.relu(torch.randn(2000, dtype=torch.float64)).float()
    gr = torch.randn(2000)
    buf.add_activation(0, S.activation_sums(x, None, 0.01), x.numel())
    buf.add_out_grad(0, S.grad_sq_sum(gr), gr.numel())
    buf.commit_step(None, None, None)
    row = dict(zip(FINAL_KEYS, final_values(buf.window.numpy())[0].tolist()))
    d = x.double()
    assert math.isclose(row["act_mean"], float(d.mean()), rel_tol=1e-4)
    assert math.isclose(row["act_std"], float(d.std()), rel_tol=1e-4)
    assert math.isclose(row["act_max"], float(d.abs().max()), rel_tol=1e-6)
    assert math.isclose(row["act_zero_frac"], float((d == 0).double().mean()), rel_tol=1e-6)
    assert math.isclose(row["out_grad_rms"], float(gr.double().pow(2).mean().sqrt()),
                        rel_tol=1e-4)
    assert row["nonfinite"] == 0.0


def test_nan_off_the_sample_still_counts_as_nonfinite():
    """A large output's non-finite count comes from a sample, its sum from every element:
    one NaN the sample misses still makes the step non-finite for that layer."""
    buf = WindowBuffers(1, torch.device("cpu"))
    x = torch.zeros(S.SAMPLE_ABOVE * 4)
    x[1] = math.nan  # the strided sample starts at offset 0 with an odd stride > 1
    vec = S.activation_sums(x, None, 0.01)
    assert vec[S.A_NF].item() == 0.0 and math.isnan(vec[S.A_S1].item())
    buf.add_activation(0, vec, x.numel())
    flags = buf.step_flags(None)
    assert flags[0, 0].item() == 1.0 and buf.stage[0, ST_NF].item() == 1.0
