"""One-pass statistics of CPU tensors: the sampled step's reductions in one C call.

On CPU every PyTorch op costs its dispatch, a few microseconds whatever its size, and the
statistics of one output took about twenty ops (``stats.activation_parts`` and
``stats.stuck_units``): a sampled step of a small, fast model spent most of its extra time
there. The C kernels of ``gradwatch._kernels`` (built at install where a C compiler is
found) read a contiguous float32 or bfloat16 CPU tensor once and write the sums straight
into the layer's row of the watcher's preallocated fp32 stage, as ``WindowBuffers.fold``
adds the ops' rows; nothing is read back to Python but a flag.

Where the kernels do not apply -- CUDA and other devices, other dtypes, strided or
subclassed tensors, code that torch.compile traces, a NaN or an Inf -- the PyTorch ops give
the same statistics (their counts of an output above 262,144 elements on a sample; the
kernels read every element). The kernels agree
with them exactly on the maxima, minima and counts; the sums are accumulated in double per
block of fp32 sums, at least as close to a float64 reference as PyTorch's fp32 reductions.
"""

from __future__ import annotations

import logging
from operator import attrgetter
from typing import Any, Sequence

import torch
from torch import Tensor

from gradwatch import stats as S

try:
    from gradwatch import _kernels as _built
except ImportError:  # built without a C compiler: the PyTorch ops do the same
    _built = None
#: the C module (its functions are documented in _kernels.c), or None
_kernels: Any = _built

#: The C kernels are built and importable here.
AVAILABLE = _kernels is not None

_KIND = {torch.float32: 0, torch.bfloat16: 1}
_DTYPE = attrgetter("dtype")
#: tensor types whose memory is their values (a parameter is one; fake, distributed or
#: other subclassed tensors are not)
_PLAIN = (Tensor, torch.nn.Parameter)


def kind_of(t: Tensor) -> int:
    """The kernels' code for ``t``'s element type, or -1 when they do not take ``t``:
    a dense contiguous CPU tensor of float32 or bfloat16 with storage (a plain
    ``torch.Tensor`` or a parameter: subclasses such as fake or distributed tensors keep
    the ops)."""
    if _kernels is None or not t.is_cpu or type(t) not in _PLAIN or t.layout != torch.strided:
        return -1
    k = _KIND.get(t.dtype, -1)
    if k < 0 or not t.is_contiguous() or t.is_neg():
        return -1
    return k


def list_kind(tensors: Sequence[Tensor]) -> int:
    """``kind_of`` shared by every tensor of a non-empty list (the same element type, none
    empty), or -1."""
    kinds = {kind_of(t) if t.numel() else -1 for t in tensors}
    return kinds.pop() if len(kinds) == 1 else -1


def layer_norms(tensors: Sequence[Tensor], kind: int, numels: Sequence[int],
                layers: Sequence[int], n_layers: int, with_max: bool, out: Tensor,
                empty: float = 0.0) -> float | None:
    """Per-tensor and per-layer gradient statistics of a list, from one C call: one pass
    over each tensor, nothing stacked or copied. Tensor ``i`` belongs to layer
    ``layers[i]``. Writes ``out`` (a contiguous fp32 CPU vector): ``[norms
    (len(tensors)) | layer norm | layer RMS]`` and with ``with_max`` also ``[layer max |x|
    | layer non-finite count]``, each part ``n_layers`` long (see ``_kernels.c``: a NaN
    gives NaN, as the ops do; a layer without any tensor has norm and RMS ``empty``).
    Returns the sum of the norms, on the host (CPU memory: the kernel has it at hand).

    ``kind``, ``numels``: the list's ``list_kind`` and element counts, found once for a list
    whose tensors are made anew each step (gradients), checked again (``_addresses``).
    None where the kernel does not apply."""
    ptrs = _addresses(tensors, kind, numels)
    if ptrs is None:
        return None
    if out.numel() != len(ptrs) + (4 if with_max else 2) * n_layers:
        raise ValueError(f"out: {out.numel()} elements for {len(ptrs)} tensors")
    return _kernels.layer_norms(ptrs, numels, layers, n_layers, kind, out.data_ptr(),
                                with_max, empty)


