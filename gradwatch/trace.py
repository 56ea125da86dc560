"""The per-step non-finite trace of eager code: one fp32 sum per tensor, and who made it.

Every module of the model (containers and custom modules included, watched or not) reports
its call here from its forward hook. For each call the trace keeps, on the host, which
*entries* were its inputs and outputs; each entry is one tensor checked once, by an fp32
sum written into the next row of a preallocated device log (``Rows``): NaN if the tensor
holds a NaN, ±Inf if it holds infinities of one sign, finite otherwise. A tensor already
checked in this step (the output of the module before, unchanged since: same object, same
version) is not summed again: the entry is shared, which is also what links a module's
inputs to the module that made them. A parameter-free module that keeps finite inputs
finite (``selection.passes_finite``) gets no sum of its own: its output is *derived* from
its input's entry.

Modules whose backward can turn finite gradients non-finite (not ``selection.grad_safe``,
nor of safe code by ``structure.own_code_safe`` while their calls keep its path) also get a
hook on the gradient at each input and output that requires grad (``handles.GradHook``):
the gradient's fp32 sum goes into a second log.

Steps that repeat the step before are replayed against its record (``record.Replay``).

Nothing here reads a device value: at the end of a step the watcher copies both logs to the
host (``flags.StepFlags``) with the ``Record`` of the step, and ``origin.py`` reads them
there, only when something was non-finite.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves

from gradwatch.faults import FaultGuard
from gradwatch.handles import GradHook, grad_site
from gradwatch.record import IN, OUT, R_CHECK, R_NONE, R_SAME, Record, Replay, Rows
from gradwatch.stats import dense
from gradwatch.structure import path_key, with_node

OFF = "trace"  # the fault guard's name for this part

#: Entries per record before forward calls without a step (evaluation) are cut: a bound
MAX_ENTRIES = 1 << 15

#: the floating-point dtypes (``x.dtype in FLOATS``: no call on the hot path)
FLOATS = frozenset(d for d in vars(torch).values()
                   if isinstance(d, torch.dtype) and d.is_floating_point)


class _GradHook(GradHook):
    """The fp32 sum of one gradient into row ``j`` of the grad log of the record it was
    placed in (a gradient that arrives after that record was taken is left out)."""

    __slots__ = ("_rec", "j")

    def __init__(self, trace: StepTrace, rec: Record, j: int, nr: int) -> None:
        super().__init__(trace, nr)
        self._rec = rec
        self.j = j

    def grad(self, g: Tensor) -> None:
        tr = self._ref()
        if tr is not None and OFF not in tr.off and tr.rec is self._rec:
            tr.grad(self.j, g)
        return None


def _version(t: Tensor) -> int:
    """The tensor's version counter; -1 for an inference tensor, which has none (it is then
    never taken for one checked before)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def _float(t: Any) -> bool:
    return isinstance(t, Tensor) and t.is_floating_point() and not t.is_sparse


