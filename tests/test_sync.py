"""No host reads between flushes: counted at the dispatcher and on patched Tensor methods."""

from __future__ import annotations

import torch
import torch.nn as nn

import gradwatch
from gradwatch import cpukernels, stats
from tests.support.syncs import count_host_reads
from tests.support.zoo import BasicBlock


def model() -> nn.Module:
    return nn.Sequential(BasicBlock(4), BasicBlock(4), nn.Flatten(), nn.Linear(4 * 8 * 8, 5),
                         nn.Sigmoid())


def run(m, opt, steps):
    for _ in range(steps):
        x = torch.randn(4, 4, 8, 8)
        loss = m(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def reads(watched: bool, found: bool = False, **kw) -> int:
    """``found``: no optimizer= (torch's global optimizer hooks find it)."""
    m = model()
    opt = torch.optim.Adam(m.parameters())
    if not found:
        kw["optimizer"] = opt
    w = gradwatch.watch(m, tensorboard=False, every=1000, **kw) if watched else None
    run(m, opt, 2)  # warm-up: first-step allocations and caches
    with count_host_reads() as c:
        run(m, opt, 6)
    if w is not None:
        w.close()
        # the watched run really collected (a hook that faulted would also read nothing)
        st = w.latest.stats
        assert st["0.relu"]["act_zero_frac"] > 0.1 and st["1.conv2"]["grad_norm"] > 0
        assert st["4"]["act_sat_frac"] >= 0 and st["3"]["out_grad_rms"] > 0
    return c.total


def test_no_host_reads_between_flushes(kernels):
    bare = reads(False)
    assert reads(True) == bare
    assert reads(True, sample_every=3) == bare
    assert reads(True, found=True) == bare


def test_counter_catches_an_item_in_a_hook(monkeypatch, kernels):
    # the activation statistics of the path in use: the C kernels' call, or the ops
    where = (cpukernels, "act_row") if kernels == "C kernels" else (stats, "activation_parts")
    real = getattr(*where)

    def leaky(x, *args):
        x.sum().item()  # the kind of bug the test exists for
        return real(x, *args)

    monkeypatch.setattr(*where, leaky)
    assert reads(True) > reads(False)


def test_flushes_do_read_and_only_there():
    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    w = gradwatch.watch(m, optimizer=opt, tensorboard=False, every=3)
    run(m, opt, 1)
    with count_host_reads() as c:
        run(m, opt, 1)  # step 2 of 3: no flush
    assert c.total == 0
    w.close()
