"""The model's real dataflow, learned once: which module's output feeds which module's
input, from the autograd graph of the first forward run with gradients after ``watch()``.

``StructureProbe`` holds one forward pre-hook and one forward hook on the root while the
model is watched; at the first forward with gradients it puts a forward hook on every module
for that one call, then walks the autograd graph back from what they recorded, on the host
(no tensor is read, no device sync), and removes those hooks. The result (``Graph``) is what
``paths.place_on_graph`` follows. See docs/diagnosis.md, "The scale of a path".

A second walk tells which modules' own code (the autograd nodes made in their calls, their
children's left out) only ran ops whose backward keeps finite gradients finite
(``backward_keeps_finite``): ``Graph.grad_safe``, the modules the non-finite trace need not
hook (``selection.grad_safe`` says it of torch's own classes, by class).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

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
    #: the modules whose own code made only ops that keep finite gradients finite
    #: (``own_code_safe``), with the ``trace.path_key`` of each of their calls
    grad_safe: dict[str, frozenset[Any]] = field(default_factory=dict)


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
        # per module call, in completion order: (name, the autograd sequence number at its
        # start and at its end, its outputs' nodes, its path key); the calls in progress'
        # starts by name
        self._own: list[tuple[str, int, int, tuple[Any, ...], Any]] = []
        self._pending: dict[str, list[int]] = {}
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
                self._inner.append(m.register_forward_pre_hook(
                    _ProbeHook(self, "_before", name or ROOT_NAME), with_kwargs=True))
                self._inner.append(m.register_forward_hook(
                    _ProbeHook(self, "_record", name or ROOT_NAME), with_kwargs=True))
        except Exception as e:  # noqa: BLE001 - reported, never propagated
            self._failed(e)

    def _before(self, name: str, m: nn.Module, args: Any, kwargs: Any) -> None:
        try:  # the nodes this call makes are numbered from here
            self._pending.setdefault(name, []).append(_sequence_now())
        except Exception as e:  # noqa: BLE001 - reported, never propagated
            self._failed(e)

    def _record(self, name: str, m: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        try:
            out_t, in_t = _tensors(out), _tensors((args, kwargs))
            outs = [t.grad_fn for t in out_t if t.grad_fn is not None]
            ins = tuple(t.grad_fn for t in in_t if t.grad_fn is not None)
            self._calls.extend((name, ins, o) for o in outs)
            pending = self._pending.get(name)
            if pending:
                self._own.append((name, pending.pop(), _sequence_now(), _nodes(out),
                                  call_path_key(args, kwargs, out)))
            if in_t and out_t and in_t[0].dim() and out_t[0].dim():
                self._dims.setdefault(name, (in_t[0].shape[-1], out_t[0].shape[-1]))
        except Exception as e:  # noqa: BLE001 - reported, never propagated
            self._failed(e)

    def _end(self, _: str, root: nn.Module, args: Any, out: Any) -> None:
        if not self._inner:
            return
        try:
            calls, dims, own = self._calls, self._dims, self._own
            self._stop()
            graph = _walk(calls)
            graph.dims = dims
            graph.grad_safe = own_code_safe(own)
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
        self._own, self._pending = [], {}

    def _stop(self) -> None:
        self.finished = True
        self._clear()

    def remove(self) -> None:
        """Remove every hook of the probe (idempotent)."""
        self._stop()
        for h in self.handles:
            h.remove()
        self.handles = []


def with_node(ts: Any) -> Any:
    """The first floating-point tensor of ``ts`` that an autograd node made, or None."""
    return next((t for t in ts if isinstance(t, torch.Tensor) and t.is_floating_point()
                 and t.grad_fn is not None), None)


def path_key(x: Any, y: Any) -> tuple[Any, int] | None:
    """What a call's output ``y`` tells of the code path that made it from its input ``x``,
    cheaply: the class of ``y``'s autograd node and how many nodes were made since
    ``x``'s (-1 when ``x`` has none). None when ``y`` has no node (no gradient goes back
    through the call). The same code on the same path gives the same key each step."""
    gy = getattr(y, "grad_fn", None)
    if gy is None:
        return None
    gx = getattr(x, "grad_fn", None)
    return type(gy), -1 if gx is None else gy._sequence_nr() - gx._sequence_nr()


def call_path_key(args: Any, kwargs: Any, output: Any) -> tuple[Any, int] | None:
    """``path_key`` of a module call, as ``trace.StepTrace.call`` reads it: the first
    floating input and output an autograd node made."""
    xs = tree_leaves(args) + (tree_leaves(kwargs) if kwargs else [])
    return path_key(with_node(xs), with_node(tree_leaves(output)))


def _tensors(x: Any, depth: int = 0, limit: int = 3) -> list[torch.Tensor]:
    """The floating-point tensors in a module's arguments or output (nested containers,
    ``limit`` levels deep; a Hugging Face ``ModelOutput`` is a dict)."""
    if isinstance(x, torch.Tensor):
        return [x] if x.is_floating_point() else []
    if depth > limit:
        return []
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v, depth + 1, limit)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v, depth + 1, limit)]
    return []


def _nodes(x: Any) -> tuple[Any, ...]:
    """The autograd nodes of every floating-point tensor in ``x``, at any depth that the
    non-finite trace reads (``tree_leaves``) or that a dict or a list nests."""
    ts = _tensors(x, limit=32) + [t for t in tree_leaves(x) if isinstance(t, torch.Tensor)
                                  and t.is_floating_point()]
    return tuple(dict.fromkeys(t.grad_fn for t in ts if t.grad_fn is not None))


# Autograd nodes whose backward turns finite gradients and saved values into finite
# gradients, short of an fp overflow (which the parameter gradients still show): views and
# copies, sums and products, matrix products, convolutions, embeddings, the bounded or
# piecewise-linear activations, softmax and log-softmax, the normalizations (eps > 0),
# dropout, masking, SDPA. Not here, among others: sqrt, rsqrt, log, reciprocal, division by
# a tensor, pow with a tensor or an exponent below 1, norms, any custom autograd.Function:
# at 0 (or masked out by a ``where``) their backward makes Inf or NaN from finite values.
_FINITE_NODES = frozenset(f"{op}Backward{k}" for op, ks in {
    "View": "0", "UnsafeView": "0", "ReshapeAlias": "0", "Alias": "0", "Expand": "0",
    "Permute": "0", "Transpose": "01", "T": "0", "Squeeze": "0123", "Unsqueeze": "0",
    "Select": "0", "Slice": "0", "Split": "0", "SplitWithSizes": "0", "Unbind": "0",
    "Cat": "0", "Stack": "0", "Clone": "0", "ToCopy": "0", "Repeat": "0", "Flip": "0",
    "Roll": "0", "Index": "0", "IndexSelect": "0", "Gather": "0", "MaskedFill": "01",
    "Where": "0", "ConstantPadNd": "0", "Tril": "0", "Triu": "0", "Cumsum": "0",
    "Add": "01", "Sub": "01", "Rsub": "01", "Neg": "0", "Mul": "01", "Sum": "01",
    "Mean": "01", "Addmm": "0", "Addbmm": "0", "Baddbmm": "0", "Mm": "0", "Bmm": "0",
    "Mv": "0", "Addmv": "0", "Dot": "0", "Embedding": "0", "Convolution": "0", "Abs": "0",
    "Clamp": "01", "ClampMin": "0", "ClampMax": "0", "Maximum": "0", "Minimum": "0",
    "Exp": "0", "Tanh": "0", "Sigmoid": "0", "Gelu": "0", "Relu": "0", "Threshold": "0",
    "Silu": "0", "Elu": "0", "LeakyRelu": "0", "Hardtanh": "0", "Hardswish": "0",
    "Hardsigmoid": "0", "Mish": "0", "Softplus": "0", "LogSigmoid": "0", "Softmax": "0",
    "SafeSoftmax": "0", "LogSoftmax": "0", "NativeLayerNorm": "0", "NativeBatchNorm": "0",
    "NativeGroupNorm": "0", "NativeDropout": "0", "MaxPool2DWithIndices": "0",
    "AvgPool2D": "0", "AdaptiveAvgPool2D": "0",
    "ScaledDotProductFlashAttentionForCpu": "0", "ScaledDotProductFlashAttention": "0",
    "ScaledDotProductEfficientAttention": "0", "ScaledDotProductCudnnAttention": "0",
}.items() for k in ks)


def backward_keeps_finite(node: Any) -> bool:
    """Whether the backward of autograd node ``node`` keeps finite gradients finite
    (``_FINITE_NODES``; ``x ** p`` for a number p >= 1 or 0; ``x / c`` for a finite
    number c != 0, or a 0-dim host tensor holding one now)."""
    op = type(node).__name__
    if op in _FINITE_NODES:
        return True
    if op == "PowBackward0":
        p = getattr(node, "_saved_exponent", None)
        return isinstance(p, (int, float)) and (p >= 1 or p == 0)
    if op in ("DivBackward0", "DivBackward1"):
        c = getattr(node, "_saved_other", None)
        if isinstance(c, torch.Tensor):  # a Python number is saved as a 0-dim host tensor
            if c.dim() or c.device.type != "cpu" or c.requires_grad:
                return False  # a division by a tensor (a device one is never read here)
            c = c.item()
        return isinstance(c, (int, float)) and c != 0 and math.isfinite(c)
    return False


def own_code_safe(calls: Sequence[tuple[str, int, int, tuple[Any, ...], Any]]
                  ) -> dict[str, frozenset[Any]]:
    """The modules whose own code keeps finite gradients finite, each with the path keys
    of its calls (``trace.path_key``: a later call on another path is hooked). ``calls``:
    per module call, children's first, its name, the autograd sequence numbers at its start
    and at its end (the nodes made in the call are numbered in between), its outputs'
    nodes, its path key. The nodes of a call are those reached back from its outputs among
    the ones it made; each is judged (``backward_keeps_finite``) once, for the innermost
    call that made it. A module that made no node (no gradient to judge by) is left out."""
    owner: dict[Any, str] = {}
    bad: set[str] = set()
    keys: dict[str, set[Any]] = {}
    for name, lo, hi, outs, key in calls:
        seen: set[Any] = set()
        stack = [n for n in outs if lo <= n._sequence_nr() < hi]
        if stack and key is not None:
            keys.setdefault(name, set()).add(key)
        elif stack:
            bad.add(name)  # a node made, but no key to check its later calls by
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            if node not in owner:  # not a child's: this module's own code made it
                owner[node] = name
                if not backward_keeps_finite(node):
                    bad.add(name)
            for n, _ in node.next_functions:
                if n is not None and lo <= n._sequence_nr() < hi:
                    stack.append(n)
    return {name: frozenset(k) for name, k in keys.items() if name not in bad}


def _sequence_now() -> int:
    """The sequence number the next autograd node made on this thread will get."""
    get = getattr(torch._C._autograd, "_get_sequence_nr", None)
    if get is not None:
        return int(get())
    node: Any = torch.zeros((), requires_grad=True).view(()).grad_fn  # numbered next
    return int(node._sequence_nr()) + 1


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
                fault: Callable[[str, str, BaseException], None],
                then: Callable[[Graph], None] | None = None) -> StructureProbe | None:
    """A probe that sets ``audit.graph`` (an ``audit.InitAudit``) at the first training
    forward, then calls ``then`` with it; None (reported to ``fault``) if it cannot be
    attached."""
    def done(graph: Graph) -> None:
        audit.graph = graph
        if then is not None:
            then(graph)

    try:
        probe = StructureProbe(root, done, fault)
    except Exception as e:  # noqa: BLE001 - reported, never propagated
        fault("model structure (alert causes)", "*", e)
        return None
    audit.probe = probe
    return probe
