"""Where a NaN or Inf was born: a pure host-side reading of one step's trace.

Runs only when a step held a NaN somewhere (its forward outputs, its gradients, its
parameter gradients): a healthy step costs one vectorised ``isnan`` over the copied rows.

* **Forward**: the origin is the innermost module whose output went non-finite while its
  inputs (and, for ``"parameters"``, its own weights) were finite. Completion order is
  innermost first (a child's forward hook runs before its parent's), so the first call whose
  output holds a NaN its inputs did not is the innermost one. Inf alone is not a fault (a
  ``-inf`` attention mask before a softmax is legitimate): when the NaN was made from an
  Inf, the chain is followed back to the module that made the Inf from finite values (an
  overflow), or to the batch.
* **Backward**: the origin is the innermost hooked module whose output gradient was finite
  and whose input gradient, or a parameter gradient below it, is not. Modules whose backward
  cannot make NaN from finite values (``selection.grad_safe``) are not hooked; a NaN first
  seen in the parameter gradients of such a module is named there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch.nn as nn

from gradwatch.record import IN, OUT, Record

FINITE, INF, NAN, UNKNOWN = 0, 1, 2, 3  # UNKNOWN: an Inf handed through a skipped module


@dataclass(frozen=True)
class ModelMap:
    """Static facts about every module of the model, by module index (``named_modules()``
    order; 0 is the root)."""

    names: Sequence[str]
    types: Sequence[str]
    depth: Sequence[int]
    ancestors: Sequence[frozenset[int]]
    owns_params: Sequence[bool]
    hooked: list[bool]  # gradients hooked (``assembly.Parts.hooked``, the trace's list)

    @classmethod
    def build(cls, modules: Sequence[tuple[str, nn.Module]], hooked: list[bool]) -> ModelMap:
        """From ``named_modules()`` pairs (the root first); containment follows each
        module's children, so a module shared by two parents has both as ancestors.
        ``hooked`` is kept as given (the trace's list, which it updates)."""
        index = {id(m): i for i, (_, m) in enumerate(modules)}
        parents: list[set[int]] = [set() for _ in modules]
        for i, (_, m) in enumerate(modules):
            for child in m._modules.values():
                j = index.get(id(child))
                if j is not None and j != i:
                    parents[j].add(i)
        ancestors: list[frozenset[int]] = []
        depth: list[int] = []
        for i in range(len(modules)):
            seen: set[int] = set()
            todo = list(parents[i])
            while todo:
                p = todo.pop()
                if p not in seen:
                    seen.add(p)
                    todo.extend(parents[p])
            ancestors.append(frozenset(seen))
            depth.append(len(seen))
        return cls(
            names=[n for n, _ in modules],
            types=[type(m).__name__ for _, m in modules],
            depth=depth,
            ancestors=ancestors,
            owns_params=[any(p is not None for p in m._parameters.values())
                         for _, m in modules],
            hooked=hooked,
        )

    def children_first(self) -> tuple[int, ...]:
        """Every module, each after its descendants (siblings in registration order): the
        order forward hooks complete in for containers that call their children in order."""
        out: list[int] = []
        seen: set[int] = set()
        kids: dict[int, list[int]] = {i: [] for i in range(len(self.names))}
        for i, anc in enumerate(self.ancestors):
            if anc:
                kids[max(anc, key=lambda a: self.depth[a])].append(i)

        def visit(i: int) -> None:
            stack = [(i, False)]
            while stack:
                j, done = stack.pop()
                if done:
                    if j not in seen:
                        seen.add(j)
                        out.append(j)
                    continue
                stack.append((j, True))
                stack.extend((k, False) for k in reversed(kids[j]))

        for i in range(len(self.names)):
            if not self.ancestors[i]:
                visit(i)
        return tuple(out)

    def innermost(self, mods: set[int]) -> list[int]:
        """The modules of ``mods`` that contain no other module of ``mods``."""
        inner = set(mods)
        for m in mods:
            inner -= self.ancestors[m]
        return [m for m in mods if m in inner]


@dataclass
class Origin:
    """One non-finite event's origin. ``module``: index in ``ModelMap``; ``cause``: an
    ``alerts.CAUSES`` value; ``stage``: "forward" or "backward"; ``detail``: what was
    finite and what was not, in words; ``check_params``: the module owns parameters and
    ``cause`` is provisional until they are checked (forward_op vs parameters)."""

    module: int
    cause: str
    stage: str
    detail: str
    check_params: bool = False
    weak: bool = False  # named without a hooked gradient that shows where it turned
    entry: int = -1  # the forward entry holding the Inf born there (-1: none)
    # with ``check_params``: the origin when the module's parameters are finite (its NaN
    # was made from an Inf input, e.g. an additive -inf attention mask passed in)
    alt: Origin | None = None


def status(v: np.ndarray) -> np.ndarray:
    """FINITE / INF / NAN per fp32 sum (a sum is NaN when a NaN is in the tensor, or
    infinities of both signs; ±Inf when infinities of one sign are)."""
    out = np.zeros(v.shape, dtype=np.int8)
    out[np.isinf(v)] = INF
    out[np.isnan(v)] = NAN
    return out


def entry_status(rec: Record, fv: np.ndarray) -> np.ndarray:
    """Status of every forward entry: its row's, except that an Inf handed on by a module
    that was not summed may have become NaN there (GELU(-inf) is NaN): UNKNOWN."""
    if not rec.n:
        return np.zeros(0, dtype=np.int8)
    st = status(fv)[np.asarray(rec.row, dtype=np.int64)]
    derived = np.asarray(rec.src, dtype=np.int64) != np.arange(rec.n)
    st[derived & (st == INF)] = UNKNOWN
    return st


class _Calls:
    def __init__(self, rec: Record, st: np.ndarray, mm: ModelMap) -> None:
        self.rec, self.st, self.mm = rec, st, mm
        self.producer: dict[int, int] = {}  # own OUT entry -> index of the call that made it
        for ci, (_, _, outs) in enumerate(rec.calls):
            for k in outs:
                self.producer.setdefault(rec.src[k], ci)
        called = {m for m, _, _ in rec.calls}
        self.called = called
        top = [c for c in rec.calls if not (mm.ancestors[c[0]] & called)]
        self.top_inputs = {rec.src[k] for _, ins, _ in top for k in ins}

    def enclosing(self, m: int) -> int:
        """The innermost called module that contains ``m`` (the code that made a tensor
        ``m`` received); ``m`` itself when none does."""
        outer = [a for a in self.mm.ancestors[m] if a in self.called]
        return max(outer, key=lambda a: self.mm.depth[a]) if outer else m

    def inner_inf(self, m: int) -> int | None:
        """An output entry of a submodule of ``m`` holding Inf (or an Inf handed on), made
        in this step: where a NaN that ``m`` returns from finite inputs may have come from."""
        rec, st, mm = self.rec, self.st, self.mm
        for c, _, outs in rec.calls:
            if c != m and m in mm.ancestors[c]:
                for k in outs:
                    if st[k] in (INF, UNKNOWN):
                        return k
        return None

    def bad_input(self, host: int, k0: int) -> int | None:
        """A non-finite input entry of a call of ``host`` other than ``k0``'s own: the
        value ``host``'s code handed to a submodule came from what ``host`` received
        (keyword inputs included), not from code of its own."""
        if host == self.rec.by[k0]:
            return None
        rec, st = self.rec, self.st
        want = st[k0]
        for m, ins, _ in rec.calls:
            if m == host:
                bad = [k for k in ins if rec.src[k] != k0 and st[k] != FINITE]
                if bad:
                    return next((k for k in bad if st[k] == want), bad[0])
        return None

    def follow_inf(self, e: int) -> Origin:
        """Back from a non-finite input entry to where it was born."""
        rec, st, mm = self.rec, self.st, self.mm
        seen: set[int] = set()
        while True:
            k0 = rec.src[e]
            if k0 in seen:  # cannot happen (entries refer to earlier ones); stay safe
                break
            seen.add(k0)
            if rec.kind[k0] == IN:
                r = rec.by[k0]
                if k0 in self.top_inputs:
                    return Origin(r, "input", "forward",
                                  f"the model's input holds {_word(st[e])}, first received by "
                                  f"{_q(mm.names[r])}")
                host = self.enclosing(r)
                fed = self.bad_input(host, k0)
                if fed is not None:  # the host received it (a batch passed by keyword)
                    e = fed
                    continue
                return Origin(host, "forward_op", "forward",
                              f"{_word(st[e])} made by code in the forward of "
                              f"{_q(mm.names[host])} outside its submodules, handed to "
                              f"{_q(mm.names[r])}", check_params=False)
            ci = self.producer.get(k0)
            if ci is None:
                break
            m, ins, _ = rec.calls[ci]
            bad = [k for k in ins if st[k] != FINITE]
            if not bad:
                return Origin(m, "forward_op", "forward", INF_BORN,
                              check_params=mm.owns_params[m], entry=k0)
            e = bad[0]
        return Origin(rec.by[rec.src[e]], "unknown", "forward", "origin not traced")


#: How an Inf born in a module from finite inputs is described before its dtype and sign
#: are known (``nonfinite.py`` says which: a float16 overflow, log of 0, ...).
INF_BORN = "its output holds Inf from finite inputs (an overflow)"


def _word(s: int) -> str:
    return {NAN: "NaN", INF: "Inf", UNKNOWN: "Inf"}.get(int(s), "finite values")


def _q(name: str) -> str:
    return f"'{name}'"


def forward_origin(rec: Record, st: np.ndarray, mm: ModelMap) -> Origin | None:
    """The origin of the first NaN of the forward pass (``st``: ``entry_status``)."""
    calls = _Calls(rec, st, mm)
    for m, ins, outs in rec.calls:
        if not any(st[k] == NAN for k in outs):
            continue
        in_st = [st[k] for k in ins]
        if any(s in (NAN, UNKNOWN) for s in in_st):
            continue
        if all(s == FINITE for s in in_st):
            inner = calls.inner_inf(m)
            if inner is not None:  # a submodule made an Inf that became NaN inside ``m``
                o = calls.follow_inf(inner)
                if o.cause != "input" and o.module != m:
                    at = next((c for c, _, outs in rec.calls if m in mm.ancestors[c]
                               and any(st[k] == NAN for k in outs)), m)
                    o.detail += f"; the Inf turned into NaN in {_q(mm.names[at])}"
                return o
            what = "its inputs were finite" if ins else "it has no tensor inputs"
            return Origin(m, "forward_op", "forward", f"its output holds NaN; {what}",
                          check_params=mm.owns_params[m])
        # NaN from an input holding Inf: name where the Inf came from, unless the module's
        # own weights were NaN (an Inf mask passed to a module whose weights went bad)
        e = next(k for k in ins if st[k] == INF)
        o = calls.follow_inf(e)
        if o.cause != "input" and o.module != m:
            o.detail += f"; the Inf turned into NaN in {_q(mm.names[m])}"
        if mm.owns_params[m] and o.module != m:
            return Origin(m, "forward_op", "forward", "its output holds NaN; an input held "
                          "Inf", check_params=True, alt=o)
        return o
    # every NaN output had a NaN input: a NaN entry first seen as an input
    for k, (kind, s) in enumerate(zip(rec.kind, st)):
        if kind == IN and s == NAN and rec.src[k] == k:
            return calls.follow_inf(k)
    # NaN only behind an Inf handed through a skipped module (GELU(-inf))
    for m, ins, outs in rec.calls:
        if any(st[k] == NAN for k in outs):
            u = next((k for k in ins if st[k] == UNKNOWN), None)
            if u is not None:
                o = calls.follow_inf(u)
                if o.cause != "input":
                    o.detail += (f"; a module between it and {_q(mm.names[m])} turned the "
                                 "Inf into NaN")
                return o
            return Origin(m, "unknown", "forward", "its output holds NaN; origin not traced")
    return None


def backward_origin(rec: Record, gst: dict[int, int], pg_own: Sequence[int],
                    mm: ModelMap) -> Origin | None:
    """The origin of a NaN gradient. ``gst``: status per gradient entry that arrived;
    ``pg_own``: per module, the status of its own parameters' gradients (FINITE when it has
    none or none arrived)."""
    n = len(mm.names)
    og = [-1] * n  # -1: not hooked or no gradient arrived
    ig = [-1] * n
    for j, s in gst.items():
        for m, role in rec.g_roles[j]:
            if role == OUT:
                og[m] = max(og[m], s)
            else:
                ig[m] = max(ig[m], s)
    sub = list(pg_own)  # subtree status: own or any descendant's parameter gradients
    for m in range(n):
        if pg_own[m] == NAN:
            for a in mm.ancestors[m]:
                sub[a] = NAN
    order = []
    seen: set[int] = set()
    for m, _, _ in rec.calls:
        if m not in seen:
            seen.add(m)
            order.append(m)
    cand = {m for m in range(n) if og[m] == FINITE and (ig[m] >= INF or sub[m] == NAN)}
    if cand:
        inner = mm.innermost(cand)
        m = max(inner, key=lambda x: order.index(x) if x in seen else -1)
        parts = ["the gradient at its output was finite"]
        if ig[m] >= INF:
            parts.append(f"the gradient at its input holds {_word(ig[m])}")
        if sub[m] == NAN:
            parts.append("parameter gradients " + ("of its own" if pg_own[m] == NAN
                                                   else "below it") + " hold NaN")
        return Origin(m, "backward_op", "backward", "; ".join(parts))
    root = 0
    if og[root] == NAN:
        return Origin(root, "backward_op", "backward",
                      "the gradient arriving at the model's output already holds NaN: it "
                      "was made by the loss (code after the model)", weak=True)
    # no hooked module shows it: the module nearest the loss whose own parameter gradients
    # are not finite (an Inf there, an overflow, often turns into NaN just below it)
    bad = [m for m in order if pg_own[m] >= INF]
    if bad:
        m = bad[-1]
        what = "NaN" if pg_own[m] == NAN else "Inf (or overflowed)"
        return Origin(m, "backward_op", "backward",
                      f"its parameter gradients hold {what}; no hooked gradient above it did",
                      weak=True)
    bad_any = [m for m in range(n) if og[m] == NAN or ig[m] == NAN]
    if bad_any:
        return Origin(bad_any[0], "unknown", "backward", "a gradient holds NaN; origin "
                      "not traced", weak=True)
    return None


def loss_origin(rec: Record, st: np.ndarray, gst: dict[int, int],
                mm: ModelMap) -> Origin | None:
    """The gradients went non-finite and the model returned an Inf (no NaN in the
    forward): the Inf reached the loss, unless the gradient arriving at that output was
    seen finite (the loss ignored it: a masked log-probability). Named where the Inf was
    born."""
    calls = _Calls(rec, st, mm)
    finite_at: set[int] = set()  # entries whose gradient arrived finite
    for j, s in gst.items():
        if s == FINITE:
            for m, role in rec.g_roles[j]:
                if role == OUT:
                    finite_at.add(m)
    for m, _, outs in rec.calls:
        if mm.ancestors[m] & calls.called or m in finite_at:
            continue  # not the model's output, or absorbed by the loss
        e = next((k for k in outs if st[k] in (INF, UNKNOWN)), None)
        if e is not None:
            o = calls.follow_inf(e)
            if o.cause == "unknown":
                return None
            o.detail += "; the Inf reached the loss"
            return o
    return None


def module_origin(flags: np.ndarray, order: Sequence[int], pg_own: Sequence[int],
                  mm: ModelMap) -> Origin | None:
    """The same naming from per-module counts (code that ``torch.compile`` traced, see
    ``modflags.ModuleFlags``): ``flags[m]`` = NaN/Inf among outputs, among inputs, NaN in the
    gradients at the outputs and at the inputs; ``order``: modules in completion order."""
    from gradwatch.modflags import (
        M_IG_NAN,
        M_IN_INF,
        M_IN_NAN,
        M_OG_NAN,
        M_OUT_INF,
        M_OUT_NAN,
    )

    if flags[:, [M_OUT_NAN, M_IN_NAN]].any():
        for m in order:
            f = flags[m]
            if f[M_OUT_NAN] and not f[M_IN_NAN]:
                if f[M_IN_INF]:  # NaN from Inf: the module before it that made the Inf
                    i = list(order).index(m)
                    inf = [a for a in order[:i] if flags[a, M_OUT_INF]
                           and not flags[a, M_IN_INF] and not flags[a, M_IN_NAN]]
                    if inf:
                        a = inf[-1]
                        return Origin(a, "forward_op", "forward",
                                      INF_BORN + f"; the Inf turned into NaN in "
                                      f"'{mm.names[m]}'",
                                      check_params=mm.owns_params[a])
                return Origin(m, "forward_op", "forward", "its output holds NaN; its inputs "
                              "were finite", check_params=mm.owns_params[m])
        called = set(order)
        for m in order:  # NaN arriving from outside: the batch
            if flags[m, M_IN_NAN] and not (mm.ancestors[m] & called) or (
                    flags[m, M_IN_NAN] and m == order[0]):
                return Origin(m, "input", "forward", f"the model's input holds NaN, first "
                              f"received by '{mm.names[m]}'")
    n = len(mm.names)
    cand = set()
    for m in range(n):
        if not mm.hooked[m] or flags[m, M_OG_NAN]:
            continue
        sub_nan = pg_own[m] == NAN or any(pg_own[d] == NAN for d in range(n)
                                          if m in mm.ancestors[d])
        if flags[m, M_IG_NAN] or sub_nan:
            cand.add(m)
    pos = {m: i for i, m in enumerate(order)}
    if cand:
        inner = mm.innermost(cand)
        m = max(inner, key=lambda x: pos.get(x, -1))
        return Origin(m, "backward_op", "backward",
                      "the gradient at its output was finite; the gradient at its input or "
                      "a parameter gradient below it holds NaN")
    bad = [m for m in order if pg_own[m] == NAN]
    if bad:
        return Origin(bad[-1], "backward_op", "backward",
                      "its parameter gradients hold NaN; no hooked gradient above it did")
    return None
