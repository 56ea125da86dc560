"""The initialization audit placed in the forward order: each audited layer's excess over
the Glorot/He range and the growth of a signal's scale along its path.

Pure host code for the diagnosis (``diagnosis.py``): the audit (``audit.py``) measured the
weights at ``watch()``; the forward order says which activation follows each layer and
where a path starts over (a normalization, recurrent or unaudited layer). See
docs/diagnosis.md, "The scale of a path".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Container, Iterable, Mapping, Sequence

from gradwatch.alerts import fmt
from gradwatch.audit import InitAudit, WeightScale
from gradwatch.selection import LayerInfo
from gradwatch.structure import Graph

#: The gain range assumed when the activation after a layer is not known (a function call
#: in ``forward``, an activation without a ``calculate_gain`` entry, or the forward order
#: not seen yet): linear/sigmoid to tanh, so that any standard initialization for some
#: activation counts as sound.
UNKNOWN_GAIN = (1.0, 5.0 / 3.0)


def excess(w: WeightScale, gain: float | None) -> float:
    """A weight's std over the top of the range of the standard inits (Glorot, He on the
    fan-in, He on the fan-out) for ``gain`` (> 1), over its bottom (< 1), or 1 inside it."""
    lo_g, hi_g = (gain, gain) if gain else UNKNOWN_GAIN
    refs = w.reference(1.0)
    lo, hi = lo_g * min(refs), hi_g * max(refs)
    if w.std > hi:
        return w.std / hi
    if w.std < lo:
        return w.std / lo
    return 1.0


@dataclass(frozen=True)
class Scale:
    """One audited layer placed in the forward order."""

    name: str
    w: WeightScale
    act: str | None  # the activation module after it (its type name), None if not known
    nonlinearity: str | None  # its torch.nn.init name ("relu", "tanh"...)
    gain: float | None
    excess: float
    segment: int  # layers of one segment are between the same two resets of the scale
    growth: float  # excess compounded from the segment start (bounded activations cap it)

    def reference(self) -> tuple[str, float]:
        """The reference init to name: He for the ReLU family, Glorot otherwise."""
        glorot, he_in, _ = self.w.reference(self.gain or 1.0)
        if self.nonlinearity in ("relu", "leaky_relu", "selu"):
            return "He", he_in
        return "Glorot", glorot

    def remedy(self) -> str:
        """The ``torch.nn.init`` call for the activation after it."""
        if self.nonlinearity in ("relu", "leaky_relu"):
            return f"nn.init.kaiming_normal_(w, nonlinearity='{self.nonlinearity}')"
        if self.nonlinearity in ("tanh", "selu"):
            return (f"nn.init.xavier_uniform_(w, "
                    f"gain=nn.init.calculate_gain('{self.nonlinearity}'))")
        if self.nonlinearity == "sigmoid":
            return "nn.init.xavier_uniform_(w)"
        return ("nn.init.xavier_uniform_(w) (tanh, sigmoid, linear) or "
                "nn.init.kaiming_normal_(w) (ReLU family)")

    def describe(self) -> str:
        ref, std = self.reference()
        before = f" before a {self.act}" if self.act else ""
        return (f"weights of '{self.name}' had std {fmt(self.w.std)} at watch(), "
                f"{fmt(self.w.std / std)}x the {ref} std {fmt(std)} for "
                f"{self.w.fan_in} -> {self.w.fan_out}{before}")


@dataclass
class Paths:
    """The audited layers of one forward order. ``confirmed``: the order was seen in a
    window (else it is the registration order, and no activation is taken as known)."""

    order: list[str] = field(default_factory=list)
    scales: dict[str, Scale] = field(default_factory=dict)
    index: dict[str, int] = field(default_factory=dict)
    confirmed: bool = False
    #: from the model's real dataflow (``place_on_graph``): the transforms feeding each
    #: transform's input, and the scale of the signal entering each normalization layer
    producers: dict[str, frozenset[str]] = field(default_factory=dict)
    norm_in: dict[str, float] = field(default_factory=dict)
    on_graph: bool = False

    @classmethod
    def place(cls, order: Sequence[str], audit: InitAudit, info: Mapping[str, LayerInfo],
              confirmed: bool) -> Paths:
        """Walk the order: each audited layer gets the activation after it, its excess,
        its segment and the growth from the segment start. A normalization layer, a
        recurrent layer or any other layer with parameters that is not audited starts a new
        segment; a bounded activation caps the growth at 1 (it lets a shrink through)."""
        scales: dict[str, Scale] = {}
        seg, growth = 0, 1.0
        for i, name in enumerate(order):
            li = info.get(name)
            # a weight audited by its shape alone waits for its use (the dataflow)
            w = audit.scales.get(name) if name not in audit.by_shape else None
            if w is not None:
                nxt = order[i + 1] if i + 1 < len(order) else None
                act = audit.gains_of.get(nxt) if nxt is not None and confirmed else None
                if audit.unseen_norms:  # a normalization we cannot place: layers alone
                    seg, growth = seg + 1, 1.0
                r = excess(w, act[1] if act else None)
                growth *= r
                scales[name] = Scale(name, w, info[nxt].type_name if act and nxt else None,
                                     act[0] if act else None, act[1] if act else None, r,
                                     seg, growth)
            elif li is not None and li.bounds is not None:
                growth = min(growth, 1.0)
            elif name in audit.norms or name in audit.gains or (li is not None
                                                                 and li.has_params):
                seg, growth = seg + 1, 1.0
        return cls(list(order), scales, {n: i for i, n in enumerate(order)}, confirmed)

    def segment(self, s: Scale) -> list[Scale]:
        return [x for x in self.scales.values() if x.segment == s.segment]

    def before(self, name: str) -> str | None:
        """The module feeding ``name``: from the dataflow where known and unambiguous,
        else the module called just before it (in a chain, the same)."""
        fed = self.producers.get(name)
        if fed is not None and len(fed) == 1:
            return next(iter(fed))
        i = self.index.get(name)
        return self.order[i - 1] if i else None

    def path_product(self, s: Scale) -> float:
        """The scale of the signal along ``s``'s path: the product of the excesses of its
        segment in a chain; on the dataflow, the smallest scale reached in the segment
        (parallel branches are not multiplied, a residual sum keeps the larger term)."""
        if self.on_graph:
            return min(x.growth for x in self.segment(s))
        return math.prod(x.excess for x in self.segment(s))

    def weights_before(self, name: str) -> list[Scale]:
        """The audited layers whose output reaches ``name`` without passing a normalization
        layer (on the dataflow; [] without it)."""
        return [self.scales[n] for n in self._reach(name, self.producers, self.norm_in)
                if n in self.scales]

    def weights_after(self, name: str) -> list[Scale]:
        """The audited layers that the output of ``name`` reaches without passing a
        normalization layer (on the dataflow; [] without it): the gradient reaching
        ``name`` comes back through them."""
        return [self.scales[n] for n in self._reach(name, self._users(), self.norm_in)
                if n in self.scales]

    def norms_after(self, name: str) -> list[tuple[str, float]]:
        """The normalization layers that the output of ``name`` reaches (through other
        transforms, not through a normalization), with the scale of the signal entering
        each: a normalization divides the gradient that it passes back by that scale."""
        if not self.on_graph:
            return []
        return [(n, self.norm_in[n]) for n in self._reach(name, self._users(), self.norm_in)
                if n in self.norm_in]

    def _users(self) -> dict[str, set[str]]:
        users: dict[str, set[str]] = {}
        for t, fed in self.producers.items():
            for p in fed:
                users.setdefault(p, set()).add(t)
        return users

    @staticmethod
    def _reach(name: str, edges: Mapping[str, Iterable[str]],
               stop: Container[str]) -> list[str]:
        """The layers reached from ``name`` along ``edges`` (breadth of a walk, each once),
        not walking on past a layer in ``stop`` (a normalization)."""
        seen, todo, out = {name}, [name], []
        while todo:
            for n in edges.get(todo.pop(), ()):
                if n in seen:
                    continue
                seen.add(n)
                out.append(n)
                if n not in stop:
                    todo.append(n)
        return out


# -- the model's real dataflow ------------------------------------------------------------------
_ADD = ("AddBackward", "SubBackward")
#: ops whose output is bounded whatever their input's scale (``tanh`` inside a GELU, the
#: gate of a GLU): they cap the scale at 1
_BOUNDED = ("Tanh", "Sigmoid", "Erf", "Clamp", "Hardtanh", "Hardsigmoid")
_MUL = ("MulBackward", "BmmBackward", "MmBackward", "MatmulBackward", "BaddbmmBackward",
        "AddmmBackward", "UnsafeViewBackward_mm")


def _combine(op: str, vals: Sequence[float]) -> float:
    """The scale of an autograd node's output from its signal inputs' scales."""
    if any(b in op for b in _BOUNDED):
        return min(max(vals), 1.0)
    if op.startswith(_MUL) and len(vals) >= 2:
        return math.prod(vals)
    return max(vals)  # a sum, a concatenation, a view, an elementwise function


class _UnionFind:
    def __init__(self) -> None:
        self.up: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.up.setdefault(x, x)
        while self.up[x] != x:
            self.up[x] = self.up[self.up[x]]
            x = self.up[x]
        return x

    def union(self, a: str, b: str) -> None:
        self.up[self.find(a)] = self.find(b)


def _bounded(info: Mapping[str, LayerInfo], name: str) -> bool:
    li = info.get(name)
    return li is not None and li.bounds is not None


def _layer_value(name: str, g_in: float, audit: InitAudit, info: Mapping[str, LayerInfo],
                 norm_in: dict[str, float], factor: Mapping[str, float]) -> float:
    """The gain on the output row of the transform ``name`` whose inputs carry ``g_in``:
    a scaled layer multiplies it by its ``factor`` (its excess), a normalization resets it
    to its own scale (recording the gain it received in ``norm_in``), an embedding starts
    from its own scale, a bounded activation caps it at 1, an audited activation passes it
    on, any other layer with parameters starts over."""
    if name in factor:
        return g_in * factor[name]
    if name in audit.norms:
        norm_in[name] = max(norm_in.get(name, 0.0), g_in)
        return audit.norm_scales.get(name, 1.0)
    if name in audit.embeddings:
        return max(audit.embeddings[name], 1.0)
    if _bounded(info, name):
        return min(g_in, 1.0)
    if name in audit.gains_of:
        return g_in
    return 1.0


def _resets(op: str) -> bool:
    """A softmax or a normalization written as code: its output's scale is its own."""
    return "Softmax" in op or "Norm" in op


