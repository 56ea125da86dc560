"""Where a NaN or Inf is born: the origin read from a step's trace (origin.py) on hand-made
traces, and end to end in training loops as users write them (eager and compiled): a
``-inf`` mask is not a fault, a NaN that happens once is named on its step and re-arms,
what a NaN spreads to is counted into its origin, an evaluation forward is checked too."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gradwatch
from gradwatch import origin as O
from gradwatch.record import IN, OUT, Record

NAN, INF = math.nan, math.inf


# -- origin.py on hand-made traces -------------------------------------------------------------
def model_map(names: list[str], parents: dict[str, str], hooked: set[str] = frozenset(),
              params: set[str] = frozenset()) -> O.ModelMap:
    """A ModelMap from names (index = position) and child -> parent names."""
    idx = {n: i for i, n in enumerate(names)}
    anc = []
    for n in names:
        a, p = set(), parents.get(n)
        while p is not None:
            a.add(idx[p])
            p = parents.get(p)
        anc.append(frozenset(a))
    return O.ModelMap(names, ["T"] * len(names), [len(a) for a in anc], anc,
                      [n in params for n in names], [n in hooked for n in names])


class Trace:
    """Builds a Record the way trace.StepTrace does: entries with a row each, calls."""

    def __init__(self) -> None:
        self.rec = Record()
        self.vals: list[float] = []

    def entry(self, m: int, kind: int, value: float) -> int:
        r = self.rec
        k = r.n
        r.ents.append((m, kind, k, len(self.vals)))
        r.n_rows += 1
        self.vals.append(value)
        return k

    def derived(self, m: int, src: int) -> int:
        r = self.rec
        k = r.n
        _, _, first, row = r.ents[src]
        r.ents.append((m, OUT, first, row))
        return k

    def call(self, m: int, ins: tuple[int, ...], outs: tuple[int, ...]) -> None:
        self.rec.calls.append((m, ins, outs))

    def forward(self, mm: O.ModelMap) -> O.Origin | None:
        fv = np.asarray(self.vals, dtype=np.float32)
        return O.forward_origin(self.rec, O.entry_status(self.rec, fv), mm)


# root(0) = Sequential: lin(1) -> act(2) -> custom(3) -> head(4)
CHAIN = ["(root)", "lin", "act", "custom", "head"]
CHAIN_PARENTS = {n: "(root)" for n in CHAIN[1:]}


def chain(values: dict[str, float], batch: float = 1.0) -> Trace:
    t = Trace()
    x = t.entry(1, IN, batch)
    y1 = t.entry(1, OUT, values.get("lin", 1.0))
    t.call(1, (x,), (y1,))
    y2 = t.derived(2, y1)  # an activation that passes finite values on
    t.call(2, (y1,), (y2,))
    y3 = t.entry(3, OUT, values.get("custom", 1.0))
    t.call(3, (y2,), (y3,))
    y4 = t.entry(4, OUT, values.get("head", 1.0))
    t.call(4, (y3,), (y4,))
    t.call(0, (x,), (y4,))
    return t


def test_a_light_step_records_each_call_and_shares_entries_along_a_chain() -> None:
    """The record a light step leaves (one tuple per entry, built in the forward hook; its
    columns built when read): the batch and each output with a sum of its own, the Tanh's
    output derived from its input, an in-place write between modules seen as a new value,
    the root handing on its last child's output."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    taken: list[Record] = []
    w = gradwatch.watch(m, optimizer=opt, tensorboard=False, every=100, sample_every=50)
    trace = w._collector.trace
    take = trace.take_record

    def spy() -> Record:
        rec = take()
        taken.append(rec)
        return rec

    trace.take_record = spy  # type: ignore[method-assign]
    x = torch.randn(3, 4)
    light = []
    for _ in range(2):
        light.append(not w._collector.full)
        opt.zero_grad()
        m(x).sum().backward()
        opt.step()
    with torch.no_grad():  # an evaluation pass: the output of '1' changed in place by hand
        h = m[1](m[0](x))
        h.mul_(2)
        m[2](h)
    ev = trace.rec  # calls of submodules outside a step: still in the record in progress
    w.close()
    assert light == [False, True] and len(taken) >= 2
    rec = taken[1]  # step 1: a light step
    assert rec.ents == [(1, IN, 0, 0), (1, OUT, 1, 1), (2, OUT, 1, 1), (3, OUT, 3, 2)]
    assert (rec.by, rec.kind, rec.src, rec.row) == (
        [1, 1, 2, 3], [IN, OUT, OUT, OUT], [0, 1, 1, 3], [0, 1, 1, 2])
    assert rec.calls == [(1, (0,), (1,)), (2, (1,), (2,)), (3, (2,), (3,)), (0, (0,), (3,))]
    assert rec.n == 4 and rec.n_rows == 3
    rec.ents.append((3, IN, 4, 3))  # columns follow entries added after a read
    assert rec.by == [1, 1, 2, 3, 3] and rec.row[-1] == 3
    # '3' received the Tanh's output after the in-place write: checked again, as its input
    assert ev.ents == [(1, IN, 0, 0), (1, OUT, 1, 1), (2, OUT, 1, 1), (3, IN, 3, 2),
                       (3, OUT, 4, 3)]
    assert ev.calls == [(1, (0,), (1,)), (2, (1,), (2,)), (3, (3,), (4,))]


