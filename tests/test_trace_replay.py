"""The non-finite trace replaying its template (trace.Replay): a step that calls the same
modules on the same links as the step before is only checked against that step's record.
Each replayed step must leave exactly the record, and the row values, that the general way
leaves; a step that departs from the template (another branch, an in-place write, more
calls, an evaluation pass) goes on the general way from the call that departs; no tensor is
kept alive longer than the model keeps it; and a NaN on a replayed light step is named as
before, on its step."""

from __future__ import annotations

import gc
import math
import weakref
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn

import gradwatch
from gradwatch import trace as T


def chain() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(inplace=True),
                         nn.Dropout(0.1), nn.Identity(), nn.Linear(16, 16), nn.Sigmoid(),
                         nn.Linear(16, 3))


class Branchy(nn.Module):
    """Skips a block on every third call, and applies one module twice on the others."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.act = nn.Tanh()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = self.act(self.a(x))
        if self.calls % 3:
            h = self.act(self.b(h))
        return self.c(h)


class Embed(nn.Module):
    """Token ids in (no floating input), a padding row of zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Flatten(), nn.Linear(40, 3))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.body(self.emb(ids))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 3))


def batch(name: str, i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    if name == "embed":
        return torch.randint(0, 20, (4, 5), generator=g)
    if name == "cnn":
        return torch.randn(4, 3, 8, 8, generator=g)
    return torch.randn(8, 6, generator=g)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "chain": chain, "branchy": Branchy, "embed": Embed, "cnn": cnn}


def run(name: str, replay: bool, steps: int = 7,
        between: Callable[[nn.Module, int], None] | None = None
        ) -> tuple[list[tuple[Any, ...]], list[list[float]], int]:
    """Train ``name`` for ``steps`` steps as a user does; every record the trace hands over,
    with its rows' values, and how many of them were the template's own record."""
    torch.manual_seed(0)
    model = MODELS[name]()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    w = gradwatch.watch(model, optimizer=opt, tensorboard=False, every=100, sample_every=3)
    tr = w._collector.trace
    if not replay:
        tr._new = _general(tr._new, tr)  # type: ignore[method-assign]
    recs: list[tuple[Any, ...]] = []
    vals: list[list[float]] = []
    replayed = 0
    take = tr.take_record

    def spy() -> T.Record:
        nonlocal replayed
        tmpl = tr._rp
        rec = take()
        replayed += tmpl is not None and rec.calls is tmpl.rec.calls  # matched throughout
        recs.append((list(rec.calls), list(rec.ents), rec.n_rows, list(rec.half), rec.cut))
        vals.append(tr.views(rec)[0].tolist())
        return rec

    tr.take_record = spy  # type: ignore[method-assign]
    for i in range(steps):
        x = batch(name, i)
        loss = model(x).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if between is not None:
            between(model, i)
    w.close()
    return recs, vals, replayed


def _general(new: Callable[[], None], tr: T.StepTrace) -> Callable[[], None]:
    """``StepTrace._new`` with no template: every step the general way."""
    def no_template() -> None:
        tr._tmpl = None
        new()
    return no_template


@pytest.mark.parametrize("name", sorted(MODELS))
def test_replayed_steps_leave_the_records_and_values_of_the_general_way(name: str) -> None:
    general, gvals, none = run(name, replay=False)
    replayed, rvals, n = run(name, replay=True)
    assert none == 0
    assert replayed == general
    assert rvals == gvals  # the same rows hold the same sums
    # every step after the first is the template's (Branchy: only where the branch repeats)
    expect = {"chain": 6, "embed": 6, "cnn": 6, "branchy": 2}[name]
    assert n == expect


def test_an_in_place_write_between_modules_departs_from_the_template() -> None:
    """An evaluation pass by hand, with a write between two modules: the call after it is
    checked again as its input (a new entry), as the general way does."""
    def eval_pass(model: nn.Module, i: int) -> None:
        if i in (3, 4):
            with torch.no_grad():
                h = model[1](model[0](batch("chain", 50 + i)))
                if i == 3:
                    h.mul_(2)
                model[2](h)

    general, gvals, _ = run("chain", replay=False, between=eval_pass)
    replayed, rvals, n = run("chain", replay=True, between=eval_pass)
    assert replayed == general and rvals == gvals
    # steps 1-3; the passes join the records of steps 4 and 5, so step 6 departs too
    assert n == 3


def test_a_replayed_step_keeps_no_tensor_alive_that_the_model_does_not() -> None:
    """Pre-activations that autograd does not save (Linear -> Tanh keeps Tanh's output),
    and the model's output once the loss is made from it, are freed during the forward pass,
    as without gradwatch."""
    def alive_after_forward(watch: bool) -> list[int]:
        torch.manual_seed(0)
        # ending in a Linear: the model's output, which nothing saves for the backward
        model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(8, 8), nn.Tanh())],
                              nn.Linear(8, 8))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        refs: list[weakref.ref[torch.Tensor]] = []
        for lin in model[::2]:
            lin.register_forward_hook(lambda m, a, out: refs.append(weakref.ref(out)))
        w = gradwatch.watch(model, optimizer=opt, tensorboard=False) if watch else None
        counts = []
        for _ in range(4):
            refs.clear()
            loss = model(torch.randn(4, 8)).sum()
            gc.collect()
            counts.append(sum(r() is not None for r in refs))
            opt.zero_grad()
            loss.backward()
            opt.step()
        if w is not None:
            w.close()
        return counts

    bare = alive_after_forward(False)
    assert bare == [0, 0, 0, 0]
    assert alive_after_forward(True) == bare


@pytest.mark.parametrize("what", ["input", "parameters"])
def test_a_nan_on_a_replayed_light_step_is_named_on_its_step(what: str) -> None:
    torch.manual_seed(0)
    model = chain()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    got: list[gradwatch.Alert] = []
    w = gradwatch.watch(model, optimizer=opt, tensorboard=False, every=5, sample_every=5,
                        on_alert=got.append)
    tr = w._collector.trace
    replayed = []
    for i in range(9):
        x = batch("chain", i)
        if i == 7 and what == "input":
            x[2, 1] = math.nan
        if i == 7 and what == "parameters":
            with torch.no_grad():
                model[6].weight[0, 0] = math.nan
        replayed.append(not w._collector.full and tr._rp is not None)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    w.close()
    assert replayed[7]  # step 7 is a light step, replaying step 6
    nan = [a for a in got if a.kind == "nonfinite"]
    assert nan, got
    a = nan[0]
    assert a.step == 8 and a.cause == what  # steps count from 1
    assert a.layer == ("0" if what == "input" else "6")
