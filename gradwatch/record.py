"""The host half of a step's non-finite trace (``trace.py``): the ``Record`` of its calls and
entries, the ``Rows`` its values are written into on the device, and the ``Replay`` that
takes a record as the template of the steps after it.

Most steps call the same modules in the same order on tensors linked the same way. A record
made of plain calls (one tensor in, one out, no keyword arguments) becomes the *template* of
the next steps: each call is then only checked against it (the same module; its input the
very tensor the template links it to, unchanged, or one checked here; an output of the same
dtype) and its sum written into the template's row, with no per-call host bookkeeping. A
step that matches it throughout has the template's calls and entries. At the first call that
does not match, the record made so far is built from the template and the step goes on the
general way (``StepTrace.call``): either way the record, and the rows' values, are those of
the general way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradwatch import cpukernels as K

#: ``torch.sum(x, DIMS[x.ndim], ..., out=row)`` reduces every dim into a 0-d row
DIMS: tuple[tuple[int, ...], ...] = tuple(tuple(range(n)) for n in range(33))

IN, OUT = 0, 1  # entry kinds: a tensor first seen as an input of a call, or an output


class Rows:
    """A growable 1-D fp32 device log whose rows are 0-d views made once (no indexing op
    per write)."""

    def __init__(self, device: torch.device, cap: int = 256) -> None:
        self.device = device
        self.t = torch.zeros(cap, dtype=torch.float32, device=device)
        self.rows = list(self.t.unbind())
        self.host = self.t.numpy() if device.type == "cpu" else None  # CPU: read as is
        self.addr = self.t.data_ptr()

    def row(self, k: int) -> Tensor:
        if k >= len(self.rows):
            self._grow(k + 1)
        return self.rows[k]

    def _grow(self, need: int) -> None:
        cap = max(need, 2 * len(self.rows))
        t = torch.zeros(cap, dtype=torch.float32, device=self.device)
        t[: self.t.numel()].copy_(self.t)
        self.t, self.rows, self.addr = t, list(t.unbind()), t.data_ptr()
        if self.host is not None:
            self.host = t.numpy()

    def put_sum(self, k: int, t: Tensor) -> None:
        """Row ``k`` = the fp32 sum of ``t`` (a dense tensor: NaN when it holds a NaN, ±Inf
        when it holds infinities of one sign): on CPU one C call where the kernels take
        ``t`` (``cpukernels.sum_into``: no op dispatched, no ``detach``), else one op."""
        if k >= len(self.rows):
            self._grow(k + 1)
        if self.host is None or not K.sum_into(t, self.addr + 4 * k):
            t = t.detach()
            torch.sum(t, DIMS[t.ndim], dtype=torch.float32, out=self.rows[k])

    def host_sum(self, n: int) -> float | None:
        """CPU: the sum of the first ``n`` rows, in double (finite when each row is),
        read in place by one C call where the kernels are built (less code to run after a
        backward that evicted the caches), else by numpy. None on other devices."""
        if self.host is None:
            return None
        kernels = K._kernels
        if kernels is not None:
            return kernels.sum_f32(self.addr, self._within(n))
        return float(self.host[:n].sum(dtype=np.float64))

    def zero(self, n: int) -> None:
        """The first ``n`` rows set to 0: in place by one C call on CPU where the kernels
        are built, else one op (on the device's stream)."""
        kernels = K._kernels
        if kernels is not None and self.host is not None:
            kernels.zero_f32(self.addr, self._within(n))
        else:
            self.t[:n].zero_()

    def _within(self, n: int) -> int:
        """``n``, checked against the log's length (the C calls read raw memory)."""
        if not 0 <= n <= len(self.rows):
            raise ValueError(f"rows: {n} of a log of {len(self.rows)}")
        return n


@dataclass
class Record:
    """The host half of a step's trace (the device half: ``n_rows`` forward rows and the
    grad rows). ``calls``: (module index, input entries, output entries) in completion
    order; ``ents``: per forward entry, as the forward hooks append it (one tuple each),
    (the module that made it, its kind ``IN``/``OUT``, the entry whose value it has: itself,
    or the input entry of a module that passes finite values on, and the device row of that
    value). ``by``, ``kind``, ``src``, ``row``: the same as columns, built on first read
    (only a step that held a non-finite value is read). ``g_roles``: per gradient entry,
    (module, IN/OUT) of the tensors it is the gradient of; ``fired``: the gradient entries
    whose hook ran."""

    calls: list[tuple[int, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    ents: list[tuple[int, int, int, int]] = field(default_factory=list)
    n_rows: int = 0
    half: list[int] = field(default_factory=list)  # rows of float16 tensors (overflow hints)
    g_roles: list[list[tuple[int, int]]] = field(default_factory=list)
    fired: list[int] = field(default_factory=list)
    cut: bool = False  # calls were left out (MAX_ENTRIES): not every output was checked
    _cols: tuple[list[int], ...] | None = field(default=None, repr=False, compare=False)

    def _columns(self) -> tuple[list[int], ...]:
        if self._cols is None or len(self._cols[0]) != len(self.ents):
            cols = tuple(map(list, zip(*self.ents))) if self.ents else ([], [], [], [])
            self._cols = cols  # type: ignore[assignment]
        return self._cols  # type: ignore[return-value]

    by = property(lambda self: self._columns()[0])
    kind = property(lambda self: self._columns()[1])
    src = property(lambda self: self._columns()[2])
    row = property(lambda self: self._columns()[3])  # per entry: the device row of its value

    @property
    def n(self) -> int:
        return len(self.ents)

    @property
    def n_grads(self) -> int:
        return len(self.g_roles)


# What a replayed call does with its output (``Replay.ops``): no floating output; a sum of
# its own into a row; the value of its input entry (a module that passes finite values on);
# an earlier entry handed on unchanged.
R_NONE, R_CHECK, R_DERIVED, R_SAME = range(4)


class Replay:
    """A record taken as the template of the steps after it (see the module docstring).

    ``ops[j]``: call ``j`` as ``(module, input entry or -1, the input's dtype, the row its
    input is summed into when it is checked here or -1, what its output is (``R_*``), the
    output's entry, its row or -1, its dtype, the entries whose last use this call is)``.
    An input that is an earlier call's entry is held (``live``: entry -> (tensor, version))
    from the call that made it to its last use and no longer: a replayed step keeps no
    tensor alive that the model does not. ``before[j]``: (entries, rows) of the record
    before call ``j``. The gradient hooks of hooked modules are placed at each step anew,
    into the step's own record."""

    __slots__ = ("rec", "ops", "before", "hold")

    def __init__(self, rec: Record, ops: list[tuple[Any, ...]], before: list[tuple[int, int]],
                 hold: list[bool]) -> None:
        self.rec = rec
        self.ops = ops
        self.before = before
        self.hold = hold

    @staticmethod
    def of(rec: Record, dtypes: list[tuple[Any, Any]]) -> Replay | None:
        """The template made from ``rec`` (``dtypes``: per call, its input's and output's
        dtype), or None when ``rec`` cannot be one."""
        if rec.cut or not rec.calls or len(dtypes) != len(rec.calls):
            return None
        ents = rec.ents
        last: dict[int, int] = {}  # entry -> the last call that reads it
        ops: list[list[Any]] = []
        before: list[tuple[int, int]] = []
        k = r = 0
        for j, (m, ins, outs) in enumerate(rec.calls):
            if len(ins) > 1 or len(outs) > 1:
                return None
            before.append((k, r))
            e = ins[0] if ins else -1
            xrow = -1
            if e >= k:  # checked here, as an input
                if ents[e] != (m, IN, e, r):
                    return None
                xrow = r
                k, r = k + 1, r + 1
            elif e >= 0:
                last[e] = j
            o, kind, row = -1, R_NONE, -1
            if outs:
                o = outs[0]
                if o < k:
                    kind = R_SAME
                    last[o] = j
                elif ents[o][2] == o:
                    if ents[o] != (m, OUT, o, r):
                        return None
                    kind, row = R_CHECK, r
                    k, r = k + 1, r + 1
                else:
                    if e < 0 or ents[o] != (m, OUT, ents[e][2], ents[e][3]):
                        return None
                    kind = R_DERIVED
                    k += 1
            ops.append([m, e, dtypes[j][0], xrow, kind, o, row, dtypes[j][1], ()])
        if k != len(ents) or r != rec.n_rows:
            return None
        ends: dict[int, list[int]] = {}
        for e, j in last.items():
            ends.setdefault(j, []).append(e)
        for j, es in ends.items():
            ops[j][8] = tuple(es)
        hold = [False] * k
        for e in last:
            hold[e] = True
        return Replay(rec, [tuple(op) for op in ops], before, hold)

    def cut_to(self, rec: Record, j: int, share: bool = False) -> None:
        """``rec`` (the step's own: its gradient entries, the hooks that point to it)
        becomes the record of a step whose first ``j`` calls matched: ``share``, a whole
        step, the template's very lists (a finished record is never appended to); else
        copies cut at call ``j``, which the general way extends."""
        t = self.rec
        if share:
            rec.calls, rec.ents, rec.n_rows, rec.half = t.calls, t.ents, t.n_rows, t.half
            return
        k, r = self.before[j] if j < len(self.ops) else (t.n, t.n_rows)
        rec.calls, rec.ents, rec.n_rows = t.calls[:j], t.ents[:k], r
        rec.half = [h for h in t.half if h < r]