def _addresses(tensors: Sequence[Tensor], kind: int, numels: Sequence[int]
               ) -> list[int] | None:
    """The tensors' addresses now, or None unless each still is a contiguous tensor of the
    element type ``kind`` and of its count in ``numels`` (a gradient made in another
    layout, a parameter whose ``.data`` was replaced): the kernels read exactly that
    memory, so nothing is read otherwise."""
    try:
        dtypes = set(map(_DTYPE, tensors))
        if (len(dtypes) != 1 or _KIND.get(dtypes.pop(), -1) != kind
                or not all(map(Tensor.is_contiguous, tensors))
                or tuple(map(Tensor.numel, tensors)) != tuple(numels)):
            return None
        return list(map(Tensor.data_ptr, tensors))
    except RuntimeError:  # a sparse or storage-less tensor
        return None


class UpdateViews:
    """The update ratio's reads of a list of parameters, for the C kernels: parameter ``i``
    whole when it has at most ``sample`` elements, else ``chunks`` evenly spaced contiguous
    runs of it (``params._Weights.views``, the same elements), and a snapshot buffer of
    them all. ``kind``: the list's ``list_kind`` (>= 0)."""

    def __init__(self, params: Sequence[Tensor], layers: Sequence[int], kind: int,
                 sample: int, chunks: int) -> None:
        self.params = list(params)
        self.kind = kind
        self.layers = tuple(layers)
        rows, runs, strides = [], [], []
        for p in self.params:
            r, run, stride = S.sample_runs(p.numel(), sample, chunks)
            rows.append(r)
            runs.append(run)
            strides.append(stride)
        self.rows, self.runs, self.strides = tuple(rows), tuple(runs), tuple(strides)
        self.numels = tuple(p.numel() for p in self.params)
        self.buf = torch.empty(sum(r * n for r, n in zip(rows, runs)), dtype=torch.float32)

    def _ptrs(self) -> list[int] | None:
        return _addresses(self.params, self.kind, self.numels)

    def snapshot(self) -> bool:
        """Copy the views into the buffer (before the update). False: nothing copied."""
        ptrs = self._ptrs()
        if ptrs is None:
            return False
        _kernels.snapshot(ptrs, self.rows, self.runs, self.strides, self.kind,
                          self.buf.data_ptr())
        return True

    def ratios(self, n_layers: int) -> Tensor | None:
        """Per layer ‖w - w_snapshot‖ / ‖w‖ over the views (NaN for a layer without any),
        or None when the parameters changed form since ``snapshot``."""
        ptrs = self._ptrs()
        if ptrs is None:
            return None
        out = torch.empty(n_layers, dtype=torch.float32)
        _kernels.update_ratios(ptrs, self.rows, self.runs, self.strides, self.kind,
                               self.buf.data_ptr(), self.layers, n_layers, out.data_ptr())
        return out


def add_columns(dst: Tensor, cols: Sequence[int], srcs: Sequence[Tensor]) -> bool:
    """``dst[:, cols[j]] += srcs[j]`` for every ``j``, in one C call: ``dst`` a contiguous
    fp32 CPU matrix, each of ``srcs`` a contiguous fp32 CPU vector of its rows (what
    ``index_add_`` of the stacked vectors does, without the stack). False, nothing
    added, where they are not."""
    if _kernels is None:
        return False
    rows = dst.shape[0]
    for t in srcs:
        if t.dtype is not torch.float32 or not t.is_cpu or t.shape != (rows,) or (
                not t.is_contiguous()):
            return False
    return add_at(dst, cols, [t.data_ptr() for t in srcs])


def add_at(dst: Tensor, cols: Sequence[int], addrs: Sequence[int]) -> bool:
    """``add_columns`` of vectors known to be contiguous fp32 CPU vectors of ``dst``'s
    rows, given by their addresses (made so by gradwatch: nothing checked). False, nothing
    added, without the kernels."""
    if _kernels is None:
        return False
    _kernels.add_columns(dst.data_ptr(), dst.shape[1], dst.shape[0], cols, addrs)
    return True


#: ``commit``'s ways of taking a per-layer vector into its window column (``_kernels.c``):
#: add it, max it in (``torch.maximum``: NaN wins), add it where it is not NaN, add 1 where
#: it is not NaN
ADD, MAX, ADD_KNOWN, COUNT_KNOWN = range(4)


