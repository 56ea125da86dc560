"""Hook objects: the only code that runs inside the training step.

* ``ForwardHook``: a module's output -> activation sums, and a tensor hook on each output
  tensor that requires grad (``OutGradHook``) for the back-propagated error signal.
* ``ParamTracker``: read once per optimizer step -> parameter-gradient norms, weight norms
  and update ratios, with fused ``_foreach`` kernels.

Hooks only observe: they work on detached tensors, return None and never read a device
value on the host. They hold the ``Collector`` by weak reference and turn inert when the
watcher closes, or when copied or pickled with the model.
"""

from __future__ import annotations

import collections
import math
import threading
import warnings
import weakref
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves
from torch.utils.hooks import RemovableHandle

from gradwatch import stats as S
from gradwatch.alerts import GradwatchWarning, logger
from gradwatch.batched import ActBatch, GradBatch
from gradwatch.buffers import ParamStepStats, WindowBuffers, device_tensor
from gradwatch.distributed import local, shard_reducer
from gradwatch.selection import LayerInfo

_compiling = torch.compiler.is_compiling


class _Inert:
    """What a gradwatch hook becomes in a copy or a pickle of the model: it does nothing."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None


class _Hook:
    __slots__ = ("_collector", "slot")

    def __init__(self, collector: Collector, slot: int) -> None:
        self._collector = weakref.ref(collector)
        self.slot = slot

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_Inert, ())


class ForwardHook:
    """Forward hook (``with_kwargs=True``) on every module of the model: the call goes to
    the non-finite trace (``trace.py``; every module, every step), and, for a watched module
    (``slot >= 0``), to the statistics."""

    __slots__ = ("_collector", "m", "slot")

    def __init__(self, collector: Collector, m: int, slot: int) -> None:
        self._collector = weakref.ref(collector)
        self.m = m
        self.slot = slot

    def __call__(self, module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        c = self._collector()
        if c is not None:
            c.on_call(self.m, self.slot, args, kwargs, output)
        return None

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_Inert, ())


class ForwardDoneHook(_Hook):
    """Forward hook on the watched root: ends the identity bookkeeping of compiled code."""

    __slots__ = ()

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        c = self._collector()
        if c is not None:
            c._traced.clear()
            if c.full and not torch.compiler.is_compiling():
                c.flush_outputs()
        return None


class OutGradHook(_Hook):
    __slots__ = ()

    def __call__(self, grad: Tensor) -> None:
        c = self._collector()
        if c is not None and c.grad_on:
            c.on_out_grad(self.slot, grad)
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
                 trace: Any = None, mflags: Any = None) -> None:
        self.buffers = buffers
        self.layers = layers
        self.margin = margin
        self.full = True  # this step collects the full stat set (a sampled step)
        # elements read for the counts of a large output (None: every element)
        self.sample: int | None = S.SAMPLE_SIZE
        self.phase = 0  # start offset of the element sample, rotated every step
        self._consts: dict[float, Tensor] = {}
        self.act_on = True
        self.grad_on = True
        self.trace = trace
        self.mflags = mflags
        self.called = [False] * len(layers)
        self.order: list[int] = []  # slots in order of first forward call
        # (id, version) -> tensor weakref: a tensor gets its gradient hook once per step
        self._hooked: dict[tuple[int, int], weakref.ref[Tensor]] = {}
        self._traced: list[Tensor] = []  # the same, for compiled code (see _first_hook)
        self._handles: list[RemovableHandle] = []
        self._faults: set[str] = set()
        self._fault_lock = threading.RLock()
        # fault messages from the background thread, delivered on the training thread
        self.deferred: collections.deque[str] = collections.deque()
        self.hist: Any = None  # DeviceHistograms when histograms=True
        self.on_eval_done: Any = None  # called when a forward without gradients ends
        # sampled steps, eager code: small outputs and gradients reduced together
        self.act_batch = ActBatch(buffers.log_rows, lambda s: self.layers[s].bounds, margin)
        self.grad_batch = GradBatch(buffers.log_grad_rows)

    # -- forward ----------------------------------------------------------------------------
    def on_call(self, m: int, slot: int, args: Any, kwargs: Any, output: Any) -> None:
        """Every module call: the non-finite trace, then the statistics of a watched one."""
        tr = self.trace
        if tr is not None and tr.on:
            try:
                if _compiling():
                    if self.mflags is not None:
                        self.mflags.call(m, args, output)
                else:
                    tr.call(m, args, kwargs, output)
                    if m == 0 and not torch.is_grad_enabled() and self.on_eval_done:
                        done = self.on_eval_done()
                        if done is not None:
                            done()
            except Exception as e:
                tr.on = False
                self.fault("non-finite trace", "*", e)
        # a light step needs a watched module only for the order of its first call
        if slot >= 0 and (self.full or not self.called[slot]) and (self.act_on
                                                                      or self.grad_on):
            self.on_output(slot, output)

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
        except Exception as e:
            self.act_on = self.grad_on = False
            self.fault("forward hook", self.layers[slot].name, e)
            return
        if leaves and self.act_on:
            try:
                if torch.compiler.is_compiling():
                    self._traced_stats(slot, leaves[0])
                else:
                    self._stats(slot, leaves[0])
            except Exception as e:
                self.act_on = False
                self.fault("activation statistics", self.layers[slot].name, e)
        if self.grad_on:
            try:
                for t in leaves:
                    if t.requires_grad and self._first_hook(t):
                        h = t.register_hook(OutGradHook(self, slot))
                        # a handle made in traced code cannot leave the graph; that hook
                        # dies with its tensor and is inert once the watcher closes
                        if not torch.compiler.is_compiling():
                            self._handles.append(h)
            except Exception as e:
                self.grad_on = False
                self.fault("output-gradient hook", self.layers[slot].name, e)

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

    def _stats(self, slot: int, t: Tensor) -> None:
        """Eager, sampled step: this output held for the batch of outputs of its shape
        (``batched.py``), or its statistics as device scalars now, logged for the step's
        fold."""
        if self.hist is None and self.act_batch.add(slot, t):
            return
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

    def _first_hook(self, t: Tensor) -> bool:
        """True the first time this tensor (at this version) reaches a hook in this step.

        Eager: keyed by (id, version) with a weak reference, so no activation is kept
        alive. Under torch.compile the version is a data-dependent value and weak
        references cannot be traced (a graph break each), so the traced code compares
        identities against the tensors hooked so far in this forward call (the list is
        cleared by ``ForwardDoneHook`` at the end of the call, so guards on it are stable).
        """
        if torch.compiler.is_compiling():
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

    # -- backward ---------------------------------------------------------------------------
    def on_out_grad(self, slot: int, grad: Tensor) -> None:
        # registered on full steps only (a light step checks outputs and parameter gradients)
        try:
            if torch.compiler.is_compiling():
                self.buffers.add_out_grad(slot, S.grad_sq_sum(grad), grad.numel())
            elif not self.grad_batch.add(slot, grad):
                self.buffers.log_out_grad(slot, S.grad_sq_sum(grad), self._const(grad.numel()))
        except Exception as e:
            self.grad_on = False
            self.fault("output-gradient hook", self.layers[slot].name, e)

    # -- step boundary ----------------------------------------------------------------------
    def flush_outputs(self) -> None:
        """The held outputs of a sampled step, reduced (at the end of a forward pass)."""
        try:
            self.act_batch.flush()
        except Exception as e:
            self.act_on = False
            self.act_batch.clear()
            self.fault("activation statistics", "*", e)

    def flush_batches(self) -> None:
        """Everything held for the step, reduced (before the step is folded or scaled)."""
        self.flush_outputs()
        try:
            self.grad_batch.flush()
        except Exception as e:
            self.grad_on = False
            self.grad_batch.clear()
            self.fault("output-gradient hook", "*", e)

    def discard_batches(self) -> None:
        self.act_batch.clear()
        self.grad_batch.clear()

    def end_step(self) -> None:
        self.phase += 1  # the next sampled step reads other elements of large outputs
        self._hooked.clear()
        self._traced.clear()
        self._handles.clear()

    def remove_tensor_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        if self.trace is not None:
            self.trace.on = False
            self.trace.remove()
        self.end_step()

    def fault(self, stage: str, layer: str, exc: BaseException, defer: bool = False) -> None:
        """Report an internal failure once per stage; the caller switches that part off.

        ``layer`` is the layer being processed, ``"*"`` for a stage that serves all layers.
        ``defer``: called off the training thread; the warning is queued in ``deferred`` and
        issued on the training thread at the next step/flush/close."""
        with self._fault_lock:
            if stage in self._faults:
                return
            self._faults.add(stage)
        where = "all layers" if layer == "*" else f"layer {layer!r}"
        msg = (f"gradwatch: internal error in the {stage} ({where}): "
               f"{type(exc).__name__}: {exc}; this part of the watcher is switched off, "
               "training continues")
        if defer:
            self.deferred.append(msg)
        else:
            report_fault(msg)


def report_fault(msg: str) -> None:
    """Issue a fault warning; where warnings are turned into errors (``-W error``), log it
    instead: a fault inside gradwatch must not stop the training that way either."""
    try:
        warnings.warn(msg, GradwatchWarning, stacklevel=3)
    except Exception:
        logger.warning(msg)


# Largest number of elements per parameter copied to measure an update ratio, taken as
# UPDATE_CHUNKS evenly spaced contiguous runs: a plain stride would touch one cache line
# per element (7x slower here for a 512x512 weight).
UPDATE_SAMPLE = 4096
UPDATE_CHUNKS = 8


class ParamTracker:
    """Per-layer statistics of the watched modules' own parameters.

    Parameters are de-duplicated (tied weights count once, for the first watched owner);
    frozen parameters count for weight norms only; a parameter whose ``.grad`` is None is
    left out (no gradient is not a zero gradient). All results are device tensors.
    """

    def __init__(self, owners: Sequence[tuple[Tensor, int]], n_layers: int,
                 device: torch.device) -> None:
        self.n_layers = n_layers
        self.device = device
        self.params = [p for p, _ in owners]
        self.trainable = [(p, i) for p, i in owners if p.requires_grad]
        lidx = [i for _, i in owners]
        # device_tensor: a lazy model builds this in a forward hook, mid-training
        self._all_idx = device_tensor(lidx, torch.long, device)
        has = [False] * n_layers
        for i in lidx:
            has[i] = True
        self._has_param = device_tensor(has, torch.bool, device)
        self._cache: dict[tuple[int, ...], tuple[Tensor, Tensor, Tensor, S.NormPlan]] = {}
        self.present: tuple[int, ...] = ()  # trainable parameters with a gradient, last step
        self._wplan: S.NormPlan | None = None
        self._before: S.Packed | None = None
        self._vplan: S.NormPlan | None = None
        self._updating: frozenset[int] | None = None  # see before_update
        self._updated_cache: dict[frozenset[int], Tensor] = {}
        self._views_idx: Tensor | None = None
        self._views_has: Tensor | None = None
        self._views: list[Tensor] = []
        self._views_key: tuple[int, ...] | None = None
        # FSDP2: norms of local shards are partial; one all-reduce makes them global
        self._shards = shard_reducer(self.params)

    def _layout(self, present: tuple[int, ...], grads: list[Tensor]
                ) -> tuple[Tensor, Tensor, Tensor, S.NormPlan]:
        hit = self._cache.get(present)
        if hit is None:
            numel = [0.0] * self.n_layers
            idx = []
            for k in present:
                p, i = self.trainable[k]
                numel[i] += p.numel()
                idx.append(i)
            idx_t = device_tensor(idx, torch.long, self.device)
            numel_t = device_tensor(numel, torch.float32, self.device)
            plan = S.NormPlan(grads)  # by the gradients' layout (an embedding's is sparse)
            hit = (idx_t, numel_t, (numel_t > 0).to(torch.float32), plan)
            if len(self._cache) > 64:  # bounded: the set of present grads rarely changes
                self._cache.clear()
            self._cache[present] = hit
        return hit

    def grad_stats(self, full: bool = True,
                   only: frozenset[int] | None = None) -> ParamStepStats | None:
        """Per-layer gradient norms, RMS and non-finite flags; the max-abs only when
        ``full`` (a second pass over every gradient: sampled steps only). ``only``: the
        indices into ``trainable`` to read (one optimizer's parameters), None: all.

        Non-finite: on full steps from the max-abs, exact (an L2 norm of finite values can
        overflow, |g| ~ 1e19); on light steps from the norm, NaN only: an Inf gradient
        there shows as an infinite ``grad_rms`` (the rules report it as exploding at once).
        """
        present = tuple(k for k, (p, _) in enumerate(self.trainable)
                        if p.grad is not None and (only is None or k in only))
        self.present = present
        if not present:
            return None
        train = self.trainable
        if self._shards is None:
            grads = [train[k][0].grad for k in present]
        else:
            grads = [local(train[k][0].grad) for k in present]  # type: ignore[arg-type]
        idx, numel, has, plan = self._layout(present, grads)  # type: ignore[arg-type]
        # a sampled step also takes the max: one packing serves both
        packed = plan.pack(grads) if full and plan.groups else grads  # type: ignore[arg-type]
        norms = plan.norms(packed)  # type: ignore[arg-type]
        L = self.n_layers
        sq = torch.zeros(L, device=self.device).index_add_(0, idx, norms * norms)
        if full:
            maxes = plan.absmax(packed)  # type: ignore[arg-type]
            gmax: Tensor | None = torch.zeros(L, device=self.device).scatter_reduce_(
                0, idx, maxes, "amax")
            bad = torch.isfinite(maxes).logical_not().to(torch.float32)
        else:
            gmax = None
            bad = torch.isnan(norms).to(torch.float32)
        nonfinite = torch.zeros(L, device=self.device).index_add_(0, idx, bad)
        if self._shards is not None:
            both = self._shards.sum_(torch.stack([sq, nonfinite]))
            sq, nonfinite = both[0], both[1]
            if gmax is not None:
                gmax = self._shards.max_(gmax)
        gnorm = torch.sqrt(sq)
        grms = gnorm / torch.sqrt(torch.clamp(numel, min=1.0))
        return ParamStepStats(gnorm, grms, gmax, has, nonfinite, norms)

    def _local(self, t: Tensor) -> Tensor:
        return t if self._shards is None else local(t)

    def weight_norms(self) -> Tensor | None:
        if not self.params:
            return None
        if self._wplan is None:
            self._wplan = S.NormPlan([self._local(p) for p in self.params])
        norms = self._wplan.norms([self._local(p) for p in self.params])  # under no_grad
        sq = torch.zeros(self.n_layers, device=self.device).index_add_(
            0, self._all_idx, norms * norms
        )
        if self._shards is not None:
            sq = self._shards.sum_(sq)
        return torch.where(self._has_param, torch.sqrt(sq), torch.full_like(sq, math.nan))

    # -- update ratio: a strided sample of each parameter, copied before the step -----------
    def _sample_views(self) -> list[Tensor]:
        """Views of at most ``UPDATE_SAMPLE`` elements of each trainable parameter, made
        again only when a parameter's storage changes (``p.data = ...``)."""
        key = tuple(local(p).data_ptr() for p, _ in self.trainable)
        if key == self._views_key:
            return self._views
        out = []
        for p, _ in self.trainable:
            flat = local(p.detach()).reshape(-1)
            n = flat.numel()
            if n <= UPDATE_SAMPLE:
                out.append(flat)
                continue
            run = UPDATE_SAMPLE // UPDATE_CHUNKS
            out.append(flat.as_strided((UPDATE_CHUNKS, run), (n // UPDATE_CHUNKS, 1),
                                       flat.storage_offset()))
        self._views, self._views_key = out, key
        return out

    def _views_plan(self, views: list[Tensor]) -> S.NormPlan:
        if self._vplan is None or self._vplan.n != len(views):
            self._vplan = S.NormPlan(views)
        return self._vplan

    def before_update(self, only: frozenset[int] | None = None) -> None:
        """Copy the weights before the first optimizer update of a step. ``only``: the
        parameters that optimizer updates (indices into ``trainable``; None: all); each
        further optimizer of the step adds its own, and ``update_ratios`` leaves out (NaN)
        the layers none of them updated."""
        if self._before is not None:  # an earlier optimizer of this step copied them
            had = self._updating
            self._updating = None if had is None or only is None else had | only
            return
        if not self.trainable or self.trainable[0][0].is_sparse:
            return
        views = self._sample_views()
        self._before = self._views_plan(views).pack(views, copy=True)
        self._updating = only

    def _updated(self, only: frozenset[int]) -> Tensor:
        """Layers with a parameter in ``only`` (bool, on the device; made once per set)."""
        hit = self._updated_cache.get(only)
        if hit is None:
            hit = torch.zeros(self.n_layers, dtype=torch.bool, device=self.device)
            slots = [self.trainable[k][1] for k in sorted(only)]
            if slots:
                hit.index_fill_(0, device_tensor(slots, torch.long, self.device), True)
            if len(self._updated_cache) > 64:  # bounded: a few optimizers per model
                self._updated_cache.clear()
            self._updated_cache[only] = hit
        return hit

    def update_ratios(self) -> Tensor | None:
        """‖Δw‖/‖w‖ per layer over the sampled elements (exact for tensors <= 4096)."""
        before = self._before
        self._before = None
        if before is None:
            return None
        views = self._sample_views()
        plan = self._views_plan(views)
        after = plan.pack(views)
        dn = plan.norms(after - before)
        wn = plan.norms(after)
        if self._views_idx is None:
            self._views_idx = device_tensor([i for _, i in self.trainable], torch.long,
                                            self.device)
            has = torch.zeros(self.n_layers, dtype=torch.bool, device=self.device)
            self._views_has = has.index_fill_(0, self._views_idx, True)
        assert self._views_has is not None
        has = self._views_has
        if self._updating is not None:
            has = has & self._updated(self._updating)
        sq = torch.zeros(2, self.n_layers, device=self.device)
        sq.index_add_(1, self._views_idx, torch.stack([dn * dn, wn * wn]))
        if self._shards is not None:
            sq = self._shards.sum_(sq)
        return torch.where(has, torch.sqrt(sq[0]) / torch.sqrt(sq[1]),
                           torch.full_like(sq[0], math.nan))
