"""Reads are never stale: right after step N with every=k, ``latest`` is the window ending
at the last multiple of k, with the values of a float64 recomputation of that window.

Before the reads waited for the background flush, 10 to 100 of 100 runs read the window
before (``benchmarks/stale_reads.py`` counts them). DDP: tests/test_distributed.py."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn as nn

import gradwatch
from tests.support.reference import Float64Reference, close, small_mlp

RUNS = 100
EVERY = 5
LAST = 20  # every run ends at step 20, 21 or 22: the last window ends at step 20


class _LastWindow:
    """A float64 recorder started at the first step of the last window (cheaper than
    recording every step); ``before_step``/``after_step`` do nothing before it."""

    def __init__(self, m: nn.Module) -> None:
        self.m = m
        self.step = 0
        self.ref: Float64Reference | None = None

    def start_step(self) -> None:
        if self.step == LAST - EVERY:
            self.ref = Float64Reference({n: mod for n, mod in self.m.named_modules() if n},
                                        {"1": (-1.0, 1.0)})

    def before_step(self) -> None:
        if self.ref is not None and self.step < LAST:
            self.ref.before_step()

    def after_step(self) -> None:
        if self.ref is not None and self.step < LAST:
            self.ref.after_step()
        self.step += 1

    def window(self) -> dict[str, dict[str, float]]:
        assert self.ref is not None
        return self.ref.window(list(range(EVERY)))


def plain(steps: int) -> tuple[gradwatch.Watcher, _LastWindow]:
    m = small_mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    ref = _LastWindow(m)
    w = gradwatch.watch(m, optimizer=opt, tensorboard=False, every=EVERY)
    for _ in range(steps):
        ref.start_step()
        loss = m(torch.randn(8, 6)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        ref.before_step()
        opt.step()
        ref.after_step()
    return w, ref


def accumulation(steps: int) -> tuple[gradwatch.Watcher, _LastWindow]:
    m = small_mlp()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    ref = _LastWindow(m)
    w = gradwatch.watch(m, tensorboard=False, every=EVERY)  # the optimizer is found
    for _ in range(steps):
        ref.start_step()
        for _ in range(3):
            (m(torch.randn(8, 6)).pow(2).mean() / 3).backward()
        ref.before_step()
        opt.step()
        ref.after_step()
        opt.zero_grad()
    return w, ref


def manual(steps: int) -> tuple[gradwatch.Watcher, _LastWindow]:
    m = small_mlp()
    ref = _LastWindow(m)
    w = gradwatch.watch(m, tensorboard=False, every=EVERY)
    for _ in range(steps):
        ref.start_step()
        m(torch.randn(8, 6)).pow(2).mean().backward()
        ref.before_step()
        with torch.no_grad():  # no torch optimizer: an SGD update by hand
            for p in m.parameters():
                p -= 0.05 * p.grad
        ref.after_step()
        w.step()
        for p in m.parameters():
            p.grad = None
    return w, ref


@pytest.mark.parametrize("loop", [plain, accumulation, manual])
def test_latest_right_after_the_loop_is_the_last_window(loop: Callable[..., tuple]):
    stale = []
    for r in range(RUNS):
        w, ref = loop(LAST + r % 3)
        snap = w.latest  # right after the loop: no flush(), no close()
        if snap is None or snap.step != LAST:
            stale.append(None if snap is None else snap.step)
            w.close()
            continue
        want = ref.window()
        for layer, stats in want.items():
            got = snap.stats[layer]
            assert set(got) - {"nonfinite"} <= set(stats), layer
            for s, v in got.items():
                if s != "nonfinite":
                    assert close(v, stats[s]), (r, layer, s, v, stats[s])
        assert ("update_ratio" in snap.stats["0"]) == (loop is not manual)
        w.close()
    assert stale == [], f"{len(stale)} stale reads in {RUNS} runs: {stale}"


def test_report_and_alerts_right_after_the_loop():
    """The alerts of the last flush are in ``alerts`` and marked in ``report()`` at once,
    before the next step issues them as warnings."""
    for r in range(20):
        m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        nn.init.constant_(m[0].bias, -100.0)  # every ReLU unit dead
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        w = gradwatch.watch(m, optimizer=opt, tensorboard=False, every=5, on_alert="ignore")
        for _ in range(10):  # the dead rule needs two windows: it fires at step 10
            loss = m(torch.randn(4, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        dead = [a for a in w.alerts if a.kind == "dead"]
        assert [(a.layer, a.step) for a in dead] == [("1", 10)], r
        text = w.report()
        assert "gradwatch report, step 10" in text
        row = next(ln for ln in text.splitlines() if ln.startswith("1 "))
        assert "1!" in row.split(), r
        w.close()
        assert [a.step for a in w.alerts if a.kind == "dead"] == [10]  # not twice
