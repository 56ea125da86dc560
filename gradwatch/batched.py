"""Sampled-step statistics of many small tensors in a few ops: stacked by shape.

A model of a thousand small modules spends a sampled step in op dispatch, not arithmetic:
twenty reductions of a 32x64 output cost about the same as twenty of a 1M-element one. So
on a sampled step the hooks only keep (a reference to) each watched output, and each output
gradient, and at the end of the forward pass (outputs) or of the step (gradients) the
tensors of one shape, dtype and kind are stacked (one copy) and reduced along a dimension:
about fifteen ops per group, whatever the number of modules, for the same values as
``stats.activation_parts`` and ``stats.grad_sq_sum`` give one tensor at a time.

Large tensors (above ``BATCH_MAX`` elements) are not held: their op count is small
next to their size, and the hooks reduce them at once, one by one. An output changed in
place after its hook (an in-place ReLU after a Linear) is not read stale: its slot is
reduced in its hook from then on, and left out of the one step where that was found.
Held tensors are bounded by ``HOLD_BYTES``: past it, a batch is reduced early.

Each group is stacked into a buffer kept from one batch to the next (``out=``), and the
elementwise steps of the counts run in place in a second one: on CPU a fresh tensor of a
few megabytes costs more than the pass that fills it (measured, one thread: 500 outputs of
32x64 stacked into a new tensor 2.6 ms, into a kept one 0.6 ms; the batched part of
``deep1000``'s sampled step, 1,000 outputs and 1,000 gradients, 20.5 -> 11.6 ms with the
same values to the bit). Only the buffers of the last batch are kept: at most its held
bytes (``HOLD_BYTES``) and one scratch of its largest group. The held tensors are not
detached one by one (an op each): a batch is stacked under ``no_grad``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from gradwatch import stats as S
from gradwatch.buffers import ROW
from gradwatch.trace import _version

#: Bytes of held tensors past which a batch is reduced early (it bounds the memory kept alive).
HOLD_BYTES = 64 << 20
#: Tensors held at most, past which a batch is reduced early: a few ops more per thousand
#: modules, and no more than this many held objects for the garbage collector to promote
#: (objects that outlive its young collections bring on its full passes, see
#: tests/test_gc_pressure.py).
HOLD_COUNT = 256
#: Largest tensor held for a batch. Stacking copies it and the batched reductions allocate
#: temporaries of the whole stack: past a few thousand elements (where a tensor's twenty
#: reductions stop costing mostly dispatch) one at a time is faster (measured: a batch of
#: eight 128x512 outputs was 1.5x slower than their reductions one by one).
BATCH_MAX = 1 << 13


class _Holding:
    """Tensors held for a batch (with their slots and versions, in parallel lists: no
    object made per tensor, which the garbage collector would have to walk), and their
    bytes (past ``HOLD_BYTES``: reduce early); the buffers the groups of the last batch were
    stacked into, for the next one."""

    def __init__(self) -> None:
        self._slots: list[int] = []
        self._ts: list[Tensor] = []
        self._vers: list[int] = []
        self._bytes = 0
        self._bufs: dict[tuple[Any, ...], Tensor] = {}
        self._used: dict[tuple[Any, ...], Tensor] = {}

    def _hold(self, slot: int, t: Tensor, version: int, nbytes: int) -> None:
        self._slots.append(slot)
        self._ts.append(t)
        self._vers.append(version)
        self._bytes += nbytes
        if self._bytes > HOLD_BYTES or len(self._ts) >= HOLD_COUNT:
            self.flush()

    def _take(self) -> zip[tuple[int, Tensor, int]]:
        held = zip(self._slots, self._ts, self._vers)
        self._slots, self._ts, self._vers, self._bytes = [], [], [], 0
        return held

    def _buffer(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialised tensor of ``shape`` with ``like``'s dtype and device: the one of
        the last batch when it had the same, else a new one."""
        key = (shape, like.dtype, like.device)
        buf = self._used.get(key)
        if buf is None:
            buf = self._bufs.get(key)
            if buf is None:
                buf = torch.empty(shape, dtype=like.dtype, device=like.device)
            self._used[key] = buf
        return buf

    def _scratch(self, g: int, n: int, like: Tensor) -> Tensor:
        """A ``[g, n]`` uninitialised tensor like ``like``: a view of one flat buffer that
        every group of a batch shares (each group's use of it ends before the next's)."""
        key = ("scratch", like.dtype, like.device)
        buf = self._used.get(key)
        if buf is None:
            buf = self._bufs.get(key)
        if buf is None or buf.numel() < g * n:
            buf = torch.empty(g * n, dtype=like.dtype, device=like.device)
        self._used[key] = buf
        return buf[: g * n].view(g, n)

    def _stack(self, ts: list[Tensor]) -> Tensor:
        """``ts`` (one shape and dtype) stacked as ``[len(ts), numel]`` into a kept buffer."""
        t = ts[0]
        buf = self._buffer((len(ts),) + tuple(t.shape), t)
        torch.stack(ts, out=buf)
        return buf.view(len(ts), -1)

    def _keep_used(self) -> None:
        """The buffers this batch used are the ones kept for the next batch."""
        self._bufs, self._used = self._used, {}

    def flush(self) -> None:
        raise NotImplementedError

    def clear(self) -> None:
        self._take()
        self._bufs, self._used = {}, {}


