"""What ends a step: the optimizer given or found, several optimizers, watcher.step()."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn

import gradwatch
from gradwatch import stepping
from tests.support.reference import Float64Reference, close, small_mlp

STEPS = 6


def _x(step: int, micro: int = 0) -> torch.Tensor:
    return torch.randn(8, 6, generator=torch.Generator().manual_seed(100 * step + micro))


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return small_mlp()


def _stats(w: gradwatch.Watcher) -> dict[str, dict[str, float]]:
    w.close()
    assert w.latest is not None and w.latest.step == STEPS
    return w.latest.stats


def _same(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> None:
    assert a.keys() == b.keys()
    for layer in a:
        assert a[layer].keys() == b[layer].keys(), layer
        for s, v in a[layer].items():
            assert v == pytest.approx(b[layer][s], rel=1e-6, nan_ok=True), (layer, s)


def _loop(kind: str, given: bool, every: int = 1000) -> dict[str, dict[str, float]]:
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    w = gradwatch.watch(m, optimizer=opt if given else None, tensorboard=False, every=every)
    for step in range(STEPS):
        if kind == "plain":
            loss = m(_x(step)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        elif kind == "accumulate_clip":
            for micro in range(3):
                (m(_x(step, micro)).pow(2).mean() / 3).backward()
            nn.utils.clip_grad_norm_(m.parameters(), 0.05)
            opt.step()
            opt.zero_grad()
        else:  # closure: the backward runs inside step()
            def closure(step: int = step) -> torch.Tensor:
                opt.zero_grad()
                loss = m(_x(step)).pow(2).mean()
                loss.backward()
                return loss

            opt.step(closure)
    return _stats(w)


@pytest.mark.parametrize("kind", ["plain", "accumulate_clip", "closure"])
def test_found_optimizer_is_used_as_if_given(kind):
    found, given = _loop(kind, given=False), _loop(kind, given=True)
    assert "update_ratio" in found["0"] and found["0"]["update_ratio"] > 0
    _same(found, given)


def test_found_optimizer_matches_float64():
    m = _model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    ref = Float64Reference({n: mod for n, mod in m.named_modules() if n}, {"1": (-1.0, 1.0)})
    w = gradwatch.watch(m, tensorboard=False, every=1000, sample_every=1)
    for step in range(STEPS):
        ref.train_step(m, opt, _x(step))
    got = _stats(w)
    want = ref.window(list(range(STEPS)))
    for layer, stats in want.items():
        for s, v in stats.items():
            assert close(got[layer][s], v), (layer, s, got[layer][s], v)


def _scaled(given: bool) -> tuple[dict[str, dict[str, float]], int, int]:
    """A GradScaler whose first steps overflow (the usual start of fp16 training)."""
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=0.25)
    w = gradwatch.watch(m, optimizer=opt if given else None, scaler=scaler,
                        tensorboard=False, every=1000)
    skipped = 0
    for step in range(STEPS):
        loss = m(_x(step)).pow(2).mean() * 100
        opt.zero_grad()
        scaler.scale(loss).backward()
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped += scaler.get_scale() < before
    w.close()
    assert w.latest is not None
    return w.latest.stats, w.latest.amp_skipped, skipped


def test_gradscaler_skipping_the_first_steps_finds_the_optimizer():
    stats, amp_skipped, skipped = _scaled(given=False)
    assert skipped >= 2 and amp_skipped == skipped  # the first steps, opt.step() never ran
    ref, ref_skipped, _ = _scaled(given=True)
    assert ref_skipped == skipped
    _same(stats, ref)


def _two_parts() -> tuple[nn.Sequential, torch.optim.Optimizer, torch.optim.Optimizer,
                          Float64Reference]:
    m = _model()
    oa = torch.optim.SGD(m[0].parameters(), lr=0.1, momentum=0.5)
    ob = torch.optim.Adam([*m[2].parameters(), *m[4].parameters()], lr=1e-2)
    ref = Float64Reference({n: mod for n, mod in m.named_modules() if n}, {"1": (-1.0, 1.0)})
    return m, oa, ob, ref


def _forward(m: nn.Module, oa: torch.optim.Optimizer, ob: torch.optim.Optimizer,
             step: int) -> None:
    loss = m(_x(step)).pow(2).mean()
    oa.zero_grad()
    ob.zero_grad()
    loss.backward()


def test_companion_stepping_before_the_driver_counts_in_the_same_step():
    m, oa, ob, ref = _two_parts()
    w = gradwatch.watch(m, optimizer=oa, tensorboard=False, every=1000, sample_every=1)
    for step in range(STEPS):
        _forward(m, oa, ob, step)
        ref.before_step()
        ob.step()  # a companion, before the driver
        oa.step()  # the driver: the step ends here
        ref.after_step()
    got = _stats(w)
    want = ref.window(list(range(STEPS)))
    for layer, stats in want.items():
        for s, v in stats.items():
            assert close(got[layer][s], v), (layer, s, got[layer][s], v)


def test_companion_stepping_after_the_found_driver_counts_in_the_next_step():
    m, oa, ob, ref = _two_parts()
    w = gradwatch.watch(m, tensorboard=False, every=1000, sample_every=1)
    for step in range(STEPS):
        _forward(m, oa, ob, step)
        ref.before_step()
        oa.step()  # found first: the driver; the step ends here
        ob.step()  # a companion: what it reads counts in the next step
        ref.after_step()
    got = _stats(w)
    every = ref.window(list(range(STEPS)))
    lagged = ref.window(list(range(STEPS - 1)))  # the last companion step has no next step
    param_stats = ("grad_norm", "grad_rms", "grad_max", "update_ratio")
    for layer, stats in every.items():
        for s, v in stats.items():
            want = lagged[layer][s] if layer in ("2", "4") and s in param_stats else v
            if layer in ("2", "4") and s == "weight_norm":
                # read at the end of each step: before the companion's update of it
                ws = [ref.steps[0][layer]["w0"]] + [ref.steps[k][layer]["w1"]
                                                   for k in range(STEPS - 1)]
                want = sum(torch.cat([t.reshape(-1) for t in w_]).norm().item()
                           for w_ in ws) / STEPS
            assert close(got[layer][s], want), (layer, s, got[layer][s], want)


def test_several_optimizers_under_one_gradscaler_read_unscaled_gradients():
    """GradScaler unscales one optimizer at a time: each optimizer's parameters are read
    at its own step, never another's scaled gradients."""

    def run(scaled: bool) -> dict[str, dict[str, float]]:
        m, oa, ob, _ = _two_parts()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=scaled)
        w = gradwatch.watch(m, scaler=scaler, tensorboard=False, every=1000)
        for step in range(STEPS):
            loss = m(_x(step)).pow(2).mean()
            oa.zero_grad()
            ob.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(ob)
            scaler.step(oa)
            scaler.update()
        return _stats(w)

    scaled, plain = run(True), run(False)
    assert scaled["2"]["grad_norm"] < 10  # unscaled: about 0.1, not 4096 times that
    _same(scaled, plain)


