"""Gradient accumulation, clipping and closures: what the optimizer sees, once per step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import gradwatch

MICRO = 3
STEPS = 2
MAX_NORM = 0.05  # well below the gradient norm: clipping is active


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 2))


def _x(step: int, micro: int) -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(10 * step + micro))


def _mean(v: list[float]) -> float:
    return sum(v) / len(v)


def test_accumulated_clipped_grads_once_per_step_and_pooled_micro_batches():
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w = gradwatch.watch(m, optimizer=opt, tensorboard=False, every=1000)
    ref: dict[str, dict[str, list[float]]] = {"0": {}, "1": {}, "2": {}}

    def add(n: str, k: str, v: float) -> None:
        ref[n].setdefault(k, []).append(v)

    for step in range(STEPS):
        outs: dict[str, list[torch.Tensor]] = {n: [] for n in ref}

        def keep(_m: nn.Module, _a: object, o: torch.Tensor, n: str, d: dict = outs) -> None:
            o.retain_grad()
            d[n].append(o)

        hooks = [m[int(n)].register_forward_hook(
            lambda _m, _a, o, n=n: keep(_m, _a, o, n)) for n in ref]
        for micro in range(MICRO):
            (m(_x(step, micro)).pow(2).mean() / MICRO).backward()
        for h in hooks:
            h.remove()
        pre = torch.nn.utils.clip_grad_norm_(m.parameters(), MAX_NORM)
        assert pre.item() > 2 * MAX_NORM
        for n in ("0", "2"):
            g = torch.cat([p.grad.reshape(-1) for p in m[int(n)].parameters()]).double()
            add(n, "grad_norm", g.norm().item())
            add(n, "grad_max", g.abs().max().item())
        for n, os_ in outs.items():
            x = torch.cat([o.detach().reshape(-1) for o in os_]).double()
            g = torch.cat([o.grad.reshape(-1) for o in os_]).double()
            add(n, "act_mean", x.mean().item())
            add(n, "act_std", x.std().item())
            add(n, "act_max", x.abs().max().item())
            add(n, "out_grad_rms", g.pow(2).mean().sqrt().item())
        opt.step()
        opt.zero_grad()
    snap = w.flush()
    w.close()
    assert snap is not None and snap.step == STEPS
    for n, stats in ref.items():
        for k, vals in stats.items():
            want = max(vals) if k.endswith("_max") else _mean(vals)
            assert snap.stats[n][k] == pytest.approx(want, rel=1e-5), (n, k)
    # post-clip: the layers together have the clipped norm
    total = math.sqrt(snap.stats["0"]["grad_norm"] ** 2 + snap.stats["2"]["grad_norm"] ** 2)
    assert total == pytest.approx(MAX_NORM, rel=0.05)


def test_closure_step_reads_the_gradients_of_the_closure():
    """optimizer.step(closure) (Lightning, LBFGS): backward runs inside step()."""

    def train(use_closure: bool) -> dict[str, dict[str, float]]:
        m = _model()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        w = gradwatch.watch(m, optimizer=opt, tensorboard=False, every=1000)
        for step in range(STEPS):
            def closure(step: int = step) -> torch.Tensor:
                opt.zero_grad()
                loss = m(_x(step, 0)).pow(2).mean()
                loss.backward()
                return loss

            if use_closure:
                opt.step(closure)
            else:
                closure()
                opt.step()
        snap = w.flush()
        w.close()
        assert snap is not None
        return snap.stats

    got, ref = train(True), train(False)
    for n, stats in ref.items():
        for k, v in stats.items():
            assert got[n][k] == pytest.approx(v, rel=1e-6, nan_ok=True), (n, k)
