"""torch.compile: the same stats as eager, no graph breaks, no recompiles per step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import gradwatch

torch_dynamo = pytest.importorskip("torch._dynamo")
STEPS = 4


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 4))


def _x(step: int) -> torch.Tensor:
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(step))


def _train(mode: str, backend: str = "aot_eager", sample_every: int = 1,
           after_warmup: int | None = None) -> dict[str, dict[str, float]]:
    torch._dynamo.reset()
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    kw = dict(optimizer=opt, tensorboard=False, every=1000, sample_every=sample_every)
    if mode == "eager":
        f, w = m, gradwatch.watch(m, **kw)
    elif mode == "compile_watched":
        w = gradwatch.watch(m, **kw)
        f = torch.compile(m, backend=backend)
    elif mode == "watch_compiled":
        f = torch.compile(m, backend=backend)
        w = gradwatch.watch(f, **kw)
    elif mode == "watch_after_compiled_step":
        f = torch.compile(m, backend=backend)
        f(_x(99)).sum().backward()  # a compiled training call before watching
        opt.zero_grad()
        w = gradwatch.watch(f, **kw)
    else:
        raise AssertionError(mode)
    for step in range(STEPS):
        if after_warmup is not None and step == after_warmup:
            torch._dynamo.config.error_on_recompile = True
        try:
            f(_x(step)).pow(2).mean().backward()
        finally:
            torch._dynamo.config.error_on_recompile = False
        opt.step()
        opt.zero_grad()
    snap = w.flush()
    w.close()
    assert snap is not None
    return snap.stats


def _assert_same(got: dict, ref: dict) -> None:
    assert got.keys() == ref.keys()
    for layer, stats in ref.items():
        for s, v in stats.items():
            assert not math.isnan(got[layer][s]), (layer, s)
            assert got[layer][s] == pytest.approx(v, rel=1e-3, abs=1e-6), (layer, s)


@pytest.mark.parametrize("mode", ["compile_watched", "watch_compiled",
                                  "watch_after_compiled_step"])
def test_compiled_stats_equal_eager(mode):
    _assert_same(_train(mode), _train("eager"))


def test_sampled_steps_compile_two_variants_then_never_again():
    """sample_every=2 alternates two traced variants; after both exist: no recompile."""
    _assert_same(_train("compile_watched", sample_every=2, after_warmup=3),
                 _train("eager", sample_every=2))


def test_no_recompile_per_step():
    # step 0 traces, step 1 retraces once (first-call bookkeeping), then never again
    _train("compile_watched", after_warmup=2)


def test_hooks_add_no_graph_breaks():
    torch._dynamo.reset()
    m = _model()
    w = gradwatch.watch(m, tensorboard=False)
    out = torch._dynamo.explain(m)(_x(0))
    with pytest.warns(UserWarning, match="no training step"):  # explain() ran, nothing stepped
        w.close()
    assert out.graph_break_count == 0, out.break_reasons
    assert out.graph_count == 1
    # control: a hook that reads a value on the host does break the graph
    torch._dynamo.reset()
    m2 = _model()
    m2[0].register_forward_hook(lambda mod, a, o: None if o.sum().item() else None)
    assert torch._dynamo.explain(m2)(_x(0)).graph_break_count > 0


def test_closed_watcher_is_inert_in_compiled_code():
    torch._dynamo.reset()
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w = gradwatch.watch(m, optimizer=opt, tensorboard=False)
    f = torch.compile(m, backend="aot_eager")
    f(_x(0)).sum().backward()
    opt.step()
    w.close()
    window = w._buffers.window.clone()
    f(_x(1)).sum().backward()
    opt.step()
    assert torch.equal(w._buffers.window, window)
    assert torch.count_nonzero(w._buffers.stage) == 0


@pytest.mark.slow
def test_inductor_stats_equal_eager():
    _assert_same(_train("watch_compiled", backend="inductor"), _train("eager"))


def test_is_compiled_sees_through_wrappers():
    from gradwatch.compiled import is_compiled

    m = _model()
    assert not is_compiled(m)
    assert is_compiled(torch.compile(m, backend="eager"))
    assert is_compiled(nn.DataParallel(torch.compile(m, backend="eager")))
    m2 = _model()
    m2.compile(backend="eager")
    assert is_compiled(m2)