def test_forward_nan_is_named_at_the_module_that_made_it_from_finite_inputs() -> None:
    mm = model_map(CHAIN, CHAIN_PARENTS, params={"lin", "head"})
    o = chain({"custom": NAN, "head": NAN}).forward(mm)
    assert o is not None and (mm.names[o.module], o.cause, o.stage) == ("custom",
                                                                         "forward_op",
                                                                         "forward")
    assert not o.check_params  # a module without parameters of its own
    o = chain({"lin": NAN, "custom": NAN, "head": NAN}).forward(mm)
    assert o is not None and mm.names[o.module] == "lin" and o.check_params


def test_an_inf_alone_is_no_fault_and_a_nan_made_from_it_leads_back_to_the_inf() -> None:
    mm = model_map(CHAIN, CHAIN_PARENTS, params={"lin", "head"})
    # a -inf mask made by 'lin', taken finite by 'custom' (a softmax): nothing to name
    assert chain({"lin": -INF, "head": 1.0}).forward(mm) is None
    # an overflow in 'lin' that 'custom' turns into NaN: named at the overflow
    o = chain({"lin": INF, "custom": NAN, "head": NAN}).forward(mm)
    assert o is not None and (mm.names[o.module], o.cause) == ("lin", "forward_op")
    assert "overflow" in o.detail and "'custom'" in o.detail


def test_a_nan_batch_is_the_input_named_at_its_first_module() -> None:
    mm = model_map(CHAIN, CHAIN_PARENTS)
    o = chain({"lin": NAN, "custom": NAN, "head": NAN}, batch=NAN).forward(mm)
    assert o is not None and (mm.names[o.module], o.cause) == ("lin", "input")


def test_code_of_a_container_between_its_children_is_named_at_the_container() -> None:
    # block(1) holds lin(2); block's own forward makes a NaN from lin's finite output
    names = ["(root)", "block", "block.lin", "head"]
    mm = model_map(names, {"block": "(root)", "block.lin": "block", "head": "(root)"})
    t = Trace()
    x = t.entry(2, IN, 1.0)
    y = t.entry(2, OUT, 1.0)
    t.call(2, (x,), (y,))
    b = t.entry(1, OUT, NAN)  # the block's output: log(tanh(lin(x)) - 2)
    t.call(1, (x,), (b,))
    h = t.entry(3, OUT, NAN)
    t.call(3, (b,), (h,))
    t.call(0, (x,), (h,))
    o = t.forward(mm)
    assert o is not None and (mm.names[o.module], o.cause) == ("block", "forward_op")


