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
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves
from torch.utils.hooks import RemovableHandle

from gradwatch import stats as S
from gradwatch.alerts import GradwatchWarning, logger
from gradwatch.buffers import ParamStepStats, WindowBuffers
from gradwatch.distributed import local, shard_reducer
from gradwatch.selection import LayerInfo


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


class ForwardHook(_Hook):
    __slots__ = ()

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        c = self._collector()
        if c is not None and (c.act_on or c.grad_on):
            c.on_output(self.slot, output)
        return None


class ForwardDoneHook(_Hook):
    """Forward hook on the watched root: ends the identity bookkeeping of compiled code."""

    __slots__ = ()

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        c = self._collector()
        if c is not None:
            c._traced.clear()
        return None


class OutGradHook(_Hook):
    __slots__ = ()

    def __call__(self, grad: Tensor) -> None:
        c = self._collector()
        if c is not None and c.grad_on:
            c.on_out_grad(self.slot, grad)
        return None


class Collector:
    """Hot-path state shared by all hooks of one watcher: buffers, step mode, faults."""

    def __init__(self, buffers: WindowBuffers, layers: list[LayerInfo], margin: float) -> None:
        self.buffers = buffers
        self.layers = layers
        self.margin = margin
        self.full = True  # this step collects the full stat set (a sampled step)
        # elements read for the counts of a large output (None: every element)
        self.sample: int | None = S.SAMPLE_SIZE
        self.act_on = True
        self.grad_on = True
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

    # -- forward ----------------------------------------------------------------------------
    def on_output(self, slot: int, output: Any) -> None:
        # Two parts that fail and switch off independently: activation statistics, and
        # the placement of the output-gradient hooks. Never take the training down.
        try:
            if not self.called[slot]:
                self.called[slot] = True
                self.order.append(slot)
            leaves = [t for t in tree_leaves(output) if isinstance(t, Tensor)
                      and t.is_floating_point() and not t.is_sparse and t.numel() > 0]
        except Exception as e:
            self.act_on = self.grad_on = False
            self.fault("forward hook", self.layers[slot].name, e)
            return
        if leaves and self.act_on:
            try:
                t = leaves[0]
                if self.full:
                    bounds = self.layers[slot].bounds
                    vec = S.activation_sums(t, bounds, self.margin, self.sample)
                    self.buffers.add_activation(slot, vec, t.numel())
                    if bounds is not None:
                        stuck = S.stuck_units(t, bounds, self.margin)
                        self.buffers.add_stuck(slot, stuck, S.units_of(t))
                    if self.hist is not None:
                        self.hist.add_activation(slot, t)
                else:
                    self.buffers.add_nonfinite(slot, S.nonfinite_flag(t))
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
        try:
            if self.full:
                self.buffers.add_out_grad(slot, S.grad_sq_sum(grad), grad.numel())
            else:  # the gradient column: the output column locates where a NaN started
                self.buffers.add_grad_nonfinite(slot, S.nonfinite_flag(grad))
        except Exception as e:
            self.grad_on = False
            self.fault("output-gradient hook", self.layers[slot].name, e)

    # -- step boundary ----------------------------------------------------------------------
    def end_step(self) -> None:
        self._hooked.clear()
        self._traced.clear()
        self._handles.clear()

    def remove_tensor_hooks(self) -> None:
        for h in self._handles:
            h.remove()
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


class _StepHook:
    """Optimizer step pre/post hook; inert when copied or pickled.

    Calls ``fn(closure)``: whether ``step`` was given a closure (positional or keyword),
    in which case the gradients only exist once the step has run the closure.
    """

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[[bool], None]) -> None:
        self._fn = weakref.WeakMethod(fn)  # type: ignore[arg-type]

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        fn = self._fn()
        if fn is not None:
            closure = kwargs.get("closure") if kwargs else None
            if closure is None and len(args) > 1:  # args[0] is the optimizer itself
                closure = args[1]
            fn(callable(closure))
        return None

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_Inert, ())


