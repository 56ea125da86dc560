"""Lazy modules watched before their first forward: parameters tracked once materialized."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import gradwatch
from tests.support.reference import Float64Reference, close

STEPS = 4


def lazy_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.LazyConv2d(4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(8),
                         nn.Tanh(), nn.LazyLinear(2))


def _x(step: int) -> torch.Tensor:
    return torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(step))


@pytest.mark.parametrize("optimizer", ["given", "found"])
def test_lazy_model_watched_before_its_first_forward(optimizer):
    m = lazy_model()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)  # the same parameter objects once shaped
    w = gradwatch.watch(m, optimizer=opt if optimizer == "given" else None,
                        tensorboard=False, every=1000, sample_every=1)
    names = {n: mod for n, mod in m.named_modules() if n and n != "2"}
    ref = Float64Reference(names, {"4": (-1.0, 1.0)})
    for step in range(STEPS):
        ref.train_step(m, opt, _x(step))
    w.close()
    snap = w.latest
    assert snap is not None and snap.step == STEPS
    want = ref.window(list(range(STEPS)))  # from the very first step on
    for layer, stats in want.items():
        for s, v in stats.items():
            assert close(snap.stats[layer][s], v), (layer, s, snap.stats[layer][s], v)
    assert set(snap.stats["0"]) >= {"grad_norm", "weight_norm", "update_ratio"}
    assert w._types() == {"0": "Conv2d", "1": "ReLU", "3": "Linear", "4": "Tanh", "5": "Linear"}
    assert "Conv2d" in w.report() and "Lazy" not in w.report()


def test_lazy_model_with_an_optimizer_made_after_the_dry_run():
    """The documented way for lazy modules: a dry run, then the optimizer."""
    m = lazy_model()
    w = gradwatch.watch(m, tensorboard=False, every=2)
    with torch.no_grad():
        m(_x(99))  # the dry run materializes the parameters
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    for step in range(STEPS):
        loss = m(_x(step)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    w.close()
    assert w.latest is not None and w.latest.step == STEPS
    for layer in ("0", "3", "5"):
        assert 0 < w.latest.stats[layer]["grad_norm"] < 10
        assert 0 < w.latest.stats[layer]["update_ratio"] < 1


def test_lazy_types_in_the_layer_order_record(tmp_path):
    """The record the dashboard and ``gradwatch report`` read names the materialized types."""
    from gradwatch.reader import read_logdir

    m = lazy_model()
    w = gradwatch.watch(m, logdir=str(tmp_path), every=2)
    opt = None
    for step in range(STEPS):
        loss = m(_x(step)).pow(2).mean()
        if opt is None:
            opt = torch.optim.SGD(m.parameters(), lr=0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
    gradwatch.unwatch(m)
    (run,) = read_logdir(str(tmp_path))
    assert run.types == {"0": "Conv2d", "1": "ReLU", "3": "Linear", "4": "Tanh", "5": "Linear"}
    assert w.latest is not None and w.latest.step == STEPS
