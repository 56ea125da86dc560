"""The module and tensor hooks of the statistics, and the ``Collector`` they feed.

* ``ForwardHook`` (every module): the call goes to the non-finite trace (``trace.py``) and,
  for a watched module, to the activation statistics; a hook on the gradient at each output
  tensor that requires grad (``OutGradHook``, a ``handles.GradHook``: a pre-hook of the
  autograd node that made it) measures the back-propagated error signal.
* ``Collector``: the hot-path state those hooks share (buffers, sampled/light step, the
  held batches of ``batched.py``).

Other code also runs inside the training step: the optimizer step hooks (``stepping.py``),
the parameter reads (``params.py``), the step engine (``engine.py``).

Hooks only observe: they work on detached tensors, return None and never read a device
value on the host. They hold the ``Collector`` by weak reference (``handles.WeakHook``) and
turn inert when the watcher closes, or when copied or pickled with the model.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves

from gradwatch import cpukernels as K
from gradwatch import stats as S
from gradwatch.batched import ActBatch, GradBatch
from gradwatch.buffers import WindowBuffers
from gradwatch.faults import FaultGuard
from gradwatch.handles import GradHook, Inert, WeakHook, grad_site
from gradwatch.selection import LayerInfo

_compiling = torch.compiler.is_compiling
# models pickled (torch.save) while watched by an earlier version name the inert hook here
_Inert = Inert


class _Hook(WeakHook):
    __slots__ = ("slot",)

    def __init__(self, collector: Collector, slot: int) -> None:
        self._ref = weakref.ref(collector)  # made per output tensor: no super() call
        self.slot = slot


class ForwardHook(WeakHook):
    """Forward hook (``with_kwargs=True``) on every module of the model: the call goes to
    the non-finite trace (``trace.py``; every module, every step), and, for a watched module
    (``slot >= 0``), to the statistics."""

    __slots__ = ("m", "slot")

    def __init__(self, collector: Collector, m: int, slot: int) -> None:
        super().__init__(collector)
        self.m = m
        self.slot = slot

    def __call__(self, module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        # every module call of every step runs this: written in one frame (the trace's own
        # call is the only other frame of a light step)
        c = self._ref()
        if c is None:
            return None
        m = self.m
        tr = c.trace
        if tr is not None and "trace" not in c.off:
            try:
                if _compiling():
                    if c.mflags is not None:
                        c.mflags.call(m, args, output, kwargs)
                else:
                    tr.call(m, args, kwargs, output)
                    if m == 0 and c.on_eval_done and not torch.is_grad_enabled():
                        done = c.on_eval_done()
                        if done is not None:
                            done()
            except Exception as e:
                c.guard.fail("trace", "non-finite trace", "*", e)
        # a light step needs a watched module only for the order of its first call
        slot = self.slot
        if slot >= 0 and (c.full or not c.called[slot]) and not (
                "act" in c.off and "out_grad" in c.off):
            c.on_output(slot, output)
        return None


class ForwardDoneHook(_Hook):
    """Forward hook on the watched root: ends the identity bookkeeping of compiled code."""

    __slots__ = ()

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        c = self._ref()
        if c is not None:
            c.forward_done()
            if c.full and not torch.compiler.is_compiling():
                c.flush_outputs()
        return None


class OutGradHook(GradHook):
    """The gradient at an output of watched layer ``slot`` (``handles.GradHook``)."""

    __slots__ = ("slot",)

    def __init__(self, collector: Collector, slot: int, nr: int) -> None:
        super().__init__(collector, nr)
        self.slot = slot

    def grad(self, g: Tensor) -> None:
        c = self._ref()
        if c is not None and "out_grad" not in c.off:
            c.on_out_grad(self.slot, g)

    def __call__(self, g: Any) -> None:  # GradHook's with ``grad`` inlined: one frame less
        nr = self.nr                     # per watched output on a sampled step
        if nr >= 0:
            g = g[nr]
        c = self._ref()
        if g is not None and c is not None and "out_grad" not in c.off:
            c.on_out_grad(self.slot, g)
        return None


def float_leaves(output: Any) -> list[Tensor]:
    """The non-empty dense floating-point tensors of a module output (any nesting)."""
    outs = [output] if isinstance(output, Tensor) else tree_leaves(output)
    return [t for t in outs if isinstance(t, Tensor)
            and t.is_floating_point() and not t.is_sparse and t.numel() > 0]


class Collector:
    """Hot-path state shared by all hooks of one watcher: buffers, step mode, faults.

    ``trace`` records every call of every module for the non-finite origin (eager code);
    compiled code adds per-module flags to ``mflags`` instead (``ModuleFlags``)."""

    def __init__(self, buffers: WindowBuffers, layers: list[LayerInfo], margin: float,
                 guard: FaultGuard, trace: Any = None,
                 mflags: Any = None) -> None:
        self.buffers = buffers
        self.layers = layers
        self.margin = margin
        # this step is sampled (collects the full stat set); else a light step
        self.full = True
        # elements read for the counts of a large output (None: every element)
        self.sample: int | None = S.SAMPLE_SIZE
        self.phase = 0  # start offset of the element sample, rotated every step
        self._consts: dict[float, Tensor] = {}
        self.guard = guard
        # the parts switched off ("act": activation statistics, "out_grad": output gradients)
        self.off = guard.off
        self.trace = trace
        self.mflags = mflags
        self.called = [False] * len(layers)
        self.order: list[int] = []  # slots in order of first forward call
        # (id, version) -> tensor weakref: a tensor gets its gradient hook once per step
        self._hooked: dict[tuple[int, int], weakref.ref[Tensor]] = {}
        self._traced: list[Tensor] = []  # the same, for compiled code (see _first_hook)
        self.hist: Any = None  # DeviceHistograms when histograms=True
        self.on_eval_done: Any = None  # called when a forward without gradients ends
        # sampled steps, eager code: small outputs and gradients reduced together
        self.act_batch = ActBatch(buffers.log_rows, lambda s: self.layers[s].bounds, margin)
        self.grad_batch = GradBatch(buffers.log_grad_rows)
        # the output-gradient hooks of each layer, by output index on the autograd node
        # (``handles.grad_site``), made at their first placement and placed again on each
        # sampled step
        self._out_hooks: list[dict[int, OutGradHook]] = [{} for _ in layers]

    # -- forward ----------------------------------------------------------------------------
    def on_output(self, slot: int, output: Any) -> None:
        # Two parts that fail and switch off independently: activation statistics, and
        # the placement of the output-gradient hooks. Never take the training down.
        try:
            if not self.called[slot]:
                self.called[slot] = True
                self.order.append(slot)
            if not self.full:  # light step: the trace has checked the output
                return
            leaves = float_leaves(output)
            compiling = _compiling()
        except Exception as e:
            self.off.update(("act", "out_grad"))
            self.fault("forward hook", self.layers[slot].name, e)
            return
        off = self.off
        if leaves and "act" not in off:
            try:
                t = S.dense(leaves[0])  # a nested tensor: the statistics of its elements
                if compiling:
                    self._traced_stats(slot, t)
                elif not self._kernel_row(slot, t):
                    if self.hist is not None or not self.act_batch.add(slot, t):
                        self._stats(slot, t)  # not held for the batch: reduced now
                elif self.hist is not None:
                    self.hist.add_activation(slot, t)
            except Exception as e:
                self.guard.fail("act", "activation statistics", self.layers[slot].name, e)
        if "out_grad" not in off:
            try:
                hooks = self._out_hooks[slot]
                for t in leaves:
                    if t.requires_grad and self._first_hook(t, compiling):
                        site, nr = grad_site(t, compiling)
                        hook = hooks.get(nr)
                        if hook is None:
                            hook = hooks[nr] = OutGradHook(self, slot, nr)
                        # no handle kept: the hook dies with the graph (at the step's
                        # end) and is inert once the watcher closes; keeping a thousand
                        # handles per step made the collector's full passes frequent
                        hook.place(site)
            except Exception as e:
                self.guard.fail("out_grad", "output-gradient hook", self.layers[slot].name, e)

    def _const(self, value: float) -> Tensor:
        """A 0-d fp32 device tensor holding ``value`` (element and unit counts), made once
        on the device (``torch.full``: no host-to-device copy) and reused."""
        c = self._consts.get(value)
        if c is None:
            if len(self._consts) >= 4096:  # bounded: shapes rarely vary without limit
                self._consts.clear()
            c = torch.full((), value, dtype=torch.float32, device=self.buffers.device)
            self._consts[value] = c
        return c

    def _kernel_row(self, slot: int, t: Tensor) -> bool:
        """Eager, sampled step, a contiguous float32/bfloat16 CPU output: its statistics in
        one C call, added into its layer's stage row (``cpukernels``): one pass, every
        element read for the counts too, whatever the size (the ops take an element sample
        of a large output's counts). False where the kernel does not apply (then the batch
        or the ops take it): another device or dtype, a NaN or an Inf."""
        buf = self.buffers
        if not buf.rows_in_place:
            return False
        kind = K.kind_of(t)
        if kind < 0:
            return False
        bounds = self.layers[slot].bounds  # the units matter to a bounded layer only
        return K.act_row(t, kind, 0 if bounds is None else S.units_of(t), bounds,
                         self.margin, buf.stage_row_at(slot))

    def _stats(self, slot: int, t: Tensor) -> None:
        """Eager, sampled step, an output not held for the batch of outputs of its shape
        (``batched.py``: ``on_output`` tries that first): its statistics as device scalars
        now, logged for the step's fold."""
        buf = self.buffers
        bounds = self.layers[slot].bounds
        s1, hi, lo, s2, nnz, nf, sat = S.activation_parts(
            t, bounds, self.margin, self.sample, self.phase)
        if bounds is not None:
            stuck, units = S.stuck_units(t, bounds, self.margin), self._const(S.units_of(t))
        else:
            stuck = units = self._const(0.0)
        row = [self._const(t.numel()), s1, s2, nnz, nf, sat, stuck, units, hi, lo]
        if s1.dtype != torch.float32:  # a float64 output
            row = [v.to(torch.float32) for v in row]
        buf.log_activation(slot, row)
        if self.hist is not None:
            self.hist.add_activation(slot, t)

    def _traced_stats(self, slot: int, t: Tensor) -> None:
        """Compiled code, sampled step: the same statistics, added into the stage
        directly."""
        bounds = self.layers[slot].bounds
        # phase 0: a Python counter read in traced code would recompile every step
        vec = S.activation_sums(t, bounds, self.margin, self.sample)
        self.buffers.add_activation(slot, vec, t.numel())
        if bounds is not None:
            self.buffers.add_stuck(slot, S.stuck_units(t, bounds, self.margin), S.units_of(t))
        if self.hist is not None:
            self.hist.add_activation(slot, t)

    def _first_hook(self, t: Tensor, compiling: bool) -> bool:
        """True the first time this tensor (at this version) reaches a hook in this step.

        Eager: keyed by (id, version) with a weak reference, so the tensor is not kept
        alive (keeping the outputs to the end of the forward pass, as an earlier version
        did for small ones, cost more than the references: on CPU the kernels hold no
        output, and an output kept past its use makes the allocator hand out new memory).
        Under torch.compile the version is a data-dependent value and weak references
        cannot be traced (a graph break each), so the traced code compares identities
        against the tensors hooked so far in this forward call (the list is cleared by
        ``ForwardDoneHook`` at the end of the call, so guards on it are stable).
        """
        if compiling:
            for o in self._traced:
                if o is t:
                    return False
            self._traced.append(t)
            return True
        key = (id(t), t._version)
        ref = self._hooked.get(key)
        if ref is not None and ref() is t:
            return False
        self._hooked[key] = weakref.ref(t)
        return True

    def forward_done(self) -> None:
        """The watched root's forward pass ended: the references of ``_first_hook`` are let
        go (none is held to the optimizer step, where the young objects of a step would
        outlive the collector's young passes: a 1,000-module model then ran a full
        collection every 20 sampled steps, see tests/test_gc_pressure.py)."""
        self._traced.clear()
        self._hooked.clear()

    # -- backward ---------------------------------------------------------------------------
    def on_out_grad(self, slot: int, grad: Tensor) -> None:
        # registered on sampled steps only (a light step checks outputs and parameter gradients)
        try:
            if _compiling():
                grad = S.dense(grad)
                self.buffers.add_out_grad(slot, S.grad_sq_sum(grad), grad.numel())
                return
            buf = self.buffers
            if buf.rows_in_place and not grad.is_nested:
                # a contiguous float32/bfloat16 CPU output gradient: its element count and
                # Σg² in one C call, added into its layer's stage columns (``cpukernels``)
                kind = K.kind_of(grad)
                if kind >= 0 and K.sq_row(grad, kind, buf.stage_grad_at(slot)):
                    return
            grad = S.dense(grad)
            if not self.grad_batch.add(slot, grad):
                self.buffers.log_out_grad(slot, S.grad_sq_sum(grad), self._const(grad.numel()))
        except Exception as e:
            self.guard.fail("out_grad", "output-gradient hook", self.layers[slot].name, e)

    # -- step boundary ----------------------------------------------------------------------
    def flush_outputs(self) -> None:
        """The held outputs of a sampled step, reduced (at the end of a forward pass)."""
        try:
            self.act_batch.flush()
        except Exception as e:
            self.act_batch.clear()
            self.guard.fail("act", "activation statistics", "*", e)

    def flush_batches(self) -> None:
        """Everything held for the step, reduced (before the step is folded or scaled)."""
        self.flush_outputs()
        try:
            self.grad_batch.flush()
        except Exception as e:
            self.grad_batch.clear()
            self.guard.fail("out_grad", "output-gradient hook", "*", e)

    def discard_batches(self) -> None:
        self.act_batch.clear()
        self.grad_batch.clear()

    def end_step(self) -> None:
        self.phase += 1  # the next sampled step reads other elements of large outputs
        self.forward_done()

    def close(self) -> None:
        """The watcher closes: every hook turns inert (module hooks are removed by the
        watcher's ``HandleRegistry``; gradient hooks keep no handle and die with their
        graph), the trace forgets its record and its template."""
        self.off.update(("act", "out_grad", "trace"))
        if self.trace is not None:
            self.trace.remove()
        self.end_step()

    def fault(self, stage: str, layer: str, exc: BaseException, defer: bool = False) -> None:
        """Report an internal failure once per stage (``FaultGuard.report``)."""
        self.guard.report(stage, layer, exc, defer)
