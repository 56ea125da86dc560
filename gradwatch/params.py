"""``ParamTracker``: per-layer statistics of the watched modules' own parameters, read at
optimizer steps (not from a hook): parameter-gradient norms, weight norms and update ratios,
with fused ``_foreach`` kernels (``stats.NormPlan``). All results are device tensors.
"""

from __future__ import annotations

import math
from itertools import compress, repeat
from operator import is_not
from typing import Sequence

import torch
from torch import Tensor

from gradwatch import cpukernels as K
from gradwatch import stats as S
from gradwatch.buffers import ParamStepStats, nan_per_layer
from gradwatch.distributed import local, shard_reducer
from gradwatch.hostcopy import device_tensor

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

    Work per step (``stats.NormPlan``: on CUDA one ``_foreach`` kernel per list, on CPU the
    small tensors of one shape stacked into buffers made once): light steps, one norm pass
    over the gradients; sampled steps, the same pack of the gradients gives their norms and
    max-abs; before the update a copy of each trainable parameter's update sample; after
    it one pack of those samples gives both the weight norms of the parameters they cover
    whole and the update ratio's denominator, and the difference is taken in place in the
    copy. Only parameters larger than ``UPDATE_SAMPLE`` (and frozen ones) get a weight-norm
    pass of their own.
    """

    def __init__(self, owners: Sequence[tuple[Tensor, int]], n_layers: int,
                 device: torch.device) -> None:
        self.n_layers = n_layers
        self.device = device
        self.params = [p for p, _ in owners]
        self.trainable = [(p, i) for p, i in owners if p.requires_grad]
        self._tparams = [p for p, _ in self.trainable]
        self._all = tuple(range(len(self._tparams)))
        lidx = [i for _, i in owners]
        self._param_layers = lidx
        has = [False] * n_layers
        for i in lidx:
            has[i] = True
        # 0 where a layer owns a parameter, NaN where none: added to a result, one op
        # (device_tensor: a lazy model builds this in a forward hook, mid-training)
        self._nan_unowned = device_tensor([0.0 if h else math.nan for h in has],
                                          torch.float32, device)
        # never written: the source of the out-of-place index_add / scatter_reduce
        self._zeros = torch.zeros(n_layers, device=device)
        self._zeros2 = torch.zeros(2, n_layers, device=device)
        self._cache: dict[tuple[int, ...], _Layout] = {}
        self.present: tuple[int, ...] = ()  # trainable parameters with a gradient, last step
        self._before: S.Packed | None = None
        self._snap: K.UpdateViews | None = None  # the C kernels' snapshot (``_Weights.c``)
        self._after: tuple[S.Packed, S.Packed, Tensor] | None = None  # (before, after, norms)
        self._updating: frozenset[int] | None = None  # see before_update
        self._updated_cache: dict[frozenset[int] | None, Tensor] = {}
        self._w: _Weights | None = None
        # the C kernel's output vectors, by (tensors, sampled): handed back by ``recycle``
        # once a step's statistics are committed, so a step makes no tensor for them
        self._outs: dict[tuple[int, int, bool], _Out] = {}
        self._wout: _Out | None = None  # the weight norms' (``weight_norms``)
        # FSDP2: norms of local shards are partial; one all-reduce makes them global
        self._shards = shard_reducer(self.params)

    @property
    def sharded(self) -> bool:
        """The parameters are FSDP2 shards: a rank's gradient norms are of its own shards
        (the per-layer statistics are made global by an all-reduce)."""
        return self._shards is not None

    def _layout(self, present: tuple[int, ...], grads: list[Tensor]) -> _Layout:
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
            # CPU, not sharded: one C call for the norms and maxima (cpukernels.layer_norms)
            kind = K.list_kind(grads) if self._shards is None else -1
            hit = (idx_t, torch.sqrt(torch.clamp(numel_t, min=1.0)),
                   (numel_t > 0).to(torch.float32), plan, kind,
                   (tuple(g.numel() for g in grads), tuple(idx)))
            if len(self._cache) > 64:  # bounded: the set of present grads rarely changes
                self._cache.clear()
            self._cache[present] = hit
        return hit

    def grad_stats(self, sampled: bool = True,
                   only: frozenset[int] | None = None) -> ParamStepStats | None:
        """Per-layer gradient norms, RMS and non-finite flags; the max-abs only when
        ``sampled`` (from the same pack as the norms: sampled steps only). ``only``: the
        indices into ``trainable`` to read (one optimizer's parameters), None: all.

        Non-finite: on sampled steps from the max-abs, exact (an L2 norm of finite values can
        overflow, |g| ~ 1e19); on light steps from the norm, NaN only: an Inf gradient
        there shows as an infinite ``grad_rms`` (the rules report it as exploding at once).
        """
        if self._shards is None:
            gs = [p.grad for p in self._tparams]
        else:
            gs = [None if p.grad is None else local(p.grad) for p in self._tparams]
        # C-level loops (no Python frame per parameter): which gradients are there
        there = list(map(is_not, gs, repeat(None)))
        if all(there):
            present = self._all if only is None else tuple(sorted(only))
        else:
            present = tuple(compress(range(len(gs)), there))
            if only is not None:
                present = tuple(k for k in present if k in only)
        self.present = present
        if not present:
            return None
        grads = gs if len(present) == len(gs) else [gs[k] for k in present]
        idx, sqrt_numel, has, plan, kind, (numels, layers) = self._layout(
            present, grads)  # type: ignore[arg-type]
        L = self.n_layers
        if kind >= 0:  # CPU: the per-layer sums too, in the same C call
            out = self._outs.pop((len(layers), L, sampled), None) or _Out(len(layers), L,
                                                                          sampled)
            total = K.layer_norms(grads, kind, numels, layers, L, sampled,  # type: ignore
                                  out.buf)
            if total is not None:
                v = out.parts
                return ParamStepStats(v[1], v[2], v[3] if sampled else None, has,
                                      v[4] if sampled else None, v[0], idx,
                                      norm_sum=total, out=out)
        # one pack (into the plan's buffers) serves the norms and, when sampled, the max
        packed = plan.pack(grads, slot="grad") if plan.groups else grads  # type: ignore
        norms = plan.norms(packed)  # type: ignore[arg-type]
        sq = self._zeros.index_add(0, idx, norms * norms)
        nonfinite: Tensor | None = None
        if sampled:
            maxes = plan.absmax(packed)  # type: ignore[arg-type]
            gmax: Tensor | None = self._zeros.scatter_reduce(0, idx, maxes, "amax")
            # inf - inf and NaN - NaN are NaN: 1 where the max-abs is not finite, else 0
            nonfinite = self._zeros.index_add(0, idx, torch.nan_to_num_(maxes - maxes, nan=1.0))
        else:
            gmax = None  # the non-finite counts: made from the norms when read
        if self._shards is not None:
            if nonfinite is None:
                nonfinite = nan_per_layer(self._zeros, idx, norms)
            both = self._shards.sum_(torch.stack([sq, nonfinite]))
            sq, nonfinite = both[0], both[1]
            if gmax is not None:
                gmax = self._shards.max_(gmax)
        gnorm = torch.sqrt(sq)
        return ParamStepStats(gnorm, gnorm / sqrt_numel, gmax, has, nonfinite, norms, idx)

    def recycle(self, stats: ParamStepStats | None) -> None:
        """``stats`` are committed and nothing else holds them (a step found finite): their
        kernel output serves the next step."""
        if stats is not None and stats.out is not None and stats.finite:
            out, stats.out = stats.out, None
            self._outs[out.key] = out

    # -- weights: norms after the update, and the update ratio's samples ---------------------
    def _weights(self) -> _Weights:
        """The layout of the weight reads, made again only when a large parameter's storage
        changes (``p.data = ...``; the small ones are read through the parameter itself)."""
        w = self._w
        if self._shards is not None:  # local shards: the same storage, new tensor objects
            loc = [local(p) for p in self.params]
            key: tuple[int, ...] = tuple(t.data_ptr() for t in loc)
        else:
            loc = self.params
            key = () if w is None else tuple(p.data_ptr() for p in w.big)
        if w is None or key != w.key:
            w = _Weights(self, loc)
            if self._shards is None:
                key = tuple(p.data_ptr() for p in w.big)
            w.key = key
            self._w = w
        return w

    def weight_norms(self) -> Tensor | None:
        """‖w‖ per layer after the update: the parameters of at most ``UPDATE_SAMPLE``
        elements from the update ratio's pack of the same step (one read), the others in
        one norm pass of their own."""
        if not self.params:
            return None
        w = self._weights()
        L = self.n_layers
        if w.wkind >= 0:  # CPU: every parameter's norm and the per-layer ones, one C call
            # into a vector made once (committed within the step); NaN for a layer that
            # owns no parameter (``_nan_unowned``): no op after the pass
            out = self._wout
            if out is None or out.key != (len(self.params), L, False):
                out = self._wout = _Out(len(self.params), L, False)
            if K.layer_norms(self.params, w.wkind, w.wnumels, w.wlayers, L, False, out.buf,
                             math.nan) is not None:
                return out.parts[1]
        parts = []
        if w.views:
            parts.append(self._after_norms(w))
        if w.extra:
            parts.append(w.eplan.norms(w.eplan.pack(w.extra, slot="weight") if w.eplan.groups
                                       else w.extra))
        norms = parts[0] if len(parts) == 1 else torch.cat(parts)
        sq = w.zeros1.index_add(0, w.widx, norms * norms)[:L]
        if self._shards is not None:
            sq = self._shards.sum_(sq)
        return torch.sqrt(sq) + self._nan_unowned

    def _after_norms(self, w: _Weights) -> Tensor:
        """Norms of the update samples after the update; the pack is kept for
        ``update_ratios`` when a copy was taken before it."""
        before = self._before
        if before is not None:
            after = w.vplan.pack(w.views, slot="after")
            norms = w.vplan.norms(after)
            self._after = (before, after, norms)
            return norms
        return w.vplan.norms(w.vplan.pack(w.views, slot="after") if w.vplan.groups
                             else w.views)

    # -- update ratio: a sample of each parameter, copied before the step --------------------
    def before_update(self, only: frozenset[int] | None = None) -> None:
        """Copy the weights before the first optimizer update of a step. ``only``: the
        parameters that optimizer updates (indices into ``trainable``; None: all); each
        further optimizer of the step adds its own, and ``update_ratios`` leaves out (NaN)
        the layers none of them updated."""
        if self._before is not None or self._snap is not None:
            # an earlier optimizer of this step copied them
            had = self._updating
            self._updating = None if had is None or only is None else had | only
            return
        if not self.trainable or self.trainable[0][0].is_sparse:
            return
        w = self._weights()
        self._after = None
        # CPU: one C call copies the views into the snapshot buffer
        self._snap = w.c if w.c is not None and w.c.snapshot() else None
        if self._snap is None:
            self._before = w.vplan.pack(w.views, copy=True, slot="before")
        self._updating = only

    def _nan_not_updated(self, only: frozenset[int] | None) -> Tensor:
        """0 for layers with a parameter in ``only`` (None: any trainable one), NaN for the
        others (on the device; made once per set)."""
        hit = self._updated_cache.get(only)
        if hit is None:
            layers = {self.trainable[k][1] for k in (range(len(self.trainable)) if only is None
                                                    else only)}
            hit = device_tensor([0.0 if i in layers else math.nan
                                 for i in range(self.n_layers)], torch.float32, self.device)
            if len(self._updated_cache) > 64:  # bounded: a few optimizers per model
                self._updated_cache.clear()
            self._updated_cache[only] = hit
        return hit

    def update_ratios(self) -> Tensor | None:
        """‖Δw‖/‖w‖ per layer over the sampled elements (exact for tensors <= 4096)."""
        before = self._before
        self._before = None
        kept, self._after = self._after, None
        snap, self._snap = self._snap, None
        if snap is not None:
            r = snap.ratios(self.n_layers)
            if r is not None and self._updating is not None:  # None: every view updated
                return r + self._nan_not_updated(self._updating)
            return r  # None: the parameters changed form during the step, not measured
        if before is None:
            return None
        w = self._weights()
        if kept is not None and kept[0] is before:
            after, wn = kept[1], kept[2]
        else:
            after = w.vplan.pack(w.views, slot="after")
            wn = w.vplan.norms(after)
        dn = w.vplan.norms(before.sub_(after))  # the copy is spent: Δ in place
        sq = self._zeros2.index_add(1, w.vidx, torch.stack([dn, wn]).square_())
        if self._shards is not None:
            sq = self._shards.sum_(sq)
        r = torch.sqrt(sq)
        return r[0] / r[1] + self._nan_not_updated(self._updating)


class _Out:
    """The fp32 vector ``cpukernels.layer_norms`` writes for ``k`` tensors of ``L`` layers,
    and its parts (``[norms | layer norm | layer RMS]``, with ``sampled`` also ``[layer max
    |x| | layer non-finite]``) as views made once."""

    __slots__ = ("key", "buf", "parts", "ptrs")

    def __init__(self, k: int, L: int, sampled: bool) -> None:
        self.key = (k, L, sampled)
        self.buf = torch.empty(k + (4 if sampled else 2) * L, dtype=torch.float32)
        self.parts = self.buf.split([k, L, L] + ([L, L] if sampled else []))
        self.ptrs = tuple(t.data_ptr() for t in self.parts)  # for buffers.commit_step


# a gradient list's layout: layer index, sqrt(numel) and presence per layer, the norm plan,
# the C kernels' element type (-1: not for them), and the element count and layer of each
_Layout = tuple[Tensor, Tensor, Tensor, S.NormPlan, int, tuple[tuple[int, ...], tuple[int, ...]]]


class _Weights:
    """The layout of a tracker's weight reads.

    ``views``: per trainable parameter, the parameter itself when it has at most
    ``UPDATE_SAMPLE`` elements, else ``UPDATE_CHUNKS`` evenly spaced contiguous runs of it
    (a plain stride would touch one cache line per element: 7x slower here for a 512x512
    weight). ``extra``: the parameters whose weight norm no view gives whole (larger ones,
    frozen ones). ``widx``: the layer of each norm of ``views + extra`` that is a weight
    norm, ``n_layers`` (a slot dropped) for the partial samples.
    """

    def __init__(self, t: ParamTracker, loc: Sequence[Tensor]) -> None:
        L = t.n_layers
        pos = {id(p): j for j, p in enumerate(t.params)}
        views: list[Tensor] = []
        whole: set[int] = set()
        widx: list[int] = []
        self.big: list[Tensor] = []
        for p, i in t.trainable:
            j = pos[id(p)]
            x = loc[j]
            n = x.numel()
            if n <= UPDATE_SAMPLE:
                views.append(x)
                whole.add(j)
                widx.append(i)
                continue
            self.big.append(p)
            flat = x.detach().reshape(-1)
            rows, run, stride = S.sample_runs(n, UPDATE_SAMPLE, UPDATE_CHUNKS)
            views.append(flat.as_strided((rows, run), (stride, 1), flat.storage_offset()))
            widx.append(L)
        layer = [i for _, i in t.trainable]
        rest = [j for j in range(len(t.params)) if j not in whole]
        self.extra = [loc[j] for j in rest]
        widx += [t._param_layers[j] for j in rest]
        self.views = views
        self.key: tuple[int, ...] = ()
        dev = t.device
        self.vplan = S.NormPlan(views)
        self.eplan = S.NormPlan(self.extra)
        self.vidx = device_tensor(layer, torch.long, dev)
        self.widx = device_tensor(widx, torch.long, dev)
        self.zeros1 = torch.zeros(L + 1, device=dev)
        # CPU, not sharded: the C kernels read the same elements (cpukernels); None / -1
        # where they do not apply
        self.c: K.UpdateViews | None = None
        self.wkind = -1
        self.wnumels: tuple[int, ...] = ()
        self.wlayers: tuple[int, ...] = ()
        if t._shards is None and loc:
            tp = [p for p, _ in t.trainable]
            kind = K.list_kind(tp) if tp else -1
            if kind >= 0:
                self.c = K.UpdateViews(tp, layer, kind, UPDATE_SAMPLE, UPDATE_CHUNKS)
            self.wkind = K.list_kind(loc)
            self.wnumels = tuple(p.numel() for p in loc)
            self.wlayers = tuple(t._param_layers)


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