def commit(dst: Tensor, ops: Sequence[tuple[int, int, Tensor]], fixed: Sequence[Any],
           stage: int | None, act_cols: Sequence[int]) -> bool:
    """A step's per-layer values into the window ``dst`` (a contiguous fp32 CPU matrix) in
    one C call, what ``buffers.WindowBuffers.commit_step`` does with ops: each ``(mode,
    col, vec)`` of ``ops`` takes ``vec`` (fp32, one value per row) into column ``col`` as
    ``mode`` says; ``fixed``: the same as ``(mode, col, address, stride)`` of gradwatch's
    own buffers, found once; with ``stage`` (the address of the fp32 ``[rows,
    buffers.STAGE_COLS]`` stage), its activation statistics go into ``act_cols``
    (``buffers._ACT_COLS``' columns, then act_max's), from each stage row with the ops' fp32
    operations in their order. Several adds into one column (the non-finite count's parts)
    are done one by one, in order, where the ops sum them first: the same value while they
    are whole counts. False, nothing touched, where a vector is not an fp32 CPU vector of
    the window's rows."""
    if _kernels is None:
        return False
    rows = dst.shape[0]
    spec = list(fixed)
    for mode, col, t in ops:
        if (t.dtype is not torch.float32 or not t.is_cpu or type(t) not in _PLAIN
                or t.shape != (rows,) or t.stride(0) < 1):
            return False
        spec.append((mode, col, t.data_ptr(), t.stride(0)))
    _kernels.commit(dst.data_ptr(), dst.shape[1], rows, spec, stage, act_cols)
    return True


def act_row(t: Tensor, kind: int, units: int, bounds: tuple[float, float] | None,
            margin: float, out: int) -> bool:
    """The statistics of one call, ``t``, added into its layer's stage row at address
    ``out`` (``buffers.STAGE_COLS`` fp32 values of a CPU tensor): numel, Σx, Σx², nonzeros,
    non-finite (none), saturated, stuck units and units are added, max |x| is maxed in --
    what ``WindowBuffers.fold`` does with a row of the ops. ``units``: ``t`` read as
    ``[numel // units, units]`` for the stuck units (``stats.stuck_units``), used when
    ``bounds`` is set. False, the row untouched, when ``t`` holds a NaN or an Inf or its
    storage cannot be read: the caller then takes the ops' path."""
    try:
        ptr = t.data_ptr()
    except RuntimeError:  # a tensor without storage (functional or batched wrappers)
        return False
    if bounds is None:
        return bool(_kernels.act_row(ptr, t.numel(), 1, kind, False, 0.0, 0.0, 0.0, 0.0, out))
    key = (bounds, margin, kind)
    consts = _CONSTS.get(key)
    if consts is None:
        consts = _CONSTS[key] = _bounded_consts(bounds, margin, t.dtype)
    c, r, slo, shi = consts
    return bool(_kernels.act_row(ptr, t.numel(), units, kind, True, c, r, slo, shi, out))


_CONSTS: dict[tuple[tuple[float, float], float, int], tuple[float, float, float, float]] = {}


def _bounded_consts(bounds: tuple[float, float], margin: float, dtype: torch.dtype
                    ) -> tuple[float, float, float, float]:
    """The saturation centre and radius (``stats.centre_radius``, compared in fp32 as the
    ops compare them after their fp32 copy) and the stuck thresholds
    (``stats.stuck_thresholds``), rounded to ``dtype`` as ``stats.stuck_units`` compares
    them (a Python scalar takes the tensor's dtype)."""
    c, r = S.centre_radius(bounds, margin)
    slo, shi = (torch.tensor(v, dtype=dtype).item()
                for v in S.stuck_thresholds(bounds, margin))
    return c, r, slo, shi


def sum_into(t: Tensor, out: int) -> bool:
    """The fp32 value at address ``out`` (a row of the non-finite trace's CPU log) set to
    the sum of ``t``, as ``torch.sum(t, dtype=torch.float32)`` classes it (finite, NaN,
    infinite), by one C call: ``kind_of`` inline (this runs for every checked tensor of
    every step). False, nothing written, where the kernels do not take ``t``."""
    if _kernels is None or not t.is_cpu or type(t) not in _PLAIN or t.layout != torch.strided:
        return False
    k = _KIND.get(t.dtype, -1)
    if k < 0 or not t.is_contiguous() or t.is_neg():
        return False
    try:
        ptr = t.data_ptr()
    except RuntimeError:  # a tensor without storage (functional or batched wrappers)
        return False
    _kernels.sum_row(ptr, t.numel(), k, out)
    return True


def sq_row(t: Tensor, kind: int, out: int) -> bool:
    """An output gradient's element count, Σx² and NaN flag (1 when Σx² is NaN) added into
    the three fp32 values at address ``out`` (a layer's ``buffers.ST_GN``.. stage columns).
    False when its storage cannot be read."""
    try:
        ptr = t.data_ptr()
    except RuntimeError:
        return False
    _kernels.sq_row(ptr, t.numel(), kind, out)
    return True


if not AVAILABLE:
    logging.getLogger("gradwatch").debug("gradwatch._kernels not built: sampled statistics "
                                         "on CPU use PyTorch ops")
