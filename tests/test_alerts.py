"""Alert delivery through a real watcher: warn, raise, log, ignore, a callable; the bounded
``watcher.alerts``; a NaN reported within one step at the module where it started."""

from __future__ import annotations

import logging
import math
import sys
import warnings
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gradwatch
from gradwatch import alerts as A
from tests.support.zoo import NaNAfter  # noqa: E402

FAST = {"patience": 1}


def dead_net() -> nn.Sequential:
    """Linear -> ReLU '1' that is dead (bias -100) -> Linear."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    with torch.no_grad():
        m[0].bias.fill_(-100.0)
    return m


def nan_net(at: int, device: str = "cpu") -> nn.Sequential:
    """Its module '2' starts returning NaN at the ``at``-th training step (0-based)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), NaNAfter(16, at), nn.Linear(16, 16),
                         nn.ReLU(), nn.Linear(16, 2)).to(device)


def train_step(m: nn.Module, opt: torch.optim.Optimizer) -> None:
    dev = next(m.parameters()).device
    x = torch.randn(4, 8).to(dev)
    loss = F.cross_entropy(m(x), torch.zeros(4, dtype=torch.long, device=dev))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def sgd(m: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(m.parameters(), lr=0.01)


# -- warn ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,cls", [
    ("vanishing", gradwatch.VanishingGradientWarning),
    ("exploding", gradwatch.ExplodingGradientWarning),
    ("nonfinite", gradwatch.NonFiniteWarning),
    ("dead", gradwatch.DeadActivationWarning),
    ("saturated", gradwatch.SaturationWarning),
])
def test_each_kind_warns_with_its_subclass(kind: str, cls: type[Warning]) -> None:
    assert issubclass(cls, gradwatch.GradwatchWarning)
    assert issubclass(cls, RuntimeWarning)
    a = gradwatch.Alert(5, "x", kind, "s", 1.0, 2.0, f"{kind} message")
    with pytest.warns(cls, match=f"{kind} message"):
        A.deliver(a, "warn")


def test_warn_through_the_watcher_names_layer_stat_value_threshold_step() -> None:
    m = dead_net()
    opt = sgd(m)
    w = gradwatch.watch(m, optimizer=opt, tensorboard=False, every=2, thresholds=FAST)
    with pytest.warns(gradwatch.DeadActivationWarning) as rec:
        for _ in range(2):
            train_step(m, opt)
        w.flush()
    w.close()
    msgs = [str(r.message) for r in rec if issubclass(r.category, gradwatch.GradwatchWarning)]
    assert len(msgs) == 1
    for part in ("'1'", "act_zero_frac", "=1 ", "0.99", "step 2", "dead"):
        assert part in msgs[0], (part, msgs[0])
    (a,) = w.alerts
    assert (a.layer, a.kind, a.stat, a.value, a.threshold, a.step) == (
        "1", "dead", "act_zero_frac", 1.0, 0.99, 2)


# -- raise ---------------------------------------------------------------------------------------
def test_raise_from_flush_carries_the_alert() -> None:
    m = dead_net()
    opt = sgd(m)
    w = gradwatch.watch(m, optimizer=opt, tensorboard=False, every=1000, thresholds=FAST,
                        on_alert="raise")
    train_step(m, opt)
    with pytest.raises(gradwatch.GradientAlertError) as e:
        w.flush()
    a = e.value.alert
    assert (a.layer, a.kind, a.cause) == ("1", "dead", "bias_shift")
    # the error names what (the alert's message), then why and what to try
    assert str(e.value) == f"{a.message}\n  cause bias_shift: {a.hint}"
    assert "mean -100" in a.hint and "'0'" in a.hint
    w.close()