class ActBatch(_Holding):
    """Watched outputs of a sampled step, reduced together (see the module docstring).

    ``log(slots, rows)`` takes the ``[n, buffers.ROW]`` fp32 rows of ``n`` outputs;
    ``bounds(slot)`` gives a layer's output range (None if unbounded)."""

    def __init__(self, log: Callable[[list[int], Tensor], None],
                 bounds: Callable[[int], tuple[float, float] | None], margin: float) -> None:
        super().__init__()
        self._log = log
        self._bounds = bounds
        self.margin = margin
        self.eager: set[int] = set()  # slots whose output is changed in place later

    def add(self, slot: int, t: Tensor) -> bool:
        """Hold ``t`` for the batch; False if it is for the hook to reduce now."""
        n = t.numel()
        if n > BATCH_MAX or slot in self.eager or t.dtype not in S.UPCAST:
            return False
        self._hold(slot, t, _version(t), n * t.element_size())
        return True

    def flush(self) -> None:
        groups: dict[tuple[Any, ...], list[tuple[int, Tensor]]] = {}
        for slot, t, v in self._take():
            if v < 0 or _version(t) != v:  # changed in place since: never read stale
                self.eager.add(slot)
                continue
            groups.setdefault((tuple(t.shape), t.dtype, self._bounds(slot)), []).append(
                (slot, t))
        with torch.no_grad():
            for (shape, _, bounds), items in groups.items():
                slots = [s for s, _ in items]
                x = self._stack([t for _, t in items])
                self._log(slots, self._rows(x, shape, bounds))
        self._keep_used()

    def _rows(self, x: Tensor, shape: tuple[int, ...], bounds: tuple[float, float] | None
              ) -> Tensor:
        """``[n, ROW]``: per stacked output (``x``: ``[n, numel]``, a buffer of this batch
        that is overwritten), ``[n, Σx, Σx², nonzeros, nonfinite, saturated, stuck units,
        units, max x, min x]`` as ``stats.activation_parts`` and ``stats.stuck_units``
        define them."""
        g = x.shape[0]
        if x.dtype != torch.float32:
            x = x.float()
        n = x.shape[1]
        # the reductions that only read x, then the elementwise steps in a scratch buffer
        # (in place), and last the one that overwrites x itself
        s1 = x.sum(1)
        hi, lo = x.amax(1), x.amin(1)
        scr = self._scratch(g, n, x)
        s2 = torch.mul(x, x, out=scr).sum(1)
        # |sign x|: 0 or 1, NaN where the output holds a NaN, as one tensor at a time
        nnz = torch.sign(x, out=scr).abs_().sum(1)
        cols = [torch.full_like(s1, n), s1, s2, nnz, s1]  # s1: a place for nf
        if bounds is not None:
            # units: dim 0 of each output is its batch (as stats.stuck_units reads it)
            per = x.view(g, shape[0], -1) if len(shape) >= 2 else x.view(g, 1, -1)
            lo_b, hi_b = bounds
            m = self.margin * (hi_b - lo_b)
            mx, mn = per.amax(1), per.amin(1)
            stuck = (mx <= lo_b + m).sum(1) + (mn >= hi_b - m).sum(1)
            c, r = S.centre_radius(bounds, self.margin)
            d = torch.abs(x, out=scr) if c == 0 else torch.sub(x, c, out=scr).abs_()
            cols.append(d.sub_(r).relu_().sign_().sum(1))
            cols += [stuck.to(torch.float32), torch.full_like(s1, per.shape[2])]
        else:
            z = torch.zeros_like(s1)
            cols += [z, z, z]
        # x - x: 0 where finite, NaN where NaN/Inf (x is not read after this)
        cols[4] = x.sub_(x).nan_to_num_(nan=1.0).sum(1)
        cols += [hi, lo]
        out = torch.stack(cols, 1)
        assert out.shape[1] == ROW
        return out


class GradBatch(_Holding):
    """Output gradients of a sampled step: Σg² per gradient, stacked by shape at the end of
    the step. ``log(slots, rows)`` takes ``[n, 2]`` rows ``[numel, Σg²]``."""

    def __init__(self, log: Callable[[list[int], Tensor], None]) -> None:
        super().__init__()
        self._log = log

    def add(self, slot: int, g: Tensor) -> bool:
        n = g.numel()
        if n > BATCH_MAX or g.dtype not in S.UPCAST or g.is_sparse:
            return False
        self._hold(slot, g, 0, n * g.element_size())
        return True

    def flush(self) -> None:
        groups: dict[tuple[Any, ...], list[tuple[int, Tensor]]] = {}
        for slot, g, _ in self._take():
            groups.setdefault((tuple(g.shape), g.dtype), []).append((slot, g))
        with torch.no_grad():  # a gradient of create_graph=True is not differentiated here
            for items in groups.values():
                x = self._stack([g for _, g in items])
                if x.dtype != torch.float32:
                    x = x.float()
                sq = x.mul_(x).sum(1)  # the stack is this batch's own: squared in place
                self._log([s for s, _ in items],
                          torch.stack([torch.full_like(sq, x.shape[1]), sq], 1))
        self._keep_used()
