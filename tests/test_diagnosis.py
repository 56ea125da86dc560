"""Causes and hints from hand-made windows: the rules with a real model's init audit, fed
the statistics a window would hold (what the zoo measures end to end, here case by case,
including the cases where the evidence must *not* give a cause)."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
import torch.nn as nn

from gradwatch.alerts import Alert
from gradwatch.audit import audit
from gradwatch.diagnosis import LIMITS
from gradwatch.rules import Rules, Thresholds
from gradwatch.selection import describe, select

Stats = dict[str, dict[str, float]]


def rules_for(model: nn.Module, **th: Any) -> Rules:
    chosen = select(model, None, None)
    infos = [describe(n, m, [p for p in m._parameters.values() if p is not None])
             for n, m in chosen]
    return Rules(Thresholds(**{"patience": 1, **th}), infos, audit(model, chosen))


def window(r: Rules, step: int, stats: Stats) -> list[Alert]:
    return r.evaluate(step, stats, list(stats), {}, None)


def std_of(m: nn.Module) -> float:
    return float(m.weight.detach().double().std(unbiased=False))


def linear(d_in: int, d_out: int, std: float | None = None) -> nn.Linear:
    lin = nn.Linear(d_in, d_out)
    if std is not None:
        nn.init.normal_(lin.weight, 0.0, std)
    nn.init.zeros_(lin.bias)
    return lin


# -- saturated ---------------------------------------------------------------------------------
def sigmoid_net(std: float | None) -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(linear(64, 64, std), nn.Sigmoid(), linear(64, 10))
    if std is None:
        nn.init.xavier_uniform_(m[0].weight)
    return m


SATURATED: Stats = {"0": {"act_mean": 0.3, "act_std": 7.4}, "1": {"act_sat_frac": 0.6},
                    "2": {}}


def test_saturated_sigmoid_after_oversized_weights_is_init_scale() -> None:
    m = sigmoid_net(1.0)
    (a,) = window(rules_for(m), 10, SATURATED)
    assert (a.kind, a.layer, a.cause) == ("saturated", "1", "init_scale")
    got = re.search(r"weights of '0' had std ([\d.]+) at watch\(\), ([\d.]+)x the Glorot std "
                    r"0\.125 for 64 -> 64 before a Sigmoid; its outputs have std 7\.4 "
                    r"\(mean 0\.3\) where a sigmoid is flat beyond about ±4\.6", a.hint)
    assert got, a.hint
    std = std_of(m[0])
    assert float(got[1]) == pytest.approx(std, abs=0.0051)
    assert float(got[2]) == pytest.approx(std / 0.125, rel=0.01)
    assert "kaiming_normal_" in a.hint


def test_saturated_sigmoid_with_xavier_weights_has_no_cause() -> None:
    (a,) = window(rules_for(sigmoid_net(None)), 10, SATURATED)
    assert (a.kind, a.cause, a.hint) == ("saturated", "unknown", "")


def stacked(n: int, excess: float, norm: nn.Module | None = None) -> nn.Sequential:
    """``n`` Linear(32, 32) with no activation between (gain unknown: the top of the sound
    range is 5/3 x 1/sqrt(32)), each ``excess`` x that top, then a tanh."""
    torch.manual_seed(0)
    top = 5 / 3 / math.sqrt(32)
    layers: list[nn.Module] = [linear(32, 32, excess * top) for _ in range(n)]
    if norm is not None:
        layers.insert(n - 1, norm)
    return nn.Sequential(*layers, nn.Tanh())


def stacked_stats(m: nn.Sequential) -> Stats:
    stats: Stats = {str(i): {"act_mean": 0.0, "act_std": 5.0} for i in range(len(m) - 1)}
    stats[str(len(m) - 1)] = {"act_sat_frac": 0.7}
    return stats


def test_a_small_excess_compounds_along_the_path() -> None:
    # 1.3x per layer is sound for one layer; over 8 layers it is 8x: the path is judged
    assert 1.3 < LIMITS.init_grow < 1.3 ** 8
    m = stacked(8, 1.3)
    (a,) = window(rules_for(m), 10, stacked_stats(m))
    assert (a.kind, a.layer, a.cause) == ("saturated", "8", "init_scale")
    assert "along its path" in a.hint
    one = stacked(1, 1.3)
    (b,) = window(rules_for(one), 10, stacked_stats(one))
    assert b.cause == "unknown"


@pytest.mark.parametrize("norm,why", [
    (nn.LayerNorm(32), "a watched normalization layer resets the scale"),
    (nn.LayerNorm(32, elementwise_affine=False), "an unwatched one: layers judged alone"),
])
def test_normalization_layers_cut_the_path(norm: nn.Module, why: str) -> None:
    m = stacked(8, 1.3, norm)
    alerts = window(rules_for(m), 10, stacked_stats(m))
    assert [(a.kind, a.cause) for a in alerts] == [("saturated", "unknown")], why


# -- dead ----------------------------------------------------------------------------------------
def relu_net(bias: float = 0.0) -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(linear(8, 16), nn.ReLU(), linear(16, 2))
    nn.init.kaiming_normal_(m[0].weight, nonlinearity="relu")
    nn.init.constant_(m[0].bias, bias)
    return m


def dead(mean: float, std: float, zero: float = 1.0, ur: float = 0.002) -> Stats:
    return {"0": {"act_mean": mean, "act_std": std, "update_ratio": ur},
            "1": {"act_zero_frac": zero}, "2": {"update_ratio": ur}}


def test_dead_relu_behind_shifted_pre_activations_is_bias_shift() -> None:
    (a,) = window(rules_for(relu_net(-20.0)), 10, dead(-19.5, 1.5))
    assert (a.kind, a.layer, a.cause) == ("dead", "1", "bias_shift")
    assert "its inputs (the outputs of '0') have mean -19.5 (std 1.5, 13 std below zero)" \
        in a.hint
    assert "the bias of '0' had mean -20 at watch()" in a.hint


def test_dead_relu_without_a_shift_has_no_cause() -> None:
    # mostly below zero, but not far: the evidence does not say why
    (a,) = window(rules_for(relu_net()), 10, dead(-0.5, 1.0))
    assert (a.cause, a.hint) == ("unknown", "")


def test_relu_killed_right_after_an_update_jump_is_learning_rate() -> None:
    r = rules_for(relu_net())
    for k in range(1, 5):  # alive, steady updates (the first window is not a baseline)
        assert window(r, 10 * k, dead(0.0, 1.0, zero=0.5, ur=0.05 if k == 1 else 0.002)) == []
    assert window(r, 50, dead(-1.0, 1.0, zero=0.8, ur=0.05)) == []  # the spike
    (a,) = window(r, 60, dead(-3.0, 1.0, ur=0.0))
    assert (a.kind, a.cause) == ("dead", "learning_rate")
    assert "'1' was still alive in the window ending at step 50 (zero fraction 0.80), when " \
           "the median update_ratio jumped to 0.05, 25x its earlier 0.002" in a.hint


def test_relu_dying_without_an_update_jump_is_not_learning_rate() -> None:
    r = rules_for(relu_net())
    for k in range(1, 6):
        window(r, 10 * k, dead(0.0, 1.0, zero=0.5))
    (a,) = window(r, 60, dead(-3.0, 1.0))
    assert a.cause == "bias_shift"


def test_dead_downstream_of_a_dead_relu_points_upstream() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(linear(8, 16), nn.ReLU(), linear(16, 16), nn.ReLU(), linear(16, 2))
    stats = {"0": {"act_mean": -9.0, "act_std": 1.0}, "1": {"act_zero_frac": 1.0},
             "2": {"act_mean": 0.0, "act_std": 0.0}, "3": {"act_zero_frac": 1.0}, "4": {}}
    a, b = window(rules_for(m), 10, stats)
    assert (a.layer, a.cause) == ("1", "bias_shift")
    assert (b.layer, b.cause) == ("3", "unknown")
    assert b.hint == "its inputs (the outputs of '2') are all 0: it is downstream of dead " \
                     "'1'; fix that one first"


# -- exploding -----------------------------------------------------------------------------------
def he_mlp(std: float | None = None) -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(linear(16, 64), nn.ReLU(), linear(64, 64), nn.ReLU(), linear(64, 1))
    for lin in m[::2]:
        if std is None:
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        else:
            nn.init.normal_(lin.weight, 0.0, std)
    return m


def updates(ur: float, rms: float = 0.01) -> Stats:
    return {"0": {"grad_rms": rms, "update_ratio": ur}, "1": {"act_zero_frac": 0.5},
            "2": {"grad_rms": rms, "update_ratio": ur}, "3": {"act_zero_frac": 0.5},
            "4": {"grad_rms": rms, "update_ratio": ur}}


@pytest.mark.parametrize("ur,cause", [(0.2, "learning_rate"), (0.01, "unknown")])
def test_exploding_after_large_updates_with_a_sound_init(ur: float, cause: str) -> None:
    r = rules_for(he_mlp())
    assert window(r, 10, updates(ur)) == []
    # a blow-up within a step: judged on the window before it
    a = r.exploding_now(13, "2", 5e3)
    assert a is not None and a.cause == cause
    if cause == "learning_rate":
        assert "median update_ratio 0.2 over the layers in the window ending at step 10" \
               in a.hint


def test_exploding_window_alert_uses_the_windows_before_its_streak() -> None:
    r = rules_for(he_mlp(), patience=2)
    assert window(r, 10, updates(0.2)) == []
    # the updates of the exploding windows themselves are not evidence (they follow it)
    assert window(r, 20, updates(0.01, rms=50.0)) == []
    alerts = window(r, 30, updates(0.01, rms=50.0))
    assert {(a.kind, a.cause) for a in alerts} == {("exploding", "learning_rate")}
    r2 = rules_for(he_mlp(), patience=2)
    window(r2, 10, updates(0.01))
    window(r2, 20, updates(0.9, rms=50.0))
    assert {a.cause for a in window(r2, 30, updates(0.9, rms=50.0))} == {"unknown"}


def test_oversized_relu_net_exploding_in_its_first_steps_is_init_scale() -> None:
    r = rules_for(he_mlp(std=1.0))
    a = r.exploding_now(1, "0", 2e4)  # before any window: the registration order is used
    assert a is not None and a.cause == "init_scale"
    # the 64 -> 1 head is within the Glorot/He range for its fans (He on fan-out: 1)
    assert "2 weight layers '0' .. '2' scale the signal up by about" in a.hint


def seq_model(gain: float) -> nn.Module:
    torch.manual_seed(0)
    m = nn.ModuleDict({"inp": nn.Linear(8, 32), "rnn": nn.RNN(32, 32, batch_first=True),
                       "head": nn.Linear(32, 1)})
    with torch.no_grad():
        nn.init.orthogonal_(m["rnn"].weight_hh_l0).mul_(gain)
    return m


def test_exploding_at_or_below_a_recurrent_layer_with_gain_above_one() -> None:
    r = rules_for(seq_model(3.0))
    at_rnn, below, above = (r.exploding_now(1, n, 2e3) for n in ("rnn", "inp", "head"))
    assert at_rnn is not None and at_rnn.cause == "recurrent_gain"
    assert "recurrent weight 'rnn.weight_hh_l0' had gain 3 (largest singular value)" \
        in at_rnn.hint
    assert below is not None and below.cause == "recurrent_gain"
    assert below.hint.startswith("the gradient reaching 'inp' comes through 'rnn': ")
    assert above is not None and above.cause == "unknown"  # the head is not behind it
    sound = rules_for(seq_model(1.0)).exploding_now(1, "rnn", 2e3)
    assert sound is not None and sound.cause == "unknown"


# -- vanishing -----------------------------------------------------------------------------------
def tanh_net(std: float | None) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(6):
        lin = linear(64, 64, std)
        if std is None:
            nn.init.xavier_uniform_(lin.weight, gain=nn.init.calculate_gain("tanh"))
        layers += [lin, nn.Tanh()]
    return nn.Sequential(*layers, linear(64, 10))


def vanishing(m: nn.Sequential) -> Stats:
    stats: Stats = {str(i): ({"grad_rms": 1e-9 if i == 0 else 1e-2} if i % 2 == 0 else {})
                    for i in range(len(m))}
    return stats


def test_vanishing_below_tiny_weights_is_init_scale() -> None:
    alerts = window(rules_for(tanh_net(0.02)), 10, vanishing(tanh_net(0.02)))
    (a,) = [a for a in alerts if a.layer == "0"]
    assert (a.kind, a.cause) == ("vanishing", "init_scale")
    assert re.search(r"the 7 weight layers '0' \.\. '12' of its path scale the signal by "
                     r"about [\d.]+e-0[5-9]", a.hint), a.hint
    assert "xavier_uniform_(w, gain=nn.init.calculate_gain('tanh'))" in a.hint


def test_vanishing_with_xavier_tanh_weights_has_no_cause() -> None:
    (a,) = [a for a in window(rules_for(tanh_net(None)), 10, vanishing(tanh_net(None)))
            if a.layer == "0"]
    assert (a.kind, a.cause) == ("vanishing", "unknown")


def test_vanishing_below_a_saturated_sigmoid_is_init_scale() -> None:
    m = sigmoid_net(1.0)
    stats = {"0": {"grad_rms": 1e-9, "act_mean": 0.0, "act_std": 8.0},
             "1": {"act_sat_frac": 0.7}, "2": {"grad_rms": 1e-2}}
    alerts = window(rules_for(m), 10, stats)
    van = [a for a in alerts if a.kind == "vanishing"]
    assert [(a.layer, a.cause) for a in van] == [("0", "init_scale")]
    assert van[0].hint.startswith("'1' above it is saturated and passes little gradient down")


def test_history_is_bounded() -> None:
    r = rules_for(relu_net())
    for k in range(1, 60):
        window(r, 10 * k, dead(0.0, 1.0, zero=0.5))
    assert len(r.diagnosis._history) == LIMITS.history


def test_a_failing_diagnosis_keeps_the_alert_and_switches_itself_off() -> None:
    faults: list[tuple[str, str, str]] = []

    def fault(stage: str, layer: str, exc: BaseException, defer: bool = False) -> None:
        faults.append((stage, layer, type(exc).__name__))

    m = relu_net()
    chosen = select(m, None, None)
    infos = [describe(n, x, [p for p in x._parameters.values() if p is not None])
             for n, x in chosen]
    r = Rules(Thresholds(patience=1, rate_limit=1), infos, audit(m, chosen), fault)
    bad = dead(-5.0, 1.0)
    bad["0"]["act_mean"] = "-5"  # type: ignore[assignment]  # not a number: the cause fails
    (a,) = window(r, 10, bad)
    assert (a.kind, a.layer, a.cause, a.hint) == ("dead", "1", "unknown", "")
    assert faults == [("diagnosis (alert causes)", "1", "TypeError")]
    # switched off: later alerts come without a cause, and no second report
    (b,) = window(r, 20, dead(-5.0, 1.0))
    assert (b.kind, b.cause) == ("dead", "unknown") and len(faults) == 1


def test_an_update_jump_after_the_relu_died_is_not_why_it_died() -> None:
    r = rules_for(relu_net(), rate_limit=1)
    for k in range(1, 5):
        window(r, 10 * k, dead(0.0, 1.0, zero=0.5))
    window(r, 50, dead(-0.5, 1.0, zero=1.0))  # dead, no jump, no clear shift
    (a,) = window(r, 60, dead(-3.0, 1.0, ur=0.05))  # a jump, one window too late
    assert a.cause == "bias_shift"
