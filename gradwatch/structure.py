"""The model's real dataflow, learned once: which module's output feeds which module's
input, from the autograd graph of the first forward run with gradients after ``watch()``.

``StructureProbe`` holds one forward pre-hook and one forward hook on the root while the
model is watched; at the first forward with gradients it puts a forward hook on every module
for that one call, then walks the autograd graph back from what they recorded, on the host
(no tensor is read, no device sync), and removes those hooks. The result (``Graph``) is what
``paths.place_on_graph`` follows. See docs/diagnosis.md, "The scale of a path".
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from gradwatch.selection import ROOT_NAME


@dataclass
class Graph:
    """The dataflow of one training forward, from its autograd graph: one row per autograd
    node reached from the modules' outputs (children first): its op name, the rows it reads
    (only those that carry the signal: parameters and data without a gradient are left
    out), and, where the node is a module's output, that module (the innermost one) and the
    rows of that call's inputs. Host data only, read once."""

    ops: list[str] = field(default_factory=list)
    kids: list[tuple[int, ...]] = field(default_factory=list)
    owner: dict[int, str] = field(default_factory=dict)
    inputs: dict[int, tuple[int, ...]] = field(default_factory=dict)
    #: the last dimension of each module's first input and output (its use as a map)
    dims: dict[str, tuple[int, int]] = field(default_factory=dict)