def test_backward_nan_is_named_where_the_gradient_turned_non_finite() -> None:
    mm = model_map(CHAIN, CHAIN_PARENTS, hooked={"(root)", "custom"},
                   params={"lin", "head"})
    rec = Record(g_roles=[[(3, IN)], [(3, OUT)], [(0, OUT)]], fired=[0, 1, 2])
    rec.calls = [(1, (), ()), (2, (), ()), (3, (), ()), (4, (), ()), (0, (), ())]
    pg = [O.FINITE, O.NAN, O.FINITE, O.FINITE, O.FINITE]  # 'lin', below, went NaN
    o = O.backward_origin(rec, {0: O.NAN, 1: O.FINITE, 2: O.FINITE}, pg, mm)
    assert o is not None and (mm.names[o.module], o.cause) == ("custom", "backward_op")
    # the gradient reaching the model's output is already NaN: the loss made it
    o = O.backward_origin(rec, {0: O.NAN, 1: O.NAN, 2: O.NAN}, pg, mm)
    assert o is not None and mm.names[o.module] == "(root)" and "loss" in o.detail


# -- end to end -----------------------------------------------------------------------------------
def step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor | None = None) -> None:
    x = torch.randn(8, 6) if x is None else x
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


class Masked(nn.Module):
    """Self-attention over the 6 features with a causal ``-inf`` mask; ``full`` masks a
    whole row (the softmax of all -inf is NaN)."""

    def __init__(self) -> None:
        super().__init__()
        self.qk = nn.Linear(6, 12)
        self.full = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = self.qk(x).chunk(2, dim=-1)
        scores = q.unsqueeze(2) * k.unsqueeze(1)  # [batch, 6, 6]
        mask = torch.full((6, 6), -math.inf).triu(1)
        if self.full:
            mask[0] = -math.inf
        return (torch.softmax(scores + mask, dim=-1) @ x.unsqueeze(-1)).squeeze(-1)


def test_a_minus_inf_attention_mask_raises_nothing_until_a_row_is_all_masked() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(Masked(), nn.Linear(6, 2))
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    got: list[gradwatch.Alert] = []
    with gradwatch.watch(m, tensorboard=False, every=5, on_alert=got.append):
        for _ in range(10):
            step(m, opt)
        assert got == []
        m[0].full = True
        step(m, opt)
    nf = [a for a in got if a.kind == "nonfinite"]
    assert [(a.layer, a.step, a.cause) for a in nf] == [("0", 11, "forward_op")]
    assert "Masked" in nf[0].message and nf[0].hint


class OnceNaN(nn.Module):
    """``log`` of its input at the calls in ``at`` (NaN where it is negative), else the
    identity; the NaN is replaced by 0 right after, so the loss and the weights stay
    finite: a NaN that happens once and never again."""

    def __init__(self, at: set[int]) -> None:
        super().__init__()
        self.at = at
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.log(x) if self.calls in self.at else x


class Clean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nan_to_num(x, nan=0.0)


@pytest.mark.parametrize("sample_every", [1, 4])
def test_a_nan_that_happens_once_is_named_on_its_step_and_re_arms(sample_every: int) -> None:
    """Re-armed once a step is finite again: a NaN born elsewhere later is a new origin;
    the same origin again within the rate limit (10 windows) is held back and counted."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), OnceNaN({7, 30}), Clean(), nn.Linear(8, 8),
                      OnceNaN({19}), Clean(), nn.Linear(8, 2))
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    got: list[gradwatch.Alert] = []
    with gradwatch.watch(m, tensorboard=False, every=5, sample_every=sample_every,
                         on_alert=got.append):
        for _ in range(35):
            step(m, opt)
    assert all(math.isfinite(p.sum().item()) for p in m.parameters())
    assert [(a.layer, a.step, a.cause) for a in got] == [
        ("1", 7, "forward_op"), ("4", 19, "forward_op")]
    assert "OnceNaN" in got[0].message and "its inputs were finite" in got[0].message
    assert all(a.hint for a in got)


@pytest.mark.parametrize("given", [False, True])
def test_a_nan_batch_with_two_optimizers_is_named_on_its_step(given: bool) -> None:
    """Two optimizers on one model (a body and a head, the found one drives): the trace of
    each forward is read at the first optimizer step after it, before any weight moved."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    body = torch.optim.SGD(m[0].parameters(), lr=0.01)
    head = torch.optim.SGD(m[2].parameters(), lr=0.01)
    got: list[gradwatch.Alert] = []
    with gradwatch.watch(m, optimizer=body if given else None, tensorboard=False, every=5,
                         on_alert=got.append):
        for i in range(12):
            x = torch.randn(4, 6)
            if i == 8:
                x[1, 2] = math.nan
            loss = m(x).pow(2).mean()
            body.zero_grad()
            head.zero_grad()
            loss.backward()
            body.step()
            head.step()
    nf = [a for a in got if a.kind == "nonfinite"]
    assert [(a.layer, a.step, a.cause) for a in nf[:1]] == [("0", 9, "input")]


