"""close(), the context manager, re-watching, and a watched model as a plain object."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn as nn

import gradwatch
from tests.support.events import scalars


def mlp():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def train(model, w, steps):
    for _ in range(steps):
        model(torch.randn(4, 4)).pow(2).mean().backward()
        w.step()


def test_close_is_idempotent_and_empty_window_writes_nothing(tmp_path):
    m = mlp()
    w = gradwatch.watch(m, logdir=tmp_path, every=5)
    train(m, w, 5)
    w.flush()
    first = w.latest
    assert first is not None and first.step == 5
    w.close()  # the window is empty: nothing new is written, latest stays
    w.close()
    assert w.latest is first
    tb = scalars(tmp_path)
    assert sorted(tb["gradwatch/grad_norm/0"]) == [5]


def test_close_flushes_partial_window(tmp_path):
    m = mlp()
    w = gradwatch.watch(m, logdir=tmp_path, every=10)
    train(m, w, 13)
    w.close()
    assert sorted(scalars(tmp_path)["gradwatch/act_mean/1"]) == [10, 13]


def test_rewatch_closes_the_old_watcher_with_a_warning(tmp_path):
    m = mlp()
    w1 = gradwatch.watch(m, logdir=tmp_path / "a", every=100)
    train(m, w1, 3)
    with pytest.warns(UserWarning, match="already watched"):
        w2 = gradwatch.watch(m, logdir=tmp_path / "b", every=100)
    assert w1.latest is not None and w1.latest.step == 3  # flushed on replacement
    assert len(m[0]._forward_hooks) == 1  # hooks did not pile up
    train(m, w2, 2)
    w2.close()
    assert w2.latest.step == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradwatch.watch(m, tensorboard=False).close()  # w2 is closed: no warning


def test_watched_model_saves_pickles_and_copies(tmp_path):
    m = mlp()
    w = gradwatch.watch(m, tensorboard=False, every=100)
    train(m, w, 2)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    unpickled = pickle.loads(pickle.dumps(m))
    dup = copy.deepcopy(m)
    x = torch.randn(3, 4)
    for other in (loaded, unpickled, dup):
        assert torch.equal(other(x), m(x))
        other(x).sum().backward()  # the copies' inert hooks must not feed the watcher
    before = w._buffers.stage.clone()
    assert torch.equal(w._buffers.stage, before)
    train(m, w, 1)
    w.close()
    snap = w.latest
    assert snap.step == 3
    # a copy is not watched: watching it works and does not replace the original's watcher
    w2 = gradwatch.watch(dup, tensorboard=False)
    w2.close()


def test_copy_does_not_write_into_the_original_watcher():
    m = mlp()
    w = gradwatch.watch(m, tensorboard=False, every=100)
    dup = copy.deepcopy(m)
    stage0 = w._buffers.stage.clone()
    for _ in range(3):
        dup(torch.randn(5, 4)).sum().backward()
    assert torch.equal(w._buffers.stage, stage0)
    w.close()
    assert w.latest is None  # no step was ever taken on the watched model


def test_step_with_optimizer_is_an_error():
    m = mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with gradwatch.watch(m, optimizer=opt, tensorboard=False) as w:
        with pytest.raises(RuntimeError, match="optimizer"):
            w.step()


def test_report_lists_layers_and_marks_alerts():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    nn.init.constant_(m[0].bias, -100.0)  # every ReLU unit dead
    w = gradwatch.watch(m, tensorboard=False, every=5, on_alert="ignore")
    train(m, w, 15)
    w.close()
    text = w.report()
    assert "gradwatch report, step 15" in text
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln and ln[0] in "012"}
    assert set(lines) == {"0", "1", "2"}
    assert any(a.kind == "dead" and a.layer == "1" for a in w.alerts)
    assert "1!" in lines["1"].split()  # the dead ReLU's zero fraction is marked