class StepTrace:
    """Records the forward calls and gradients of one step (see the module docstring).

    ``passes[m]``: module ``m`` passes finite values on (no sum of its own output);
    ``inplace[m]``: it writes its output into its input; ``unsafe[m]``: its gradients are
    hooked. ``OFF`` in ``off`` (the fault guard's set) makes every hook inert (the watcher
    closed or this part failed).
    """

    def __init__(self, device: torch.device, passes: list[bool], inplace: list[bool],
                 unsafe: list[bool], guard: FaultGuard) -> None:
        self.device, self.passes, self.inplace, self.unsafe = device, passes, inplace, unsafe
        # per module judged safe by its code (structure.own_code_safe): its calls' path keys
        self.paths: list[frozenset[Any] | None] = [None] * len(unsafe)
        self.guard, self.off = guard, guard.off
        self.fwd = Rows(device, 1024)
        self.grads = Rows(device, 256)
        self._tmpl: Replay | None = None  # the template of the next steps
        self._new()

    def _new(self) -> None:
        self.rec = Record()
        # id -> (weakref, version when checked, entry): a tensor checked in this record
        self._ids: dict[int, tuple[weakref.ref[Tensor], int, int]] = {}
        # the value stored last in ``_ids`` (in a chain of modules: found without a lookup)
        self._last: tuple[weakref.ref[Tensor], int, int] | None = None
        self._g_ids: dict[int, tuple[weakref.ref[Tensor], int]] = {}
        # replay: template (None once a call departs), calls matched, holds, inputs checked
        self._rp: Replay | None = self._tmpl
        self._j = 0
        self._live: list[Any] = [] if self._rp is None else [None] * len(self._rp.hold)
        self._fresh: list[tuple[weakref.ref[Tensor], int, int]] = []
        # the last output: (tensor, version) while held for a later call, else weakly
        self._prev: tuple[Tensor, int] | None = None
        self._prev_w: tuple[weakref.ref[Tensor], int] | None = None
        self._prev_o = -1
        # per call made the general way: its input's, output's dtype (None after a ``_call``)
        self._dts: list[tuple[Any, Any]] | None = []

    # -- forward ------------------------------------------------------------------------------
    def _check(self, x: Tensor, m: int, kind: int) -> int:
        """A new entry holding the fp32 sum of ``x``."""
        rec = self.rec
        k = len(rec.ents)
        r = rec.n_rows
        self.fwd.put_sum(r, dense(x))
        rec.n_rows = r + 1
        if x.dtype is torch.float16:
            rec.half.append(r)
        rec.ents.append((m, kind, k, r))
        self._ids[id(x)] = self._last = (weakref.ref(x), _version(x), k)
        return k

    def _input(self, x: Tensor, m: int) -> int:
        seen = self._ids.get(id(x))
        if seen is not None and seen[0]() is x and seen[1] >= 0:
            v = _version(x) - seen[1]
            # unchanged since checked, or changed once by this very module in place
            if v == 0 or (v == 1 and self.inplace[m]):
                return seen[2]
        return self._check(x, m, IN)

    def call(self, m: int, args: Any, kwargs: Any, output: Any) -> None:
        """Module ``m`` returned ``output`` from ``args``/``kwargs`` (its forward hook).

        One tensor in, one tensor out, no keyword arguments (the hot path of every light
        step: one call per module) is written out in this frame: ``_input``, ``_output``,
        ``_derived`` and ``_check`` inline, one tuple appended per entry and per call; the
        columns of the record are built only when it is read (``Record.by`` ...)."""
        rp = self._rp
        if rp is not None:  # replaying the template
            j = self._j
            ops = rp.ops
            if (j < len(ops) and not kwargs and type(output) is Tensor and len(args) == 1
                    and ops[j][0] == m):
                _, e, xdt, xrow, kind, o, row, ydt, ends = ops[j]
                x = args[0]
                y = output
                live = self._live
                hx: Any = None  # (tensor, version) of the input and output
                hy: Any = None
                try:
                    if xrow >= 0 or e < 0:  # checked here, or no floating input
                        ok = type(x) is Tensor and x.dtype is xdt and (
                            e < 0 or not (x.is_sparse or x.is_nested or self._after(x)))
                        if ok and xrow >= 0:
                            hx = (x, x._version)
                    else:  # the very tensor of entry e, unchanged (or by this module once)
                        h = live[e]
                        ok = h is not None and h[0] is x and (
                            x._version == h[1] or (x._version == h[1] + 1
                                                   and self.inplace[m]))
                    if ok:
                        if kind == R_SAME:
                            hy = live[o]
                            ok = hy is not None and hy[0] is y and y._version == hy[1]
                        else:
                            ok = y.dtype is ydt and not (kind == R_CHECK and y.is_sparse)
                            if ok and kind != R_NONE:
                                hy = (y, y._version)
                except RuntimeError:  # an inference tensor has no version: never held
                    ok = False
                if ok:
                    put = self.fwd.put_sum
                    if xrow >= 0:
                        put(xrow, x)
                        if rp.hold[e]:
                            live[e] = hx
                        else:  # a model input, as a rule: kept for a step that departs
                            self._fresh.append((weakref.ref(x), hx[1], e))
                    if kind == R_CHECK:
                        put(row, dense(y) if y.is_nested else y)
                    if hy is not None and kind != R_SAME and rp.hold[o]:
                        live[o] = hy
                    for d in ends:
                        live[d] = None
                    # the output of this call, for a step that departs after it
                    if hy is None:
                        self._prev = self._prev_w = None
                    elif live[o] is hy:
                        self._prev, self._prev_w = hy, None
                    else:
                        self._prev, self._prev_w = None, (weakref.ref(y), hy[1])
                    self._prev_o = o
                    self._j = j + 1
                    if (self.unsafe[m] or (self.paths[m] is not None and self._departs(
                            m, x, y))) and torch.is_grad_enabled():
                        if e >= 0 and x.requires_grad:
                            self._hook_grad(x, m, IN)
                        if kind != R_NONE and y.requires_grad:
                            self._hook_grad(y, m, OUT)
                    return
            self._unreplay()
        rec = self.rec
        ents = rec.ents
        k = len(ents)
        if k >= MAX_ENTRIES:
            rec.cut = True
            return  # an evaluation loop without steps: cut at the root's next call
        if kwargs or type(output) is not Tensor or len(args) != 1:
            self._call(m, args, kwargs, output)
            return
        x = args[0]
        if type(x) is not Tensor:
            self._call(m, args, kwargs, output)
            return
        ids = self._ids
        ins: tuple[int, ...] = ()
        e = -1
        if x.dtype in FLOATS and not x.is_sparse:
            seen = self._last
            if seen is None or seen[0]() is not x:
                seen = ids.get(id(x))
            if seen is not None and seen[0]() is x and seen[1] >= 0:
                try:
                    v = x._version - seen[1]
                except RuntimeError:  # an inference tensor: never taken for one checked
                    v = -1
                # unchanged since checked, or changed once by this very module in place
                if v == 0 or (v == 1 and self.inplace[m]):
                    e = seen[2]
            if e < 0:
                e = self._check(x, m, IN)
                k += 1
            ins = (e,)
        y = output
        outs: tuple[int, ...] = ()
        if y.dtype in FLOATS and not y.is_sparse:
            try:
                ver = y._version
            except RuntimeError:  # an inference tensor: no version, never shared
                ver = -1
            if e >= 0 and self.passes[m]:  # derived from the input's entry
                _, _, src, row = ents[e]
                ents.append((m, OUT, src, row))
                ids[id(y)] = self._last = (weakref.ref(y), ver, k)
                outs = (k,)
            else:
                iy = id(y)
                seen = ids.get(iy)
                if seen is not None and seen[0]() is y and seen[1] >= 0 and ver == seen[1]:
                    outs = (seen[2],)  # handed on unchanged (an input, or a child's output)
                else:  # _check, inline
                    r = rec.n_rows
                    self.fwd.put_sum(r, dense(y) if y.is_nested else y)
                    rec.n_rows = r + 1
                    if y.dtype is torch.float16:
                        rec.half.append(r)
                    ents.append((m, OUT, k, r))
                    ids[iy] = self._last = (weakref.ref(y), ver, k)
                    outs = (k,)
        rec.calls.append((m, ins, outs))
        dts = self._dts
        if dts is not None:
            dts.append((x.dtype, y.dtype))
        if (self.unsafe[m] or (self.paths[m] is not None and self._departs(m, x, y))
                ) and torch.is_grad_enabled():
            if ins and x.requires_grad:
                self._hook_grad(x, m, IN)
            if outs and y.requires_grad:
                self._hook_grad(y, m, OUT)

    def _unreplay(self) -> None:
        """Stop replaying: the record of the calls that matched, built from the template
        (a copy: the general way appends to it), and the tensors held for later calls
        entered in the id table; the step goes on the general way."""
        rp, j = self._rp, self._j
        assert rp is not None
        self._rp = None
        rp.cut_to(self.rec, j)  # the same record: the gradient hooks placed point to it
        self._dts = [(op[2], op[6]) for op in rp.ops[:j]]
        ids = self._ids
        for ref, ver, e in self._fresh:
            if ref() is not None:
                ids[id(ref())] = (ref, ver, e)
        held = [(h, e) for e, h in enumerate(self._live) if h is not None]
        if self._prev is not None:
            held.append((self._prev, self._prev_o))
        for (t, ver), e in held:
            ids[id(t)] = self._last = (weakref.ref(t), ver, e)
        pw = self._prev_w
        if pw is not None and pw[0]() is not None:
            ids[id(pw[0]())] = self._last = (pw[0], pw[1], self._prev_o)
        self._live, self._fresh, self._prev, self._prev_w = [], [], None, None

    def _after(self, x: Tensor) -> bool:
        """``x`` is the output of the call replayed last (then the step departs)."""
        p, pw = self._prev, self._prev_w
        return (p is not None and p[0] is x) or (pw is not None and pw[0]() is x)

    def _call(self, m: int, args: Any, kwargs: Any, output: Any) -> None:
        """``call`` for any other signature: every floating tensor among the arguments
        (keyword ones included) and the outputs, at any nesting."""
        rec = self.rec
        self._dts = None  # not a template
        if type(args) is tuple and all(type(a) is Tensor for a in args):
            xs: list[Any] = list(args)
        else:
            xs = tree_leaves(args)
        if kwargs:
            xs += tree_leaves(kwargs)
        ins = tuple(self._input(x, m) for x in xs if _float(x))
        if type(output) is Tensor:
            outs_t: list[Any] = [output]
        else:
            outs_t = tree_leaves(output)
        outs = []
        if self.passes[m] and len(ins) == 1 and len(outs_t) == 1 and _float(outs_t[0]):
            outs.append(self._derived(outs_t[0], m, ins[0]))
        else:
            for y in outs_t:
                if _float(y):
                    outs.append(self._output(y, m))
        rec.calls.append((m, ins, tuple(outs)))
        if (self.unsafe[m] or (self.paths[m] is not None and self._departs(
                m, with_node(xs), with_node(outs_t)))) and torch.is_grad_enabled():
            for t in xs:
                if _float(t) and t.requires_grad:
                    self._hook_grad(t, m, IN)
            for t in outs_t:
                if _float(t) and t.requires_grad:
                    self._hook_grad(t, m, OUT)

    def _derived(self, y: Tensor, m: int, e: int) -> int:
        """Module ``m`` passes finite values on: ``y`` is finite exactly when its input
        (entry ``e``) is, so it takes that entry's value instead of a sum of its own."""
        ents = self.rec.ents
        k = len(ents)
        _, _, src, row = ents[e]
        ents.append((m, OUT, src, row))
        self._ids[id(y)] = self._last = (weakref.ref(y), _version(y), k)
        return k

    def _output(self, y: Tensor, m: int) -> int:
        seen = self._ids.get(id(y))
        if seen is not None and seen[0]() is y and seen[1] >= 0 and _version(y) == seen[1]:
            return seen[2]  # handed on unchanged (an input, or a child's output)
        return self._check(y, m, OUT)

    def _departs(self, m: int, x: Any, y: Any) -> bool:
        """Module ``m`` (of safe code on ``paths[m]``) made ``y`` on another path: hook it."""
        paths, key = self.paths[m], path_key(x, y)  # None without a gradient (no_grad)
        if key is None or paths is None or key in paths:
            return False
        self.paths[m], self.unsafe[m] = None, True
        return True

    def _hook_grad(self, t: Tensor, m: int, role: int) -> None:
        rec = self.rec
        seen = self._g_ids.get(id(t))
        if seen is not None and seen[0]() is t:
            rec.g_roles[seen[1]].append((m, role))
            return
        j = len(rec.g_roles)
        rec.g_roles.append([(m, role)])
        self._g_ids[id(t)] = (weakref.ref(t), j)
        site, nr = grad_site(t)
        _GradHook(self, rec, j, nr).place(site)  # dies with the graph; inert once closed

    # -- backward -----------------------------------------------------------------------------
    def grad(self, j: int, g: Tensor) -> None:
        try:
            self.grads.put_sum(j, dense(g))
            self.rec.fired.append(j)
        except Exception as e:
            self.guard.fail(OFF, "non-finite trace (gradients)", "*", e)

    # -- step boundary -------------------------------------------------------------------------
    def views(self, rec: Record) -> tuple[Tensor, Tensor]:
        """Views of the device rows of ``rec`` (forward rows, gradient rows)."""
        return self.fwd.t[: rec.n_rows], self.grads.t[: rec.n_grads]

    def host_total(self, rec: Record) -> float | None:
        """CPU: the sum of the rows of ``rec`` (``Rows.host_sum``); None elsewhere."""
        f, g = self.fwd.host_sum(rec.n_rows), self.grads.host_sum(rec.n_grads)
        return None if f is None or g is None else f + g

    def take_record(self) -> Record:
        """This record, ended; starts a new record. The caller reads (or copies) its rows
        (``views``, ``host_total``), then ``clear(rec)``."""
        rp = self._rp
        rec = self.rec
        if rp is not None:  # replayed: the template's calls, or the part that matched
            rp.cut_to(rec, self._j, share=self._j == len(rp.ops))
        elif self._dts is not None:
            tmpl = Replay.of(rec, self._dts)
            if tmpl is not None:
                self._tmpl = tmpl
        self._new()
        return rec

    def clear(self, rec: Record) -> None:
        """Zero the gradient rows of ``rec`` (read or copied already; on CUDA the zeroing
        runs after the copy, in stream order): a hook that does not run in the next record
        leaves 0 (finite) in its row."""
        if rec.n_grads:
            self.grads.zero(rec.n_grads)

    def discard(self) -> None:
        """Drop this record (a step the GradScaler skipped: its gradients overflowed on
        purpose)."""
        if self.rec.n_grads:
            self.grads.t[: self.rec.n_grads].zero_()
        self._new()

    def empty(self) -> bool:
        return not self._j and not self.rec.calls and not self.rec.g_roles

    def remove(self) -> None:
        """The watcher closes: the record and the template are dropped. The gradient hooks
        placed in this step keep no handle: they die with their tensors, inert already."""
        self._tmpl = None
        self._new()