class Poison(nn.Module):
    """``x * scale``; the scale is set to NaN by the test (a bad checkpoint, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_what_a_nan_spreads_to_is_counted_in_its_origin() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), Poison(), nn.Linear(8, 8), nn.ReLU(),
                      nn.Linear(8, 2))
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    got: list[gradwatch.Alert] = []
    with gradwatch.watch(m, tensorboard=False, every=5, on_alert=got.append):
        for _ in range(3):
            step(m, opt)
        with torch.no_grad():
            m[2].scale[3] = math.nan
        for _ in range(12):  # every weight goes NaN after the first update: one origin
            step(m, opt)
    nf = [a for a in got if a.kind == "nonfinite"]
    assert [(a.layer, a.step, a.cause) for a in nf] == [("2", 4, "parameters")]
    assert "since the update of step 3" in nf[0].message
    assert "learning rate" in nf[0].hint or "checkpoint" in nf[0].hint


def test_an_evaluation_forward_is_checked_as_it_runs() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), OnceNaN({3}), nn.Linear(8, 2))
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    got: list[gradwatch.Alert] = []
    with gradwatch.watch(m, tensorboard=False, every=50, on_alert=got.append):
        step(m, opt)
        step(m, opt)
        m.eval()
        with torch.no_grad():
            m(torch.randn(8, 6))  # the third call of OnceNaN: NaN, no step follows
        assert [(a.layer, a.cause) for a in got] == [("1", "forward_op")]


class Switch(nn.Module):
    """A NaN made from a tensor switch (no Python state: compiled code is not retraced)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("bad", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.log(1.0 - 2.0 * self.bad)  # log(-1) = NaN when bad == 1


class WhereSqrt(nn.Module):
    """``where(x > 0, sqrt(x), 0)``: finite forward, NaN gradient below it (0 * inf)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("bad", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        safe = torch.where(self.bad > 0, x, x.clamp_min(1e-6))
        return torch.where(x > 0, safe.sqrt(), torch.zeros_like(x))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("case", ["forward", "backward"])
def test_compiled_code_names_the_same_origin(mode: str, case: str) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    mod = Switch() if case == "forward" else WhereSqrt()
    m = nn.Sequential(nn.Linear(6, 8), mod, nn.Linear(8, 2))
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    got: list[gradwatch.Alert] = []
    w = gradwatch.watch(m, tensorboard=False, every=4, sample_every=2, on_alert=got.append)
    f = m if mode == "eager" else torch.compile(m, backend="aot_eager")
    for i in range(8):
        if i == 5:
            mod.bad.fill_(1.0)
        loss = F.mse_loss(f(torch.randn(8, 6)), torch.zeros(8, 2))
        opt.zero_grad()
        loss.backward()
        opt.step()
    w.close()
    nf = [(a.layer, a.step, a.cause) for a in got if a.kind == "nonfinite"]
    cause = "forward_op" if case == "forward" else "backward_op"
    assert nf == [("1", 6, cause)]