@pytest.mark.parametrize("order", ["opt_then_watcher", "zero_grad_between", "watcher_first"])
def test_opt_step_and_watcher_step_count_each_step_once(order):
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    w = gradwatch.watch(m, tensorboard=False, every=3)
    for step in range(STEPS):
        loss = m(_x(step)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if order == "watcher_first":
            w.step()
            opt.step()
        else:
            opt.step()
            if order == "zero_grad_between":
                opt.zero_grad()
            w.step()
    got = _stats(w)
    ref = _loop("plain", given=True, every=3)
    if order == "watcher_first":  # stepped by hand from the first call, read at step()
        for layer in ("0", "2", "4"):
            assert close(got[layer]["grad_norm"], ref[layer]["grad_norm"])
        # an update made after step() counts in the next step: one update fewer
        assert 0 < got["0"]["update_ratio"] < 10
    else:  # every gradient read where the optimizer reads it, even after zero_grad()
        _same(got, ref)


def test_watcher_step_without_any_torch_optimizer():
    m = _model()
    w = gradwatch.watch(m, tensorboard=False, every=1000)
    for step in range(STEPS):
        m(_x(step)).pow(2).mean().backward()
        w.step()
        with torch.no_grad():
            for p in m.parameters():
                p -= 0.1 * p.grad
                p.grad = None
    got = _stats(w)
    assert "update_ratio" not in got["0"] and got["0"]["grad_norm"] > 0


def test_other_models_optimizers_are_ignored():
    ma, mb = _model(), _model()
    oa = torch.optim.SGD(ma.parameters(), lr=0.1)
    ob = torch.optim.SGD(mb.parameters(), lr=0.5)
    wa = gradwatch.watch(ma, tensorboard=False, every=1000)
    wb = gradwatch.watch(mb, tensorboard=False, every=1000)
    for step in range(STEPS):
        for m, o in ((ma, oa), (mb, ob)):
            loss = m(_x(step)).pow(2).mean()
            o.zero_grad()
            loss.backward()
            o.step()
    a, b = _stats(wa), _stats(wb)
    _same(a, _loop_with_lr(0.1))
    _same(b, _loop_with_lr(0.5))


def _loop_with_lr(lr: float) -> dict[str, dict[str, float]]:
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    w = gradwatch.watch(m, optimizer=opt, tensorboard=False, every=1000)
    for step in range(STEPS):
        loss = m(_x(step)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return _stats(w)


def test_a_new_optimizer_replacing_a_found_one_is_found():
    m = _model()
    w = gradwatch.watch(m, tensorboard=False, every=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(STEPS):
            if step % 2 == 0:  # a loop that makes a new optimizer (say, per epoch)
                opt = torch.optim.SGD(m.parameters(), lr=0.1)
            loss = m(_x(step)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        _stats(w)


def test_replaced_given_optimizer_is_named_in_one_warning(monkeypatch):
    monkeypatch.setattr(stepping, "TRAINING_FORWARDS_WITHOUT_STEP", 10)
    m = _model()
    given = torch.optim.SGD(m.parameters(), lr=0.1)
    w = gradwatch.watch(m, optimizer=given, tensorboard=False, every=1000)
    new = torch.optim.Adam(m.parameters(), lr=1e-3)  # the loop steps this one instead
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(30):
            loss = m(_x(step)).pow(2).mean()
            new.zero_grad()
            loss.backward()
            new.step()
        with torch.no_grad():
            m(_x(0))  # evaluation passes do not count
    msgs = [str(c.message) for c in caught if issubclass(c.category, UserWarning)
            and "training forward pass" in str(c.message)]
    assert len(msgs) == 1
    assert "10 training forward pass(es)" in msgs[0]
    assert "optimizer given to watch(), SGD" in msgs[0]
    assert "Adam (id" in msgs[0] and "9 time(s)" in msgs[0] and "replaced" in msgs[0]
    assert caught[0].filename == __file__  # points at the user's forward call
    with pytest.warns(UserWarning, match="written as one step"):
        w.close()  # the given optimizer never stepped: what was collected is one step
    assert w.latest is not None and w.latest.step == 1


def test_no_step_at_all_commits_one_window_at_close_and_warns(tmp_path):
    m = _model()
    ref = Float64Reference({n: mod for n, mod in m.named_modules() if n}, {"1": (-1.0, 1.0)})
    w = gradwatch.watch(m, logdir=tmp_path, every=5)
    for step in range(7):  # gradients accumulate: no optimizer, no step()
        m(_x(step)).pow(2).mean().backward()
    ref.before_step()
    with pytest.warns(UserWarning, match=r"7 training forward pass\(es\) .* no training step.*"
                      r"watcher.step\(\).*written as one step") as rec:
        w.close()
    assert rec[0].filename == __file__  # points at the close() call
    snap = w.latest
    assert snap is not None and snap.step == 1
    want = ref.window([0])  # the seven forward passes pooled, the accumulated gradients
    for layer, stats in want.items():
        for s in ("act_mean", "act_std", "act_max", "out_grad_rms", "grad_norm", "grad_max"):
            if s in stats:
                assert close(snap.stats[layer][s], stats[s]), (layer, s)
    from tests.support.events import scalars

    assert list(scalars(tmp_path)["gradwatch/act_mean/1"]) == [1]


def test_forward_passes_without_step_warn_once_while_training(monkeypatch):
    monkeypatch.setattr(stepping, "TRAINING_FORWARDS_WITHOUT_STEP", 25)
    m = _model()
    other = small_mlp()  # an optimizer made for another copy of the model
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    w = gradwatch.watch(m, tensorboard=False)
    with pytest.warns(UserWarning, match=r"25 training forward pass\(es\) .* no training "
                      r"step.*updated only parameters of other models") as rec:
        for step in range(60):
            m(_x(step)).pow(2).mean().backward()
            opt.step()
    assert sum("training forward pass" in str(r.message) for r in rec) == 1
    with pytest.warns(UserWarning, match="written as one step"):
        w.close()
    assert w.latest is not None and w.latest.step == 1 and not math.isnan(
        w.latest.stats["0"]["act_mean"])
