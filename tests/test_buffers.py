"""WindowBuffers: queued per-call vectors fold into the same stage as direct adds."""

from __future__ import annotations

import math

import torch

from gradwatch import stats as S
from gradwatch.buffers import MAX_PENDING, ST_GN, ST_GS2, WindowBuffers


def test_push_and_fold_equal_direct_adds():
    g = torch.Generator().manual_seed(0)
    direct = WindowBuffers(3, torch.device("cpu"))
    queued = WindowBuffers(3, torch.device("cpu"))
    for slot in (0, 2, 0, 1, 2, 2):
        x = torch.randn(int(torch.randint(1, 50_000, (1,), generator=g)), generator=g)
        v = S.activation_sums(x, (-1.0, 1.0) if slot == 1 else None, 0.01)
        direct.add_activation(slot, v, x.numel())
        queued.push_activation(slot, v, x.numel())
        sq = S.grad_sq_sum(x)
        direct.add_out_grad(slot, sq, x.numel())
        queued.push_out_grad(slot, sq, x.numel())
    queued.fold()
    assert torch.allclose(direct.stage, queued.stage, rtol=1e-6)
    assert queued.stage[:, ST_GN].tolist() == direct.stage[:, ST_GN].tolist()


def test_queue_is_bounded_without_steps():
    buf = WindowBuffers(1, torch.device("cpu"))
    x = torch.ones(10)
    for _ in range(3 * MAX_PENDING + 5):  # e.g. an eval loop that never steps
        buf.push_activation(0, S.activation_sums(x, None, 0.01), 10)
        buf.push_out_grad(0, S.nonfinite_sum(x), 0)
    assert len(buf._acts) < MAX_PENDING and len(buf._grads) < MAX_PENDING
    buf.fold()
    assert buf.stage[0, 0].item() == 10.0 * (3 * MAX_PENDING + 5)
    assert buf.stage[0, ST_GN].item() == 0.0  # check sums count no elements
    assert buf.stage[0, ST_GS2].item() == 10.0 * (3 * MAX_PENDING + 5)


def test_commit_gives_float64_reference_stats():
    from gradwatch.buffers import FINAL_KEYS

    buf = WindowBuffers(1, torch.device("cpu"))
    x = torch.relu(torch.randn(2000, dtype=torch.float64)).float()
    gr = torch.randn(2000)
    buf.push_activation(0, S.activation_sums(x, None, 0.01), x.numel())
    buf.push_out_grad(0, S.grad_sq_sum(gr), gr.numel())
    buf.commit_step(None, None, None)
    row = dict(zip(FINAL_KEYS, buf.finalize()[0].tolist()))
    d = x.double()
    assert math.isclose(row["act_mean"], float(d.mean()), rel_tol=1e-4)
    assert math.isclose(row["act_std"], float(d.std()), rel_tol=1e-4)
    assert math.isclose(row["act_max"], float(d.abs().max()), rel_tol=1e-6)
    assert math.isclose(row["act_zero_frac"], float((d == 0).double().mean()), rel_tol=1e-6)
    assert math.isclose(row["out_grad_rms"], float(gr.double().pow(2).mean().sqrt()),
                        rel_tol=1e-4)
    assert row["nonfinite"] == 0.0


def test_saturated_placeholder_is_masked_for_unbounded_layers():
    buf = WindowBuffers(2, torch.device("cpu"))
    buf.set_bounded([False, True])
    x = torch.tensor([1.0, -1.0, math.inf, 0.0])  # the placeholder is the non-finite count
    for slot in (0, 1):
        v = S.activation_sums(x, (-1.0, 1.0) if slot else None, 0.0, sat_placeholder=True)
        buf.push_activation(slot, v, x.numel())
    buf.fold()
    from gradwatch.buffers import ST_SAT

    assert buf.stage[:, ST_SAT].tolist() == [0.0, 3.0]