def _op_value(op: str, vals: Sequence[float]) -> float:
    return 1.0 if _resets(op) else _combine(op, vals)


def place_on_graph(order: Sequence[str], audit: InitAudit, info: Mapping[str, LayerInfo],
                   graph: Graph) -> Paths:
    """``Paths`` from the model's real dataflow: the scale of the signal is followed
    through the autograd graph of one forward. A weight layer multiplies it by its excess;
    a normalization sets it to its own scale; a softmax, a recurrent layer or any other
    layer with parameters starts it over at 1; a bounded activation caps it at 1; a
    residual sum takes the larger of its terms (the sum carries the signal around a
    branch that shrinks it); a product of two signals multiplies them; parallel branches
    (q, k, v) each start from their common input, never from each other. Layers belong to
    one segment when one feeds the other without a reset between them."""
    def used_as_map(name: str) -> bool:  # a weight audited by its shape alone
        if name not in audit.by_shape:
            return True
        w, d = audit.scales[name], graph.dims.get(name)
        return d is not None and sorted(d) == sorted((w.fan_in, w.fan_out))

    maps = {name: 1.0 for name in audit.scales if used_as_map(name)}  # excess unknown yet
    transform = set(maps) | set(audit.embeddings) | \
        set(audit.norms) | set(audit.gains) | set(audit.gains_of) | \
        {n for n, li in info.items() if li.bounds is not None or li.has_params}
    n = len(graph.ops)
    val: list[float] = [1.0] * n
    feeds: list[frozenset[str]] = [frozenset()] * n  # the transforms each row comes from
    seg_of: list[frozenset[str]] = [frozenset()] * n  # audited layers joined to each row
    uf = _UnionFind()
    producers: dict[str, set[str]] = {}
    norm_in: dict[str, float] = {}
    pending: list[tuple[str, int]] = []  # (audited layer, its row): excess needs its gain
    for r in range(n):
        name = graph.owner.get(r)
        kids = graph.kids[r]
        if name is not None and name in transform:
            ins = graph.inputs.get(r, ())
            g_in = max((val[i] for i in ins), default=1.0)
            producers.setdefault(name, set()).update(*(feeds[i] for i in ins))
            joined = frozenset().union(*(seg_of[i] for i in ins))
            if name in maps:
                pending.append((name, r))
                for other in joined:
                    uf.union(name, other)
                seg_of[r] = frozenset({name})
            elif name not in audit.norms and name not in audit.embeddings and (
                    _bounded(info, name) or name in audit.gains_of):
                seg_of[r] = joined
            # a scaled layer's own excess is applied in the second pass
            val[r] = _layer_value(name, g_in, audit, info, norm_in, maps)
            feeds[r] = frozenset({name})
            continue
        op = graph.ops[r]
        if not kids:
            continue
        feeds[r] = frozenset().union(*(feeds[k] for k in kids))
        if not _resets(op):
            seg_of[r] = frozenset().union(*(seg_of[k] for k in kids))
        val[r] = _op_value(op, [val[k] for k in kids])
    # the activation after each audited layer: an activation module it feeds
    after: dict[str, str] = {}
    for act in audit.gains_of:
        for p in producers.get(act, ()):
            after.setdefault(p, act)
    # second pass with the excesses known: a layer's own excess scales its output and
    # everything computed from it; one evaluation again, now with the excesses in place
    excess_of: dict[str, tuple[float, str | None]] = {}
    for name, _ in pending:
        act_name = after.get(name)
        gain = audit.gains_of.get(act_name) if act_name is not None else None
        excess_of[name] = (excess(audit.scales[name], gain[1] if gain else None), act_name)
    factor = {name: ex for name, (ex, _) in excess_of.items()}
    val = [1.0] * n
    norm_in = {}
    growth: dict[str, float] = {}
    for r in range(n):
        name = graph.owner.get(r)
        kids = graph.kids[r]
        if name is not None and name in transform:
            g_in = max((val[i] for i in graph.inputs.get(r, ())), default=1.0)
            val[r] = _layer_value(name, g_in, audit, info, norm_in, factor)
            if name in factor:
                growth[name] = max(growth.get(name, 0.0), val[r])
        elif kids:
            val[r] = _op_value(graph.ops[r], [val[k] for k in kids])
    roots = {name: uf.find(name) for name in excess_of}
    seg_ids = {root: i for i, root in enumerate(dict.fromkeys(roots.values()))}
    scales: dict[str, Scale] = {}
    for name in [x for x in order if x in excess_of] + [x for x in excess_of if x not in order]:
        ex, act_name = excess_of[name]
        gain = audit.gains_of.get(act_name) if act_name is not None else None
        li = info.get(act_name) if act_name is not None else None
        scales[name] = Scale(name, audit.scales[name], li.type_name if gain and li else None,
                             gain[0] if gain else None, gain[1] if gain else None, ex,
                             seg_ids[roots[name]], growth.get(name, ex))
    out = Paths(list(order), scales, {x: i for i, x in enumerate(order)}, True)
    out.producers = {k: frozenset(v) for k, v in producers.items()}
    out.norm_in = norm_in
    out.on_graph = True
    return out
