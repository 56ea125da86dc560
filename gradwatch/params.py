"""``ParamTracker``: per-layer statistics of the watched modules' own parameters, read at
optimizer steps (not from a hook): parameter-gradient norms, weight norms and update ratios,
with fused ``_foreach`` kernels (``stats.NormPlan``). All results are device tensors.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from gradwatch import stats as S
from gradwatch.buffers import ParamStepStats, device_tensor
from gradwatch.distributed import local, shard_reducer

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

    def grad_stats(self, sampled: bool = True,
                   only: frozenset[int] | None = None) -> ParamStepStats | None:
        """Per-layer gradient norms, RMS and non-finite flags; the max-abs only when
        ``sampled`` (a second pass over every gradient: sampled steps only). ``only``: the
        indices into ``trainable`` to read (one optimizer's parameters), None: all.

        Non-finite: on sampled steps from the max-abs, exact (an L2 norm of finite values can
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
        packed = plan.pack(grads) if sampled and plan.groups else grads  # type: ignore[arg-type]
        norms = plan.norms(packed)  # type: ignore[arg-type]
        L = self.n_layers
        sq = torch.zeros(L, device=self.device).index_add_(0, idx, norms * norms)
        if sampled:
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


def merge_grads(a: ParamStepStats | None, b: ParamStepStats | None) -> ParamStepStats | None:
    """Gradient statistics of one step read by two optimizers: ``b``'s layers over ``a``'s
    (device ops only; a layer whose parameters two optimizers share keeps ``b``'s read)."""
    if a is None or b is None:
        return b if a is None else a
    has = b.grad_present > 0

    def pick(x: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None or y is None else torch.where(has, y, x)

    return ParamStepStats(
        torch.where(has, b.grad_norm, a.grad_norm), torch.where(has, b.grad_rms, a.grad_rms),
        pick(a.grad_max, b.grad_max), torch.maximum(a.grad_present, b.grad_present),
        torch.where(has, b.grad_nonfinite, a.grad_nonfinite))