def test_raise_from_step_without_optimizer() -> None:
    m = dead_net()
    opt = sgd(m)
    w = gradwatch.watch(m, tensorboard=False, every=1, thresholds=FAST, on_alert="raise")
    x = torch.randn(4, 8)
    F.cross_entropy(m(x), torch.zeros(4, dtype=torch.long)).backward()
    opt.step()
    with pytest.raises(gradwatch.GradientAlertError) as e:
        w.step()
        w.flush()  # the window's rules run off the training thread: flush waits for them
    assert e.value.alert.kind == "dead"
    w.close()


def test_raise_at_the_step_a_nan_appears() -> None:
    m = nan_net(at=3)
    opt = sgd(m)
    w = gradwatch.watch(m, optimizer=opt, tensorboard=False, every=100, on_alert="raise")
    for _ in range(3):
        train_step(m, opt)
    with pytest.raises(gradwatch.GradientAlertError) as e:
        train_step(m, opt)  # from optimizer.step(), through the watcher's step hook
    assert (e.value.alert.kind, e.value.alert.layer, e.value.alert.step) == ("nonfinite", "2", 4)
    w.close()


# -- log / ignore / callable ---------------------------------------------------------------------
def test_log_goes_to_the_gradwatch_logger(caplog: pytest.LogCaptureFixture) -> None:
    m = dead_net()
    opt = sgd(m)
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", gradwatch.GradwatchWarning)
            with gradwatch.watch(m, optimizer=opt, tensorboard=False, every=2, thresholds=FAST,
                                 on_alert="log"):
                for _ in range(2):
                    train_step(m, opt)
    recs = [r for r in caplog.records if r.name == "gradwatch"]
    assert len(recs) == 1 and recs[0].levelno == logging.WARNING
    assert "dead at layer '1'" in recs[0].getMessage()


