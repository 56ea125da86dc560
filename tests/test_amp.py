"""GradScaler and autocast: unscaled stats, skipped steps counted and never alerted."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn as nn
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import gradwatch

STEPS = 6
BAD = 3  # the step whose input holds an inf


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(32, 8, generator=g) for _ in range(STEPS)]
    xs[BAD] = xs[BAD].clone()
    xs[BAD][0, 0] = math.inf
    return xs


def _reference() -> dict[str, dict[str, float]]:
    """The same training without a scaler, the bad batch left out (the scaler skips it)."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = gradwatch.watch(model, optimizer=opt, tensorboard=False, every=1000)
    for i, x in enumerate(_batches()):
        if i == BAD:
            continue
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    snap = w.flush()
    w.close()
    assert snap is not None
    return snap.stats


def _scaled_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                  w: gradwatch.Watcher) -> None:
    """The batches through a GradScaler, the watcher stepped by hand after each update."""
    for x in _batches():
        scaler.scale(model(x).pow(2).mean()).backward()
        scaler.step(opt)
        scaler.update()
        w.step()
        opt.zero_grad()


def _assert_close(got: dict, ref: dict, rel: float = 1e-5) -> None:
    assert got.keys() == ref.keys()
    for layer, stats in ref.items():
        assert got[layer].keys() == stats.keys()
        for s, v in stats.items():
            assert got[layer][s] == pytest.approx(v, rel=rel, abs=1e-9), (layer, s)


@pytest.mark.parametrize("unscale_first", [False, True])
def test_scaler_skip_counted_not_alerted_and_stats_unscaled(tmp_path, unscale_first):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    w = gradwatch.watch(model, optimizer=opt, scaler=scaler, logdir=tmp_path, every=1000,
                        on_alert="raise")
    for x in _batches():
        scaler.scale(model(x).pow(2).mean()).backward()
        if unscale_first:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    # the scale moved (grew, backed off at the skip): stats must not depend on it
    assert scaler.get_scale() != 2.0**12
    snap = w.flush()
    w.close()
    assert snap is not None and snap.step == STEPS and snap.amp_skipped == 1
    assert all(s["nonfinite"] == 0 for s in snap.stats.values())
    assert w.alerts == []
    _assert_close(snap.stats, _reference())
    ea = EventAccumulator(str(tmp_path))
    ea.Reload()
    assert [e.value for e in ea.Scalars("gradwatch/amp_skipped")] == [1.0]
    # the scaler is given back untouched
    assert "step" not in scaler.__dict__


def test_scaler_with_manual_step(tmp_path):
    """No optimizer given, watcher.step() after scaler.update(): a skipped step dropped,
    each step counted once, and the optimizer the scaler steps found (update ratios)."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    w = gradwatch.watch(model, scaler=scaler, tensorboard=False, every=1000, on_alert="raise")
    _scaled_steps(model, opt, scaler, w)
    snap = w.flush()
    w.close()
    assert snap is not None and snap.amp_skipped == 1
    _assert_close(snap.stats, _reference())


def test_skip_without_scaler_argument_is_alerted():
    """Control: the same inf step without scaler= is reported, so the test above can fail."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    w = gradwatch.watch(model, tensorboard=False, every=1000, on_alert="log")
    _scaled_steps(model, opt, scaler, w)
    w.close()
    assert any(a.kind == "nonfinite" for a in w.alerts)


def test_watched_scaler_pickles_and_copies_unwatched():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    w = gradwatch.watch(model, optimizer=opt, scaler=scaler, tensorboard=False)
    for other in (pickle.loads(pickle.dumps(scaler)), copy.deepcopy(scaler)):
        x = torch.randn(4, 8)
        m2 = _model()
        o2 = torch.optim.SGD(m2.parameters(), lr=0.1)
        other.scale(m2(x).sum()).backward()
        other.step(o2)
        other.update()
    assert w._step == 0  # the copies never stepped this watcher
    w.close()
    # a copy can be watched itself
    m3 = _model()
    o3 = torch.optim.SGD(m3.parameters(), lr=0.1)
    w3 = gradwatch.watch(m3, optimizer=o3, scaler=other, tensorboard=False)
    other.scale(m3(torch.randn(4, 8)).sum()).backward()
    other.step(o3)
    other.update()
    assert w3._step == 1
    w3.close()