class _Inert:
    """What a probe hook becomes in a copy or a pickle of the model: it does nothing."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None


class _ProbeHook:
    """A hook that calls ``StructureProbe.<method>`` through a weak reference (the model
    does not keep the probe alive) and is inert in a copy or a pickle of the model."""

    __slots__ = ("_probe", "_method", "_name")

    def __init__(self, probe: StructureProbe, method: str, name: str = "") -> None:
        self._probe = weakref.ref(probe)
        self._method = method
        self._name = name

    def __call__(self, *args: Any) -> None:
        p = self._probe()
        if p is not None:
            getattr(p, self._method)(self._name, *args)
        return None

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_Inert, ())


class StructureProbe:
    """Learns ``Graph`` from the first forward of the root run with gradients. The root
    holds one forward pre-hook and one forward hook while the model is watched (removed
    with the watcher's hooks, so the model's hooks are the same before and after the first
    step; after that forward each returns at once); the first forward with gradients puts
    a forward hook on every module for that one call (each records its call's input and
    output autograd nodes) and, at its end, the graph is walked back from them once (host
    only: no tensor is read) and those hooks are removed. ``done(graph)`` receives the
    result; an internal error goes to ``fault`` and the probe stops (the diagnosis then
    reads the forward order, as before)."""

    def __init__(self, root: nn.Module, done: Callable[[Graph], None],
                 fault: Callable[[str, str, BaseException], None] | None = None) -> None:
        self._done = done
        self._fault = fault
        self._root = weakref.ref(root)
        self._calls: list[tuple[str, tuple[Any, ...], Any]] = []
        self._dims: dict[str, tuple[int, int]] = {}
        self._inner: list[Any] = []
        self.finished = False
        self.handles: list[Any] = [
            root.register_forward_pre_hook(_ProbeHook(self, "_start")),
            root.register_forward_hook(_ProbeHook(self, "_end"))]

    def _start(self, _: str, root: nn.Module, args: Any) -> None:
        if self.finished or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return
        try:
            self._clear()
            for name, m in root.named_modules():
                if m is root:  # its own hooks were taken for this call already
                    continue
                self._inner.append(m.register_forward_hook(
                    _ProbeHook(self, "_record", name or ROOT_NAME), with_kwargs=True))
        except Exception as e:  # noqa: BLE001 - reported, never propagated
            self._failed(e)

    def _record(self, name: str, m: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        try:
            out_t, in_t = _tensors(out), _tensors((args, kwargs))
            outs = [t.grad_fn for t in out_t if t.grad_fn is not None]
            ins = tuple(t.grad_fn for t in in_t if t.grad_fn is not None)
            self._calls.extend((name, ins, o) for o in outs)
            if in_t and out_t and in_t[0].dim() and out_t[0].dim():
                self._dims.setdefault(name, (in_t[0].shape[-1], out_t[0].shape[-1]))
        except Exception as e:  # noqa: BLE001 - reported, never propagated
            self._failed(e)

    def _end(self, _: str, root: nn.Module, args: Any, out: Any) -> None:
        if not self._inner:
            return
        try:
            calls, dims = self._calls, self._dims
            self._stop()
            graph = _walk(calls)
            graph.dims = dims
            self._done(graph)
        except Exception as e:  # noqa: BLE001 - reported, never propagated
            self._failed(e)

    def _failed(self, e: BaseException) -> None:
        self._stop()
        if self._fault is not None:
            self._fault("model structure (alert causes)", "*", e)

    def _clear(self) -> None:
        for h in self._inner:
            h.remove()
        self._inner, self._calls, self._dims = [], [], {}

    def _stop(self) -> None:
        self.finished = True
        self._clear()

    def remove(self) -> None:
        """Remove every hook of the probe (idempotent)."""
        self._stop()
        for h in self.handles:
            h.remove()
        self.handles = []


def _tensors(x: Any, depth: int = 0) -> list[torch.Tensor]:
    """The floating-point tensors in a module's arguments or output (nested containers,
    a few levels deep; a Hugging Face ``ModelOutput`` is a dict)."""
    if isinstance(x, torch.Tensor):
        return [x] if x.is_floating_point() else []
    if depth > 3:
        return []
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v, depth + 1)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v, depth + 1)]
    return []


def _walk(calls: Sequence[tuple[str, tuple[Any, ...], Any]]) -> Graph:
    """The rows of ``Graph`` from the recorded calls: an iterative walk of the autograd
    graph back from every call's output and inputs (children first)."""
    g = Graph()
    row: dict[Any, int | None] = {}
    owner: dict[Any, tuple[str, tuple[Any, ...]]] = {}
    for name, ins, out in calls:
        if out in ins:  # an in-place module (ReLU(inplace=True)): its input was overwritten
            ins = tuple(n for n, _ in getattr(out, "next_functions", ()) if n is not None)
        owner.setdefault(out, (name, ins))  # children finish first: the innermost wins
    starts = [o for _, _, o in calls] + [n for _, ins, _ in calls for n in ins]
    for start in starts:
        stack: list[tuple[Any, bool]] = [(start, False)]
        while stack:
            node, ready = stack.pop()
            if node in row and not ready:
                continue
            nexts = [n for n, _ in getattr(node, "next_functions", ()) if n is not None]
            if not ready:
                row[node] = None  # in progress (an autograd graph has no cycle)
                stack.append((node, True))
                stack.extend((n, False) for n in nexts if n not in row)
                continue
            op = type(node).__name__
            if op == "AccumulateGrad":
                continue  # a parameter or a leaf that requires grad: not the signal
            kids = tuple(dict.fromkeys(r for n in nexts if (r := row.get(n)) is not None))
            row[node] = len(g.ops)
            g.ops.append(op)
            g.kids.append(kids)
    for node, (name, ins) in owner.items():
        r = row.get(node)
        if r is not None:
            g.owner[r] = name
            g.inputs[r] = tuple(i for n in ins if (i := row.get(n)) is not None)
    return g


def start_probe(root: nn.Module, audit: Any,
                fault: Callable[[str, str, BaseException], None]) -> StructureProbe | None:
    """A probe that sets ``audit.graph`` (an ``audit.InitAudit``) at the first training
    forward; None (reported to ``fault``) if it cannot be attached."""
    def done(graph: Graph) -> None:
        audit.graph = graph

    try:
        probe = StructureProbe(root, done, fault)
    except Exception as e:  # noqa: BLE001 - reported, never propagated
        fault("model structure (alert causes)", "*", e)
        return None
    audit.probe = probe
    return probe
