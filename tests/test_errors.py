"""Bad input fails in watch()/Thresholds() with the right type and a message naming the
argument and the value given (API.md, Errors)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn as nn

import gradwatch


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))


def check(excinfo: pytest.ExceptionInfo[BaseException], *needles: str) -> None:
    msg = str(excinfo.value)
    for n in needles:
        assert n in msg, f"{n!r} not in message {msg!r}"


def test_model_not_a_module() -> None:
    with pytest.raises(TypeError) as e:
        gradwatch.watch([1, 2], tensorboard=False)  # type: ignore[arg-type]
    check(e, "model", "torch.nn.Module", "list")


def test_model_module_class_not_instance() -> None:
    with pytest.raises(TypeError) as e:
        gradwatch.watch(nn.Linear, tensorboard=False)  # type: ignore[arg-type]
    check(e, "model", "Linear")


def test_optimizer_not_an_optimizer() -> None:
    with pytest.raises(TypeError) as e:
        gradwatch.watch(net(), optimizer="sgd", tensorboard=False)  # type: ignore[arg-type]
    check(e, "optimizer", "torch.optim.Optimizer", "str")


@pytest.mark.parametrize("arg", ["every", "sample_every"])
@pytest.mark.parametrize("value", [0, -3])
def test_every_below_one(arg: str, value: int) -> None:
    with pytest.raises(ValueError) as e:
        gradwatch.watch(net(), tensorboard=False, **{arg: value})
    check(e, arg, ">= 1", repr(value))


@pytest.mark.parametrize("arg", ["every", "sample_every"])
@pytest.mark.parametrize("value", [2.5, "10", "always", True, None])
def test_every_wrong_type(arg: str, value: object) -> None:
    with pytest.raises(TypeError) as e:
        gradwatch.watch(net(), tensorboard=False, **{arg: value})
    check(e, arg, repr(value))


@pytest.mark.parametrize("value", [2.5, "10", "always", "Auto", " auto", True, False, None,
                                   np.array([5, 5])])
def test_sample_every_wrong_type_names_what_is_allowed(value: object) -> None:
    with pytest.raises(TypeError) as e:
        gradwatch.watch(net(), tensorboard=False, sample_every=value)
    check(e, "sample_every", "int >= 1", "'auto'", repr(value))


@pytest.mark.parametrize("value", [0, -1])
def test_sample_every_below_one_names_what_is_allowed(value: int) -> None:
    with pytest.raises(ValueError) as e:
        gradwatch.watch(net(), tensorboard=False, sample_every=value)
    check(e, "sample_every", "int >= 1", "'auto'", repr(value))


def test_every_does_not_take_auto() -> None:
    with pytest.raises(TypeError) as e:
        gradwatch.watch(net(), tensorboard=False, every="auto")  # type: ignore[arg-type]
    check(e, "every", "'auto'")


@pytest.mark.parametrize("every", [1, 10, 19, 20, 35, 100, 1000])
def test_sample_every_auto_is_the_default(every: int) -> None:
    for kw in ({}, {"sample_every": "auto"}):
        w = gradwatch.watch(net(), tensorboard=False, every=every, **kw)
        assert w.sample_every == 10  # after the dense start, whatever `every` is
        w.close()
    w = gradwatch.watch(net(), tensorboard=False, every=every, sample_every=7)
    assert w.sample_every == 7
    w.close()


def test_unknown_on_alert() -> None:
    with pytest.raises(ValueError) as e:
        gradwatch.watch(net(), tensorboard=False, on_alert="shout")
    check(e, "on_alert", "'shout'", "warn", "raise", "log", "ignore")


def test_on_alert_wrong_type() -> None:
    with pytest.raises(TypeError) as e:
        gradwatch.watch(net(), tensorboard=False, on_alert=3)  # type: ignore[arg-type]
    check(e, "on_alert", "3")


def test_unknown_thresholds_key() -> None:
    with pytest.raises(ValueError) as e:
        gradwatch.watch(net(), tensorboard=False, thresholds={"vanish_rms": 1e-6})
    check(e, "thresholds", "vanish_rms", "vanishing_rms")


def test_thresholds_wrong_type() -> None:
    with pytest.raises(TypeError) as e:
        gradwatch.watch(net(), tensorboard=False, thresholds=[1e-6])  # type: ignore[arg-type]
    check(e, "thresholds", "[1e-06]")


@pytest.mark.parametrize("field", ["vanishing_rms", "exploding_rms", "spike_factor",
                                   "extreme_rms", "exploding_ratio"])
def test_negative_threshold(field: str) -> None:
    with pytest.raises(ValueError) as e:
        gradwatch.Thresholds(**{field: -1.0})
    check(e, field, "-1.0")
    # the same through watch(thresholds=dict)
    with pytest.raises(ValueError) as e:
        gradwatch.watch(net(), tensorboard=False, thresholds={field: -1.0})
    check(e, field, "-1.0")


@pytest.mark.parametrize("field,value", [("patience", 0), ("rate_limit", -2), ("warmup", -1),
                                         ("dead_frac", 1.5), ("ema", -0.1),
                                         ("vanishing_rms", float("nan"))])
def test_threshold_out_of_range(field: str, value: float) -> None:
    with pytest.raises(ValueError) as e:
        gradwatch.Thresholds(**{field: value})
    check(e, field, repr(value))


@pytest.mark.parametrize("field,value", [("patience", 2.0), ("vanishing_rms", "1e-7"),
                                         ("dead_frac", True)])
def test_threshold_wrong_type(field: str, value: object) -> None:
    with pytest.raises(TypeError) as e:
        gradwatch.Thresholds(**{field: value})
    check(e, field, repr(value))


def test_unknown_thresholds_keyword() -> None:
    with pytest.raises(TypeError) as e:
        gradwatch.Thresholds(vanish_rms=1.0)  # type: ignore[call-arg]
    check(e, "vanish_rms")


@pytest.mark.parametrize("pattern", ["encoder.*", ["0", "no_such_layer"]])
def test_include_matches_nothing(pattern: str | list[str]) -> None:
    with pytest.raises(ValueError) as e:
        gradwatch.watch(net(), tensorboard=False, include=pattern)
    bad = pattern if isinstance(pattern, str) else pattern[1]
    check(e, "include", repr(bad))


def test_include_wrong_type() -> None:
    with pytest.raises(TypeError) as e:
        gradwatch.watch(net(), tensorboard=False, include=[3])  # type: ignore[list-item]
    check(e, "include", "3")


def test_logdir_cannot_be_written(tmp_path) -> None:
    # Tests may run as root, where chmod does not stop writes: a path below a regular file
    # cannot be created by anyone.
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    bad = blocker / "sub"
    with pytest.raises(ValueError) as e:
        gradwatch.watch(net(), logdir=bad)
    check(e, "logdir", str(bad))
    assert not bad.exists()


def test_logdir_wrong_type() -> None:
    with pytest.raises(TypeError) as e:
        gradwatch.watch(net(), logdir=42)  # type: ignore[arg-type]
    check(e, "logdir", "42")


def test_bad_input_leaves_model_unwatched(tmp_path) -> None:
    m = net()
    with pytest.raises(ValueError):
        gradwatch.watch(m, tensorboard=False, every=0)
    assert all(len(mod._forward_hooks) == 0 for mod in m.modules())
    w = gradwatch.watch(m, tensorboard=False)  # no "already watched" warning either
    w.close()


def test_step_while_optimizer_drives() -> None:
    m = net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w = gradwatch.watch(m, optimizer=opt, tensorboard=False)
    try:
        with pytest.raises(RuntimeError) as e:
            w.step()
        check(e, "step()", "optimizer")
        # and it did not count a step
        m(torch.randn(2, 3)).sum().backward()
        opt.step()
        snap = w.flush()
        assert snap is not None and snap.step == 1
    finally:
        w.close()


def test_messages_say_what_is_allowed() -> None:
    with pytest.raises(ValueError) as e:
        gradwatch.watch(net(), tensorboard=False, every=0)
    assert re.search(r"int >= 1", str(e.value))
