"""Soak: 10,000 steps of a small model with every=10 (1,000 flushes, ~3,000 alerts).

Memory does not grow after warm-up, the alert list stays bounded, no hook piles up, no
thread is added per flush and no activation is kept alive."""

from __future__ import annotations

import gc
import os
import threading
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.optim import optimizer as optimizer_mod

import gradwatch
import gradwatch.watcher

STEPS = 10_000
WARMUP = 1_000
EVERY = 10
ALERT_CAP = 1_000  # the real cap is 10,000; a smaller one is reached within the soak


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def forward_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def optimizer_hooks(opt: torch.optim.Optimizer) -> int:
    """The optimizer's own step hooks and torch's global ones (gradwatch uses these)."""
    return (len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)
            + len(optimizer_mod._global_optimizer_pre_hooks)
            + len(optimizer_mod._global_optimizer_post_hooks))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="RSS read from /proc")
def test_soak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(1)
    monkeypatch.setattr(gradwatch.watcher, "MAX_ALERTS", ALERT_CAP)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    opt_hooks_before = optimizer_hooks(opt)
    delivered = [0]

    def on_alert(a: gradwatch.Alert) -> None:
        delivered[0] += 1

    # every Linear is "vanishing" in every window, and nothing is rate-limited: ~3 alerts
    # per flush, the worst case for the alert list
    w = gradwatch.watch(model, optimizer=opt, every=EVERY, logdir=tmp_path,
                        on_alert=on_alert,
                        thresholds={"vanishing_rms": 10.0, "patience": 1, "rate_limit": 1})
    hooks0 = forward_hooks(model)
    opt_hooks0 = optimizer_hooks(opt)
    x, y = torch.randn(8, 16), torch.randn(8, 1)
    hook_counts, thread_counts = set(), set()
    out_ref = None
    rss0 = 0
    for i in range(STEPS):
        opt.zero_grad()
        out = model(x)
        loss = ((out - y) ** 2).mean()
        loss.backward()
        opt.step()
        if i == WARMUP - 1:
            w.flush()
            gc.collect()
            rss0 = rss_bytes()
        if i % 500 == 0 and i >= WARMUP:
            hook_counts.add(forward_hooks(model))
            thread_counts.add(threading.active_count())
        if i == STEPS // 2:
            out_ref = weakref.ref(out)
    w.flush()
    gc.collect()
    growth = rss_bytes() - rss0
    assert out_ref is not None

    # no activation of an earlier step is alive, and none of the last step once dropped
    assert out_ref() is None
    refs: list[weakref.ref[torch.Tensor]] = []
    grab = [m.register_forward_hook(lambda m, a, o: refs.append(weakref.ref(o)))
            for m in model.modules()]
    opt.zero_grad()
    out = model(x)
    ((out - y) ** 2).mean().backward()
    opt.step()
    for h in grab:
        h.remove()
    del out
    gc.collect()
    assert len(refs) == 6 and all(r() is None for r in refs)

    print(f"\nsoak: RSS growth after warm-up {growth / 1e6:.2f} MB, alerts delivered "
          f"{delivered[0]}, kept {len(w.alerts)}, forward hooks {sorted(hook_counts)}, "
          f"threads {sorted(thread_counts)}")
    assert growth <= 5 * 2**20
    assert delivered[0] > ALERT_CAP and len(w.alerts) == ALERT_CAP
    assert w.alerts[-1].step == STEPS  # the newest are kept
    assert hook_counts == {hooks0} and hooks0 >= 5  # one per watched layer (+ the root's)
    assert optimizer_hooks(opt) == opt_hooks0 == opt_hooks_before + 2
    assert len(thread_counts) == 1  # one background thread, not one per flush
    w.close()
    assert forward_hooks(model) == 0
    assert optimizer_hooks(opt) == opt_hooks_before

    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("gradwatch/grad_norm/0")]
    # every window, and the one extra step taken for the weakref check, flushed by close()
    assert steps == list(range(EVERY, STEPS + 1, EVERY)) + [STEPS + 1]