def test_ignore_records_but_does_not_warn() -> None:
    m = dead_net()
    opt = sgd(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error", gradwatch.GradwatchWarning)
        with gradwatch.watch(m, optimizer=opt, tensorboard=False, every=2, thresholds=FAST,
                             on_alert="ignore") as w:
            for _ in range(4):
                train_step(m, opt)
    assert [(a.layer, a.kind) for a in w.alerts] == [("1", "dead")]


def test_callable_receives_alert_objects() -> None:
    m = dead_net()
    opt = sgd(m)
    got: list[gradwatch.Alert] = []
    with gradwatch.watch(m, optimizer=opt, tensorboard=False, every=2, thresholds=FAST,
                         on_alert=got.append) as w:
        for _ in range(2):
            train_step(m, opt)
    assert got == w.alerts and len(got) == 1
    assert isinstance(got[0], gradwatch.Alert) and got[0].kind == "dead"


def test_alerts_list_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from gradwatch import watcher as W

    assert W.MAX_ALERTS == 10_000
    monkeypatch.setattr(W, "MAX_ALERTS", 3)  # the bound is read when a watcher is made
    m = dead_net()
    opt = sgd(m)
    with gradwatch.watch(m, optimizer=opt, tensorboard=False, every=1, on_alert="ignore",
                         thresholds={"patience": 1, "rate_limit": 1}) as w:
        for _ in range(8):
            train_step(m, opt)
            w.flush()
    assert [a.step for a in w.alerts] == [6, 7, 8]


# -- non-finite within one step ------------------------------------------------------------------
@pytest.mark.parametrize("sample_every", [1, 3])
def test_nan_reported_within_one_step_at_its_origin(sample_every: int) -> None:
    at = 7  # a step that is not a sampled one when sample_every=3
    m = nan_net(at)
    opt = sgd(m)
    got: list[gradwatch.Alert] = []
    w = gradwatch.watch(m, optimizer=opt, tensorboard=False, every=100,
                        sample_every=sample_every, on_alert=got.append)
    for _ in range(at):
        train_step(m, opt)
    assert got == []
    train_step(m, opt)  # the step whose forward goes NaN at module '2'
    # reported by the end of that same step, long before the window's flush (every=100)
    assert [(a.kind, a.layer, a.step) for a in got] == [("nonfinite", "2", at + 1)]
    assert got[0].value > 0 and "'2'" in got[0].message
    for _ in range(5):  # NaN has spread to every layer, upstream too: no new origins
        train_step(m, opt)
    w.close()
    assert {a.layer for a in got} == {"2"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nan_on_cuda_reported_within_a_few_steps_without_a_sync() -> None:
    at = 5
    m = nan_net(at, "cuda")
    opt = sgd(m)
    got: list[gradwatch.Alert] = []
    w = gradwatch.watch(m, optimizer=opt, tensorboard=False, every=100, on_alert=got.append)
    for _ in range(at + 1):
        train_step(m, opt)
    for _ in range(50):  # the host reads a copy once its event is done: a step or so later
        if got:
            break
        train_step(m, opt)
    w.close()
    assert got and got[0].layer == "2" and got[0].kind == "nonfinite"
    assert got[0].step >= at + 1
    assert {a.layer for a in got} == {"2"}


# -- extreme gradients within one step -----------------------------------------------------------
def scaled_loss_net(scale: float) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = torch.optim.SGD(m.parameters(), lr=0.0)  # weights stay as they are

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        (m(torch.randn(4, 8)).sum() * scale).backward()
        opt.step()

    return m, opt, step


def test_extreme_gradient_reported_within_its_step() -> None:
    m, opt, step = scaled_loss_net(1e6)
    got: list[gradwatch.Alert] = []
    with gradwatch.watch(m, optimizer=opt, tensorboard=False, every=100, on_alert=got.append):
        step()
        assert {(a.kind, a.layer, a.step) for a in got} == {("exploding", "0", 1),
                                                            ("exploding", "2", 1)}
        assert all(a.value > 1e3 and a.threshold == 1e3 for a in got)
        for _ in range(3):
            step()
    assert len(got) == 2  # rate-limited: the window's own report is held back


def test_gradient_whose_norm_overflows_is_exploding_not_nonfinite() -> None:
    m, opt, step = scaled_loss_net(1e25)  # finite elements (~1e25), Σg² overflows fp32
    got: list[gradwatch.Alert] = []
    with gradwatch.watch(m, optimizer=opt, tensorboard=False, every=2, on_alert=got.append):
        for _ in range(2):
            step()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    assert {a.kind for a in got} == {"exploding"}
    assert {a.layer for a in got} == {"0", "2"}


def test_inf_in_a_parameter_gradient_is_nonfinite_at_that_layer() -> None:
    m, opt, step = scaled_loss_net(1.0)
    m[2].bias.register_hook(lambda g: torch.full_like(g, float("inf")))
    got: list[gradwatch.Alert] = []
    with gradwatch.watch(m, optimizer=opt, tensorboard=False, every=100, on_alert=got.append):
        step()
        assert [(a.kind, a.layer, a.step) for a in got] == [("nonfinite", "2", 1)]


# -- the same on light steps (on CPU their flags are read on the host only when the step's
# pre-step check does not clear them) ----------------------------------------------------------
def scaled_light_step(scale: float, hook: Any = None
                      ) -> tuple[list[gradwatch.Alert], Any, nn.Module]:
    """112 quiet steps (past the dense start), then one light step whose loss is scaled by
    ``scale`` (and with ``hook`` on the bias of '2'): its alerts, the window stats flushed
    right after it (steps 101-113), and the model (its gradients those of that step)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = torch.optim.SGD(m.parameters(), lr=0.0)  # the gradients stay where they are
    got: list[gradwatch.Alert] = []
    w = gradwatch.watch(m, tensorboard=False, every=100, on_alert=got.append)
    x = torch.randn(4, 8)

    def step(k: float) -> None:
        opt.zero_grad(set_to_none=True)
        (m(x).sum() * k).backward()
        opt.step()

    for _ in range(112):
        step(1.0)
    assert not got and not w._collector.full  # the next step is a light one
    if hook is not None:
        m[2].bias.register_hook(hook)
    step(scale)
    alerts = list(got)
    snap = w.flush()
    w.close()
    return alerts, snap.stats, m


def layer_rms(m: nn.Module) -> list[float]:
    return [math.sqrt(sum(p.grad.pow(2).sum().item() for p in m[i].parameters())
                      / sum(p.numel() for p in m[i].parameters())) for i in (0, 2)]


def test_extreme_gradient_on_a_light_step_is_reported_within_it() -> None:
    # the gradient of '2''s bias is 4 * scale per element: its RMS 4e3 is over extreme_rms
    got, _, m = scaled_light_step(1e3)
    over = {n for n, r in zip("02", layer_rms(m)) if r > 1e3}
    assert "2" in over
    assert {(a.kind, a.layer, a.step) for a in got} == {("exploding", n, 113) for n in over}
    assert sorted(a.value for a in got) == pytest.approx(
        sorted(r for r in layer_rms(m) if r > 1e3), rel=1e-5)


def test_large_gradients_under_extreme_rms_on_a_light_step_stay_quiet() -> None:
    # per layer under extreme_rms ('2''s bias: RMS 800), while the sum of the norms is over
    # extreme_rms * sqrt(2) (the bound that lets a step skip reading its flags): they are
    # read, and nothing is reported
    got, _, m = scaled_light_step(200.0)
    assert max(layer_rms(m)) < 1e3
    assert sum(p.grad.norm().item() for p in m.parameters()) > 1e3 * 2 ** 0.5
    assert got == []


def test_nan_parameter_gradient_on_a_light_step_is_named_and_counted() -> None:
    got, st, _ = scaled_light_step(1.0, hook=lambda g: torch.full_like(g, float("nan")))
    assert [(a.kind, a.layer, a.step) for a in got] == [("nonfinite", "2", 113)]
    # one non-finite gradient tensor in the window (steps 101-113), in '2' only
    assert st["2"]["nonfinite"] == 1 and st["0"]["nonfinite"] == 0


def test_warnings_point_at_the_training_loop_and_keep_no_registry():
    """Every alert message is unique (it names the step): warnings.warn's per-module
    registry would grow for the whole run. The warning is attributed to the user's line."""
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    nn.init.constant_(m[0].bias, -100.0)
    w = gradwatch.watch(m, tensorboard=False, every=1,
                        thresholds=dict(rate_limit=1, patience=1))
    registry = sys.modules[__name__].__dict__.setdefault("__warningregistry__", {})
    registry.clear()
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("default")
        for _ in range(6):
            m(torch.randn(2, 4)).sum().backward()
            w.step()
        w.close()
    dead = [g for g in got if issubclass(g.category, gradwatch.DeadActivationWarning)]
    assert len(dead) >= 5
    assert {g.filename for g in dead} == {__file__}
    assert not [k for k in registry if k != "version"]


# -- grouping ------------------------------------------------------------------------------------
def deep_tanh(depth: int = 30) -> nn.Sequential:
    """A deep tanh net drawn with std 0.02: the error signal dies on its way down."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(depth):
        lin = nn.Linear(8 if i == 0 else 16, 16)
        nn.init.normal_(lin.weight, 0.0, 0.02)
        layers += [lin, nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(16, 2))


def test_one_warning_per_window_kind_and_cause_naming_the_layers() -> None:
    m = deep_tanh()
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    with pytest.warns(gradwatch.VanishingGradientWarning) as rec:
        with gradwatch.watch(m, optimizer=opt, tensorboard=False, every=4,
                             thresholds={"patience": 1, "rate_limit": 1}) as w:
            for _ in range(8):
                train_step(m, opt)
    van = [a for a in w.alerts if a.kind == "vanishing"]
    steps = sorted({a.step for a in van})
    assert steps == [4, 8]
    msgs = [str(r.message) for r in rec if r.category is gradwatch.VanishingGradientWarning]
    assert len(msgs) == len(steps)  # one warning per window, not one per layer
    for step, msg in zip(steps, msgs):
        here = [a for a in van if a.step == step]
        assert len(here) > 10 and {a.cause for a in here} == {"init_scale"}
        worst = min(here, key=lambda a: a.value / a.threshold)
        head, why = msg.split("\n")
        assert head == f"{worst.message} [{len(here)} layers: '{here[0].layer}' .. " \
                       f"'{here[-1].layer}']"
        assert why == f"  cause init_scale: {worst.hint}"
        # still what API.md promises of a warning: a layer, the stat, a value, the
        # threshold and the step
        assert f"at layer '{worst.layer}' (step {step}): grad_rms=" in head


def test_log_lines_are_grouped_and_a_callable_gets_every_alert(
        caplog: pytest.LogCaptureFixture) -> None:
    got: list[gradwatch.Alert] = []
    for on_alert in ("log", got.append):
        m = deep_tanh()
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        with caplog.at_level(logging.WARNING, logger="gradwatch"):
            with gradwatch.watch(m, optimizer=opt, tensorboard=False, every=4,
                                 thresholds={"patience": 1}, on_alert=on_alert) as w:
                for _ in range(4):
                    train_step(m, opt)
        n = len([a for a in w.alerts if a.kind == "vanishing"])
        assert n > 10
    lines = [r.getMessage() for r in caplog.records if r.name == "gradwatch"]
    assert len(lines) == 1 and f"[{n} layers: " in lines[0] and "cause init_scale: " in lines[0]
    assert len([a for a in got if a.kind == "vanishing"]) == n  # one call per alert


def test_different_causes_of_one_kind_are_separate_warnings() -> None:
    # ReLU '1' dead behind a bias of -100 (bias_shift); ReLU '3' dead because all it is
    # fed is the zero output of the dead one (no cause of its own)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                      nn.Linear(16, 2))
    with torch.no_grad():
        m[0].bias.fill_(-100.0)
        m[2].bias.zero_()
    opt = sgd(m)
    with pytest.warns(gradwatch.DeadActivationWarning) as rec:
        with gradwatch.watch(m, optimizer=opt, tensorboard=False, every=2, thresholds=FAST):
            for _ in range(2):
                train_step(m, opt)
    msgs = sorted(str(r.message) for r in rec
                  if r.category is gradwatch.DeadActivationWarning)
    assert len(msgs) == 2
    assert "at layer '1'" in msgs[0] and "\n  cause bias_shift: " in msgs[0]
    assert "at layer '3'" in msgs[1] and "\n  cause unknown: its inputs (the outputs of " \
                                         "'2') are all 0" in msgs[1]


def test_report_lists_one_entry_per_window_kind_and_cause_with_its_hint() -> None:
    m = deep_tanh()
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    with gradwatch.watch(m, optimizer=opt, tensorboard=False, every=4, on_alert="ignore",
                         thresholds={"patience": 1, "rate_limit": 1}) as w:
        for _ in range(8):
            train_step(m, opt)
    text = w.report()
    van = [a for a in w.alerts if a.kind == "vanishing"]
    head = f"alerts: {len(w.alerts)} in all, the newest {len(w.alerts)} in 2 entries (one per " \
           f"step, kind and cause):"
    assert head in text
    entries = text.split(head)[1].strip("\n").split("\n")
    assert len(entries) == 2 * 2  # two windows: a message line and a cause line each
    for step, (msg, why) in zip((4, 8), zip(entries[::2], entries[1::2])):
        here = [a for a in van if a.step == step]
        worst = min(here, key=lambda a: a.value / a.threshold)
        assert msg == f"  {worst.message} [{len(here)} layers: '{here[0].layer}' .. " \
                      f"'{here[-1].layer}']"
        assert why == f"    cause init_scale: {worst.hint}"
