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


def test_final_values_divide_mask_and_keep_per_column():
    """``snapshot.final_values``, element by element: a mean is its sum over its count in
    fp32 (NaN for a zero count), a max-reduced stat is kept as it is where its count is
    positive (NaN otherwise), a value without a count is kept; NaN and Inf sums included,
    no warning raised."""
    import warnings

    import numpy as np

    from gradwatch.buffers import FINAL_COLUMNS, W

    rng = np.random.default_rng(7)
    width = max(W.values()) + 1
    for trial in range(200):
        window = (rng.standard_normal((5, width)) * 10.0 ** rng.integers(-30, 30)).astype(
            np.float32)
        pick = rng.random(window.shape)
        window[pick < 0.05] = np.nan
        window[(pick >= 0.05) & (pick < 0.1)] = np.inf
        window[(pick >= 0.1) & (pick < 0.15)] = -np.inf
        for _, c in FINAL_COLUMNS.values():  # counts: whole, some of them zero
            if c is not None:
                window[:, W[c]] = rng.integers(0, 3, 5) * rng.integers(1, 1000, 5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = final_values(window)
        assert got.dtype == np.float32 and got.shape == (5, len(FINAL_KEYS))
        for j, (key, (v, c)) in enumerate(FINAL_COLUMNS.items()):
            assert FINAL_KEYS[j] == key
            for i in range(5):
                val = window[i, W[v]]
                if c is None:
                    want = val
                elif window[i, W[c]] <= 0:
                    want = np.float32(np.nan)
                elif key in ("grad_max", "act_max"):
                    want = val
                else:
                    want = np.float32(val / window[i, W[c]])
                same = got[i, j] == want or (np.isnan(got[i, j]) and np.isnan(want))
                assert same, (trial, key, i, got[i, j], want)