# Largest number of elements per parameter copied to measure an update ratio.
UPDATE_SAMPLE = 4096


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
        self._all_idx = torch.tensor(lidx, dtype=torch.long, device=device)
        has = [False] * n_layers
        for i in lidx:
            has[i] = True
        self._has_param = torch.tensor(has, device=device)
        self._cache: dict[tuple[int, ...], tuple[Tensor, Tensor, Tensor]] = {}
        self._before: list[Tensor] | None = None
        self._views_idx: Tensor | None = None
        # FSDP2: norms of local shards are partial; one all-reduce makes them global
        self._shards = shard_reducer(self.params)

    def _layout(self, present: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
        hit = self._cache.get(present)
        if hit is None:
            numel = [0.0] * self.n_layers
            idx = []
            for k in present:
                p, i = self.trainable[k]
                numel[i] += p.numel()
                idx.append(i)
            idx_t = torch.tensor(idx, dtype=torch.long, device=self.device)
            numel_t = torch.tensor(numel, dtype=torch.float32, device=self.device)
            hit = (idx_t, numel_t, (numel_t > 0).to(torch.float32))
            if len(self._cache) > 64:  # bounded: the set of present grads rarely changes
                self._cache.clear()
            self._cache[present] = hit
        return hit

    def grad_stats(self) -> ParamStepStats | None:
        present = tuple(k for k, (p, _) in enumerate(self.trainable) if p.grad is not None)
        if not present:
            return None
        grads = [local(self.trainable[k][0].grad) for k in present]  # type: ignore[arg-type]
        idx, numel, has = self._layout(present)
        norms = S.foreach_norms(grads, 2.0)
        maxes = S.foreach_absmax(grads)
        L = self.n_layers
        sq = torch.zeros(L, device=self.device).index_add_(0, idx, norms * norms)
        gmax = torch.zeros(L, device=self.device).scatter_reduce_(0, idx, maxes, "amax")
        # from the max-abs, exact: an L2 norm of finite values can overflow (|g| ~ 1e19)
        bad = torch.isfinite(maxes).logical_not().to(torch.float32)
        nonfinite = torch.zeros(L, device=self.device).index_add_(0, idx, bad)
        if self._shards is not None:
            both = self._shards.sum_(torch.stack([sq, nonfinite]))
            sq, nonfinite = both[0], both[1]
            gmax = self._shards.max_(gmax)
        gnorm = torch.sqrt(sq)
        grms = gnorm / torch.sqrt(torch.clamp(numel, min=1.0))
        return ParamStepStats(gnorm, grms, gmax, has, nonfinite)

    def weight_norms(self) -> Tensor | None:
        if not self.params:
            return None
        norms = S.foreach_norms([local(p.detach()) for p in self.params], 2.0)
        sq = torch.zeros(self.n_layers, device=self.device).index_add_(
            0, self._all_idx, norms * norms
        )
        if self._shards is not None:
            sq = self._shards.sum_(sq)
        return torch.where(self._has_param, torch.sqrt(sq), torch.full_like(sq, math.nan))

    # -- update ratio: a strided sample of each parameter, copied before the step -----------
    def _sample_views(self) -> list[Tensor]:
        out = []
        for p, _ in self.trainable:
            flat = local(p.detach()).reshape(-1)
            stride = max(1, -(-flat.numel() // UPDATE_SAMPLE))
            out.append(flat[::stride])
        return out

    def before_update(self) -> None:
        if not self.trainable or self.trainable[0][0].is_sparse:
            self._before = None
            return
        self._before = [v.clone() for v in self._sample_views()]

    def update_ratios(self) -> Tensor | None:
        """‖Δw‖/‖w‖ per layer over the sampled elements (exact for tensors <= 65536)."""
        before = self._before
        self._before = None
        if before is None:
            return None
        after = self._sample_views()
        delta = torch._foreach_sub(after, before)
        dn = S.foreach_norms(delta, 2.0)
        wn = S.foreach_norms(after, 2.0)
        if self._views_idx is None:
            self._views_idx = torch.tensor(
                [i for _, i in self.trainable], dtype=torch.long, device=self.device
            )
        L = self.n_layers
        d2 = torch.zeros(L, device=self.device).index_add_(0, self._views_idx, dn * dn)
        w2 = torch.zeros(L, device=self.device).index_add_(0, self._views_idx, wn * wn)
        if self._shards is not None:
            both = self._shards.sum_(torch.stack([d2, w2]))
            d2, w2 = both[0], both[1]
        has = torch.zeros(L, dtype=torch.bool, device=self.device)
        has[self._views_idx] = True
        return torch.where(has, torch.sqrt(d2) / torch.sqrt(w2), torch.full_like(d2, math.nan))
