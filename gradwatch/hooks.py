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

import math
import warnings
import weakref
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves
from torch.utils.hooks import RemovableHandle

from gradwatch import stats as S
from gradwatch.alerts import GradwatchWarning
from gradwatch.buffers import ParamStepStats, WindowBuffers
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
        if c is not None and c.act_on:
            c.on_output(self.slot, output)
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
        # elements counted per large activation (stats.activation_sums); None: every one
        self.sample: int | None = S.SAMPLE_SIZE
        self._phase = 0  # rotates the sample offset from call to call
        self.act_on = True
        self.grad_on = True
        self.called = [False] * len(layers)
        self.order: list[int] = []  # slots in order of first forward call
        # (id, version) -> tensor weakref: a tensor gets its gradient hook once per step
        self._hooked: dict[tuple[int, int], weakref.ref[Tensor]] = {}
        self._handles: list[RemovableHandle] = []
        self._faults: set[str] = set()
        buffers.set_bounded([info.bounds is not None for info in layers])

    # -- forward ----------------------------------------------------------------------------
    def on_output(self, slot: int, output: Any) -> None:
        try:
            if not self.called[slot]:
                self.called[slot] = True
                self.order.append(slot)
            leaves = (output,) if isinstance(output, Tensor) else tree_leaves(output)
            first = True
            for t in leaves:
                if not isinstance(t, Tensor) or not t.is_floating_point() or t.is_sparse:
                    continue
                n = t.numel()
                if n == 0:
                    continue
                if first:
                    first = False
                    grad_was = torch.is_grad_enabled()  # cheaper than `with no_grad()`
                    torch._C._set_grad_enabled(False)
                    try:
                        if self.full:
                            phase = 0
                            if not torch.compiler.is_compiling():  # a changing int recompiles
                                self._phase = phase = (self._phase + 1) & 0xFFFFFF
                            vec = S.activation_sums(t, self.layers[slot].bounds, self.margin,
                                                    self.sample, phase, sat_placeholder=True)
                            self.buffers.push_activation(slot, vec, n)
                        else:
                            self.buffers.push_check_sum(slot, S.nonfinite_sum(t))
                    finally:
                        torch._C._set_grad_enabled(grad_was)
                if t.requires_grad and self.grad_on:
                    key = (id(t), t._version)
                    ref = self._hooked.get(key)
                    if ref is None or ref() is not t:
                        self._hooked[key] = weakref.ref(t)
                        self._handles.append(t.register_hook(OutGradHook(self, slot)))
        except Exception as e:  # never take the training down
            self.act_on = False
            self.fault("forward hook", self.layers[slot].name, e)

    # -- backward ---------------------------------------------------------------------------
    def on_out_grad(self, slot: int, grad: Tensor) -> None:
        try:
            if self.full:
                self.buffers.push_out_grad(slot, S.grad_sq_sum(grad), grad.numel())
            else:  # numel 0: a check sum, only for the non-finite flag
                self.buffers.push_out_grad(slot, S.nonfinite_sum(grad), 0)
        except Exception as e:
            self.grad_on = False
            self.fault("output-gradient hook", self.layers[slot].name, e)

    # -- step boundary ----------------------------------------------------------------------
    def end_step(self) -> None:
        self._hooked.clear()
        self._handles.clear()

    def remove_tensor_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self.end_step()

    def fault(self, stage: str, layer: str, exc: BaseException) -> None:
        """Report an internal failure once per stage; the caller switches that part off."""
        if stage in self._faults:
            return
        self._faults.add(stage)
        warnings.warn(
            f"gradwatch: internal error in the {stage} (layer {layer!r}): "
            f"{type(exc).__name__}: {exc}; this part of the watcher is switched off, "
            "training continues",
            GradwatchWarning,
            stacklevel=2,
        )


class _StepHook:
    """Optimizer step pre/post hook; inert when copied or pickled."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn = weakref.WeakMethod(fn)  # type: ignore[arg-type]

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        fn = self._fn()
        if fn is not None:
            fn()
        return None

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_Inert, ())


# Largest number of elements per parameter copied to measure an update ratio: an evenly
# strided sample (the ratio of two norms of the same 4,096 elements: relative error of a
# few percent for a stat read on a log scale; 65,536 cost 1.6 ms per step on an 8x512x512
# MLP on one CPU core, 4,096 a tenth of that).
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
        # detached views made once (a detach is a dispatched op): rebuilt if a parameter's
        # storage was replaced (param.data = ...)
        self._detached: list[Tensor] = []
        self._views: list[Tensor] = []
        self._before_buf: list[Tensor] = []

    @staticmethod
    def _fresh(views: list[Tensor], params: Sequence[Tensor]) -> bool:
        # a view made by detach()/reshape/slicing from the start keeps the data pointer
        return len(views) == len(params) and all(
            v.data_ptr() == p.data_ptr() for v, p in zip(views, params))

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

    def grad_stats(self, with_max: bool = True) -> ParamStepStats | None:
        """Norms every step; ``with_max=False`` (a step without the full stat set) skips
        the per-parameter max|g| pass and reports 0 (the window max is unchanged)."""
        present = tuple(k for k, (p, _) in enumerate(self.trainable) if p.grad is not None)
        if not present:
            return None
        grads = [self.trainable[k][0].grad for k in present]
        idx, numel, has = self._layout(present)
        norms = S.foreach_norms(grads, 2.0)  # type: ignore[arg-type]
        L = self.n_layers
        sq = torch.zeros(L, device=self.device).index_add_(0, idx, norms * norms)
        gnorm = torch.sqrt(sq)
        grms = gnorm / torch.sqrt(torch.clamp(numel, min=1.0))
        gmax = torch.zeros(L, device=self.device)
        if with_max:
            maxes = S.foreach_absmax(grads)  # type: ignore[arg-type]
            gmax.scatter_reduce_(0, idx, maxes, "amax")
        bad = torch.isfinite(norms).logical_not().to(torch.float32)
        nonfinite = torch.zeros(L, device=self.device).index_add_(0, idx, bad)
        return ParamStepStats(gnorm, grms, gmax, has, nonfinite)

    def weight_norms(self) -> Tensor | None:
        if not self.params:
            return None
        if not self._fresh(self._detached, self.params):
            self._detached = [p.detach() for p in self.params]
        norms = S.foreach_norms(self._detached, 2.0)
        sq = torch.zeros(self.n_layers, device=self.device).index_add_(
            0, self._all_idx, norms * norms
        )
        return torch.where(self._has_param, torch.sqrt(sq), torch.full_like(sq, math.nan))

    # -- update ratio: a strided sample of each parameter, copied before the step -----------
    def _sample_views(self) -> list[Tensor]:
        params = [p for p, _ in self.trainable]
        if not self._fresh(self._views, params):
            out = []
            for p in params:
                flat = p.detach().reshape(-1)
                stride = max(1, -(-flat.numel() // UPDATE_SAMPLE))
                out.append(flat[::stride])
            self._views = out
            self._before_buf = [v.clone() for v in out]
        return self._views

    def before_update(self) -> None:
        if not self.trainable or self.trainable[0][0].is_sparse:
            self._before = None
            return
        views = self._sample_views()
        torch._foreach_copy_(self._before_buf, views)
        self._before = self._before_buf

    def update_ratios(self) -> Tensor | None:
        """‖Δw‖/‖w‖ per layer over the sampled elements (exact for tensors <= 4096)."""
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
        has = torch.zeros(L, dtype=torch.bool, device=self.device)
        has[self._views_idx] = True
        return torch.where(has, torch.sqrt(d2) / torch.sqrt(w2), torch.full_like(d2, math.nan))