def test_bf16_autocast_accumulates_in_fp32():
    torch.manual_seed(0)
    lin = nn.Linear(512, 512)
    captured: list[torch.Tensor] = []
    lin.register_forward_hook(lambda m, a, out: captured.append(out.detach()))
    w = gradwatch.watch(lin, tensorboard=False, every=1000)
    x = torch.randn(512, 512) + 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16
    y.float().pow(2).mean().backward()
    w.step()
    snap = w.flush()
    w.close()
    assert snap is not None
    out = captured[0].double().reshape(-1)
    st = snap.stats["(root)"]
    assert st["act_mean"] == pytest.approx(out.mean().item(), rel=1e-5)
    assert st["act_std"] == pytest.approx(out.std().item(), rel=1e-4)
    assert st["act_max"] == pytest.approx(out.abs().max().item(), rel=1e-6)
    # a bf16 accumulation is far off the same reference: the check above can fail
    naive = captured[0].reshape(-1).pow(2).sum(dtype=torch.bfloat16).double()
    assert abs(naive.item() - out.pow(2).sum().item()) / out.pow(2).sum().item() > 3e-4
    assert math.isfinite(st["out_grad_rms"]) and st["out_grad_rms"] > 0


def _amp_reads(watched: bool, bad_step: bool) -> int:
    from tests.support.syncs import count_host_reads

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    w = (gradwatch.watch(model, optimizer=opt, scaler=scaler, tensorboard=False, every=1000,
                         on_alert="raise") if watched else None)
    xs = _batches()
    scaler.scale(model(xs[0]).pow(2).mean()).backward()  # warm-up step (lazy scaler state)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    x = xs[BAD] if bad_step else xs[1]
    with count_host_reads() as c:
        scaler.scale(model(x).pow(2).mean()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    if w is not None:
        assert w._amp_skipped == int(bad_step)
        w.close()
    return c.total


@pytest.mark.parametrize("bad_step", [False, True])
def test_scaler_adds_no_host_read(bad_step):
    """scaler.step reads its inf flag once; gradwatch reads nothing more, skipped or not."""
    bare = _amp_reads(False, bad_step)
    assert bare >= 1
    assert _amp_reads(True, bad_step) == bare


def test_one_scaler_two_watchers():
    """Two models, two optimizers, one scaler: each watcher sees its own skips, unscaled."""
    ma, mb = _model(), _model()
    oa = torch.optim.SGD(ma.parameters(), lr=0.1)
    ob = torch.optim.SGD(mb.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    wa = gradwatch.watch(ma, optimizer=oa, scaler=scaler, tensorboard=False, every=1000,
                         on_alert="raise")
    wb = gradwatch.watch(mb, optimizer=ob, scaler=scaler, tensorboard=False, every=1000,
                         on_alert="raise")
    xs = _batches()
    clean = [x for i, x in enumerate(xs) if i != BAD]
    for i, x in enumerate(xs):
        loss = ma(x).pow(2).mean() + mb(clean[i % len(clean)]).pow(2).mean()
        scaler.scale(loss).backward()
        scaler.step(oa)
        scaler.step(ob)
        scaler.update()
        oa.zero_grad()
        ob.zero_grad()
    sa, sb = wa.flush(), wb.flush()
    wa.close()
    wb.close()
    assert sa is not None and sb is not None
    assert (sa.amp_skipped, sb.amp_skipped) == (1, 0)
    _assert_close(sa.stats, _reference())
    # b trained on every step: its reference is a plain run on the same batches
    m = _model()
    o = torch.optim.SGD(m.parameters(), lr=0.1)
    w = gradwatch.watch(m, optimizer=o, tensorboard=False, every=1000)
    for i in range(len(xs)):
        m(clean[i % len(clean)]).pow(2).mean().backward()
        o.step()
        o.zero_grad()
    ref = w.flush()
    w.close()
    assert ref is not None
    _assert_close(sb.stats, ref.stats)
    assert "step" not in scaler.__dict__


def test_manual_watcher_two_optimizers_unscales_once():
    def run(with_scaler: bool) -> dict[str, dict[str, float]]:
        m = _model()
        o1 = torch.optim.SGD(m[0].parameters(), lr=0.1)
        o2 = torch.optim.SGD(m[2].parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=with_scaler)
        w = gradwatch.watch(m, scaler=scaler, tensorboard=False, every=1000, on_alert="raise")
        xs = _batches()
        xs[BAD] = xs[BAD - 1]  # finite input; the loss overflows instead: both optimizers skip
        for i, x in enumerate(xs):
            if i == BAD and not with_scaler:
                continue
            loss = m(x).pow(2).mean() * (math.inf if i == BAD else 1.0)
            scaler.scale(loss).backward()
            scaler.step(o1)
            scaler.step(o2)
            scaler.update()
            w.step()
            o1.zero_grad()
            o2.zero_grad()
        snap = w.flush()
        w.close()
        assert snap is not None
        assert snap.amp_skipped == int(with_scaler)
        return snap.stats

    _assert_close(run(True), run(False))


def test_foreign_step_wrapper_is_left_alone_with_a_warning():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    theirs = scaler.step
    scaler.step = theirs  # some other tool already replaced it on the instance
    with pytest.warns(gradwatch.GradwatchWarning, match="already replaced"):
        w = gradwatch.watch(model, optimizer=opt, scaler=scaler, tensorboard=False)
    assert scaler.__dict__["step"] is theirs
    w.close()
    assert scaler.__dict__["step"] is theirs
