"""The rules on hand-made windows: each kind, patience, warm-up, extremes, rate limiting,
re-arming, scale-freeness, and what is not vanishing."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradwatch import Thresholds
from gradwatch.rules import Rules, classify_grads
from gradwatch.selection import LayerInfo

NAN = math.nan


def linear(name: str) -> LayerInfo:
    return LayerInfo(name, "Linear", True, True, None, False)


def relu(name: str) -> LayerInfo:
    return LayerInfo(name, "ReLU", False, False, None, True)


def sigmoid(name: str) -> LayerInfo:
    return LayerInfo(name, "Sigmoid", False, False, (0.0, 1.0), False)


def grads(**rms: float) -> dict[str, dict[str, float]]:
    return {n: {"grad_rms": v, "nonfinite": 0.0} for n, v in rms.items()}


def make(names: list[str], **th: Any) -> Rules:
    return Rules(Thresholds(**th), [linear(n) for n in names])


def run(rules: Rules, windows: list[dict[str, dict[str, float]]],
        act_nf: list[dict[str, float]] | None = None) -> list[list[tuple[str, str]]]:
    """Evaluate consecutive windows; per window, the (layer, kind) alerts found."""
    out = []
    for k, stats in enumerate(windows):
        order = list(stats)
        found = rules.evaluate(10 * (k + 1), stats, order, (act_nf or [{}] * len(windows))[k])
        out.append([(a.layer, a.kind) for a in found])
    return out


HEALTHY = dict(a=0.02, b=0.01, c=0.015, d=0.03)


# -- vanishing ---------------------------------------------------------------------------------
def test_vanishing_absolute_floor_waits_for_patience() -> None:
    r = make(list("abcd"))
    w = grads(**{**HEALTHY, "a": 1e-9})
    assert run(r, [w, w, w]) == [[], [("a", "vanishing")], []]


def test_vanishing_ratio_is_scale_free() -> None:
    base = {**HEALTHY, "a": 1e-6}  # 1e-6 / 0.03 < 1e-3, above the absolute floor
    found = {}
    for scale in (1e-3, 1.0, 1e3):
        r = make(list("abcd"), vanishing_rms=0.0, exploding_rms=1e9, extreme_rms=1e9)
        w = grads(**{k: v * scale for k, v in base.items()})
        found[scale] = run(r, [w, w, w])
    assert found[1.0] == [[], [], [("a", "vanishing")]]  # window 0 is warm-up
    assert found[1e-3] == found[1.0] == found[1e3]


def test_no_gradient_and_exact_zero_are_not_vanishing() -> None:
    r = make(list("abcde"))
    w = grads(**HEALTHY)
    w["e"] = {"grad_rms": NAN, "nonfinite": 0.0}  # grad None all window (unused branch)
    w["d"] = {"grad_rms": 0.0, "nonfinite": 0.0}  # exactly zero (behind a dead ReLU)
    assert run(r, [w] * 5) == [[]] * 5


def test_vanishing_reference_ignores_an_exploding_layer() -> None:
    # the RNN case: two layers explode, the head is normal and must not be "vanishing"
    r = make(["inp", "rnn", "head"])
    w = grads(inp=3000.0, rnn=2500.0, head=0.3)
    found = run(r, [w, w, w])
    assert found[0] == [("inp", "exploding"), ("rnn", "exploding")]  # extreme: at once
    assert all(kind != "vanishing" for win in found for _, kind in win)


def test_median_ignores_vanishing_layers() -> None:
    # the tiny-init case: most layers vanish; the normal top is not "exploding"
    names = [f"l{i}" for i in range(8)]
    w = grads(**{n: 10.0 ** -(10 - i) for i, n in enumerate(names[:6])},
              l6=1e-3, l7=5e-3)
    van, exp = classify_grads({n: s["grad_rms"] for n, s in w.items()}, {}, True,
                              Thresholds())
    assert exp == {}
    assert set(van) == {"l0", "l1", "l2", "l3", "l4"}  # l5: 1e-5 > 1e-3 * 5e-3


# -- exploding ---------------------------------------------------------------------------------
def test_exploding_ceiling_waits_for_patience_extreme_fires_at_once() -> None:
    r = make(list("abcd"))
    ceiling = grads(**{**HEALTHY, "a": 50.0})
    assert run(r, [ceiling, ceiling]) == [[], [("a", "exploding")]]
    r = make(list("abcd"))
    extreme = grads(**{**HEALTHY, "b": 5e3})
    assert run(r, [extreme]) == [[("b", "exploding")]]  # first window: no warm-up either


def test_exploding_ratio_to_median_after_warmup() -> None:
    r = make(list("abcd"), patience=1)
    w = grads(**{**HEALTHY, "c": 5.0})  # 5 / ~0.02 = 250x the median, below the ceiling
    assert run(r, [w, w]) == [[], [("c", "exploding")]]
    # with two layers there is no meaningful median
    r2 = make(["a", "b"], patience=1)
    w2 = grads(a=0.01, b=5.0)
    assert all(k != "exploding" for win in run(r2, [w2, w2]) for _, k in win)


def test_exploding_spike_against_own_running_average() -> None:
    r = make(list("ab"), patience=1)
    calm = grads(a=0.01, b=0.01)
    spike = grads(a=0.01, b=2.0)  # 200x its own average, below the ceiling
    assert run(r, [calm, calm, spike]) == [[], [], [("b", "exploding")]]
    # in the warm-up window there is no average yet
    r = make(list("ab"), patience=1, warmup=2)
    assert run(r, [calm, spike]) == [[], []]


def test_alert_fields_and_message() -> None:
    r = make(list("abcd"), patience=1)
    found = r.evaluate(1234, grads(**{**HEALTHY, "a": 50.0}), list("abcd"), {})
    (a,) = found
    assert (a.step, a.layer, a.kind, a.stat, a.value, a.threshold) == (
        1234, "a", "exploding", "grad_rms", 50.0, 10.0)
    for part in ("'a'", "grad_rms", "50", "10", "1234", "exploding"):
        assert part in a.message


# -- dead / saturated ----------------------------------------------------------------------------
def test_dead_relu_only_when_almost_all_zero() -> None:
    layers = [linear("lin"), relu("relu"), relu("sparse")]
    r = Rules(Thresholds(patience=1), layers)
    w = {"lin": {"grad_rms": 0.01, "act_zero_frac": 1.0},  # not relu-like: never dead
         "relu": {"act_zero_frac": 0.995}, "sparse": {"act_zero_frac": 0.73}}
    assert [(a.layer, a.kind) for a in r.evaluate(1, w, list(w), {})] == [("relu", "dead")]


def test_saturated_bounded_activation() -> None:
    layers = [sigmoid("s1"), sigmoid("s2")]
    r = Rules(Thresholds(), layers)
    w = {"s1": {"act_sat_frac": 0.6}, "s2": {"act_sat_frac": 0.25}}
    found = [[(a.layer, a.kind, a.stat) for a in r.evaluate(k, w, list(w), {})]
             for k in range(2)]
    assert found == [[], [("s1", "saturated", "act_sat_frac")]]


# -- non-finite ----------------------------------------------------------------------------------
def nf(**counts: float) -> dict[str, dict[str, float]]:
    return {n: {"grad_rms": NAN if c else 0.01, "nonfinite": c} for n, c in counts.items()}


def test_nonfinite_names_the_first_output_in_forward_order_at_once() -> None:
    r = make(list("abcd"))
    r.per_step_nonfinite = False  # the window's fallback naming
    w = nf(a=0, b=0, c=40, d=90)
    found = r.evaluate(7, w, list("abcd"), {"c": 20.0, "d": 60.0})
    assert [(a.layer, a.kind, a.step) for a in found] == [("c", "nonfinite", 7)]


def test_nonfinite_in_gradients_only_names_the_layer_nearest_the_loss() -> None:
    r = make(list("abcd"))
    r.per_step_nonfinite = False  # the window's fallback naming
    found = r.evaluate(1, nf(a=1, b=1, c=0, d=0), list("abcd"), {})
    assert [a.layer for a in found] == ["b"]


def test_nonfinite_is_one_episode_until_clean_windows_rearm() -> None:
    r = make(list("abcd"), rate_limit=100)
    r.per_step_nonfinite = False  # the window's fallback naming
    ok = nf(a=0, b=0, c=0, d=0)
    bad_c, bad_a = nf(a=0, b=0, c=5, d=5), nf(a=5, b=5, c=5, d=5)
    acts = [{}, {"c": 5.0}, {"a": 5.0}, {}, {}, {"a": 5.0}]
    found = run(r, [ok, bad_c, bad_a, ok, ok, bad_a], acts)
    # spread to the upstream layer (NaN weights) is not a new origin; two clean windows
    # (patience) re-arm, so the next episode is reported at once
    assert found == [[], [("c", "nonfinite")], [], [], [], [("a", "nonfinite")]]


def test_nonfinite_window_suppresses_the_other_rules() -> None:
    r = make(list("abcd"), patience=1)
    r.per_step_nonfinite = False  # the window's fallback naming
    w = nf(a=0, b=0, c=3, d=0)
    w["a"]["grad_rms"] = 1e-12
    assert run(r, [w], [{"c": 3.0}]) == [[("c", "nonfinite")]]


def test_nonfinite_now_is_rate_limited_per_origin_and_the_window_does_not_repeat_it() -> None:
    r = make(list("abcd"))
    a = r.nonfinite_now(58, "c", 3.0, note="forward: born in 'c'")
    assert a is not None and (a.step, a.layer, a.kind) == (58, "c", "nonfinite")
    assert a.message.endswith("; forward: born in 'c'")
    assert r.nonfinite_now(59, "c", 9.0) is None  # the same origin again: held back
    # another origin is reported (what a NaN spreads to never reaches the rules: the
    # non-finite tracker counts it into the origin until a step is finite again)
    b = r.nonfinite_now(59, "a", 9.0)
    assert b is not None and b.layer == "a"
    found = r.evaluate(60, nf(a=9, b=9, c=9, d=9), list("abcd"), {"a": 9.0})
    assert found == []


# -- patience, warm-up, rate limiting, re-arming ------------------------------------------------
def test_rate_limit_holds_back_and_counts() -> None:
    r = make(list("abcd"), rate_limit=10)
    w = grads(**{**HEALTHY, "a": 50.0})
    alerts = []
    for k in range(25):
        alerts += r.evaluate(k, w, list(w), {})
    assert [a.step for a in alerts] == [1, 11, 21]
    assert "held back" not in alerts[0].message
    assert "(9 similar alert(s) held back)" in alerts[1].message
    assert "(9 similar alert(s) held back)" in alerts[2].message


def test_rearm_when_cleared_with_hysteresis() -> None:
    r = make(list("abcd"), rate_limit=100)
    bad = grads(**{**HEALTHY, "a": 50.0})
    ok = grads(**HEALTHY)
    # alert; clear for one window only (not re-armed); holds again: still held back
    assert run(r, [bad, bad, ok, bad, bad]) == [[], [("a", "exploding")], [], [], []]
    r = make(list("abcd"), rate_limit=100)
    # clear for `patience` windows: re-armed, the next occurrence is reported
    assert run(r, [bad, bad, ok, ok, bad, bad]) == [
        [], [("a", "exploding")], [], [], [], [("a", "exploding")]]


def test_flapping_condition_never_reaches_patience() -> None:
    r = make(list("abcd"))
    bad = grads(**{**HEALTHY, "a": 50.0})
    ok = grads(**HEALTHY)
    assert run(r, [bad, ok] * 5) == [[]] * 10


def test_warmup_zero_applies_relative_rules_in_the_first_window() -> None:
    w = grads(**{**HEALTHY, "a": 1e-6})
    assert run(make(list("abcd"), patience=1), [w]) == [[]]
    assert run(make(list("abcd"), patience=1, warmup=0), [w]) == [[("a", "vanishing")]]


# -- Thresholds -------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,exc", [
    ("dead_frac", 1.5, ValueError), ("vanishing_rms", -1.0, ValueError),
    ("exploding_rms", math.inf, ValueError), ("patience", 0, ValueError),
    ("patience", 1.5, TypeError), ("saturated_frac", "high", TypeError),
    ("warmup", True, TypeError),
])
def test_thresholds_validate(field: str, value: Any, exc: type[Exception]) -> None:
    with pytest.raises(exc, match=field) as e:
        Thresholds(**{field: value})
    assert repr(value) in str(e.value)


def test_thresholds_coerce_dict_and_unknown_key() -> None:
    assert Thresholds.coerce({"patience": 3}).patience == 3
    with pytest.raises(ValueError, match="patienc"):
        Thresholds.coerce({"patienc": 3})
    with pytest.raises(TypeError, match="thresholds"):
        Thresholds.coerce(3)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_the_layers_skipped_unread_are_those_where_nothing_can_hold(seed: int) -> None:
    """``Rules._candidates`` finds the layers to check in full without a Python step per
    layer: over windows of dead, saturated, vanishing, exploding, clearing and healthy
    layers, the alerts are those of checking every layer."""
    import random

    rnd = random.Random(seed)
    infos = [f(f"m{i}") for i, f in enumerate(rnd.choices([linear, relu, sigmoid], k=12))]
    windows = []
    for _ in range(8):
        stats: dict[str, dict[str, float]] = {}
        for li in infos:
            s = {"nonfinite": 0.0}
            if li.has_trainable:
                s["grad_rms"] = rnd.choice([1e-9, 1e-3, 2e-3, 5e-3, 50.0, 1e7, NAN])
            if li.relu_like:
                s["act_zero_frac"] = rnd.choice([0.5, 0.98, 0.995, 1.0, NAN])
            if li.bounds is not None:
                s["act_sat_frac"] = rnd.choice([0.1, 0.9, 0.99, NAN])
            if rnd.random() > 0.1:  # a layer not called in some windows
                stats[li.name] = s
        windows.append(stats)
    stuck = {li.name: rnd.choice([0.0, 0.5, 1.0]) for li in infos if li.bounds is not None}

    def alerts(rules: Rules) -> list[list[tuple[str, str, str]]]:
        out = []
        for k, stats in enumerate(windows):
            found = rules.evaluate(10 * (k + 1), stats, list(stats), {}, stuck)
            out.append([(a.layer, a.kind, a.message) for a in found])
        return out

    every = Rules(Thresholds(patience=2, warmup=1), infos)
    every._candidates = lambda stats, flagged: set(stats)  # type: ignore[method-assign]
    got = alerts(Rules(Thresholds(patience=2, warmup=1), infos))
    assert got == alerts(every)
    assert any(got)  # the windows do raise alerts
