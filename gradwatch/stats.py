"""Pure tensor -> tensor reductions used by the hooks.

Every function here runs on the tensor's own device, accumulates in fp32 whatever the
input dtype, and returns device tensors: nothing reads a value back to the host.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

# Columns of the per-call activation vector returned by ``activation_sums``.
A_S1, A_S2, A_NNZ, A_SAT, A_NF, A_MAX = range(6)
ACT_VEC = 6


def _as_f32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float32 else x.float()


def activation_sums(x: Tensor, bounds: tuple[float, float] | None, margin: float) -> Tensor:
    """One output tensor -> fp32 vector ``[Σx, Σx², nonzeros, saturated, nonfinite, max|x|]``.

    ``saturated`` counts elements within ``margin * (hi - lo)`` of a bound of ``bounds``
    (0 when ``bounds`` is None). ``nonfinite`` is the exact number of NaN/Inf elements.
    NaN propagates into the sums and the max, as it should: a NaN layer reports NaN stats.
    """
    xf = _as_f32(x.detach()).reshape(-1)
    s1 = xf.sum()
    s2 = torch.dot(xf, xf)
    nnz = torch.count_nonzero(xf)
    lo_hi = torch.aminmax(xf)
    amax = torch.maximum(lo_hi.max, lo_hi.min.neg())
    # x - x is 0 for finite x and NaN for NaN/Inf; count_nonzero counts NaN.
    nonfinite = torch.count_nonzero(xf - xf)
    if bounds is None:
        sat = torch.zeros((), dtype=torch.int64, device=xf.device)
    else:
        lo, hi = bounds
        m = margin * (hi - lo)
        sat = torch.count_nonzero(xf <= lo + m) + torch.count_nonzero(xf >= hi - m)
    return torch.stack(
        [s1, s2, nnz.to(torch.float32), sat.to(torch.float32), nonfinite.to(torch.float32), amax]
    )


def nonfinite_flag(x: Tensor) -> Tensor:
    """1.0 if ``x`` holds any NaN/Inf, else 0.0, from a single fp32 sum (no extra pass).

    A sum of finite fp32 values is finite unless it overflows past 3.4e38.
    """
    s = torch.sum(x.detach(), dtype=torch.float32)
    return torch.isfinite(s).logical_not().to(torch.float32)


_UPCAST = (torch.float16, torch.bfloat16, torch.float32)


def _norm(t: Tensor, ord: float = 2.0) -> Tensor:
    """fp32 norm of any float or complex tensor: half precision is accumulated in fp32,
    float64 and complex in their own precision (``dtype=`` may not narrow), then cast."""
    if t.dtype in _UPCAST:
        return torch.linalg.vector_norm(t, ord, dtype=torch.float32)
    return torch.linalg.vector_norm(t, ord).to(torch.float32)


def grad_sq_sum(g: Tensor) -> Tensor:
    """Σg² in fp32 (a dense view of a sparse gradient is taken first)."""
    if g.is_sparse:
        g = g.coalesce()._values()
    if g.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=g.device)
    n = _norm(g.detach())
    return n * n


def foreach_norms(tensors: Sequence[Tensor], ord: float) -> Tensor:
    """Per-tensor norms of a list, one fp32 vector, using the fused foreach kernel."""
    dense = [t.coalesce()._values() if t.is_sparse else t for t in tensors]
    # the norm of nothing is 0 (the max-norm kernel refuses empty tensors)
    dense = [t if t.numel() else t.new_zeros(1) for t in dense]
    if all(t.dtype in _UPCAST for t in dense):
        return torch.stack(torch._foreach_norm(dense, ord, dtype=torch.float32))
    return torch.stack([_norm(t, ord) for t in dense])


def stuck_units(x: Tensor, bounds: tuple[float, float], margin: float) -> Tensor:
    """Units of a bounded activation that sit at a bound for *every* sample of the batch.

    ``x`` is read as ``[batch, units...]`` (dim 0 is the batch; a 0-d or 1-d tensor is one
    sample). Returns the fp32 count of such units, from one ``aminmax`` over the batch.
    A unit saturated on some inputs and not on others still carries information (a binary
    feature, as in a well-trained tanh net); one stuck at a bound for all inputs passes
    neither signal nor gradient: Glorot & Bengio's saturated sigmoid units.
    """
    v = x.detach()
    v = v.reshape(v.shape[0], -1) if v.dim() >= 2 else v.reshape(1, -1)
    lo, hi = bounds
    m = margin * (hi - lo)
    mn, mx = torch.aminmax(v, dim=0)
    stuck = torch.count_nonzero(mx <= lo + m) + torch.count_nonzero(mn >= hi - m)
    return stuck.to(torch.float32)


def units_of(x: Tensor) -> int:
    """The number of units ``stuck_units`` looks at."""
    return x[0].numel() if x.dim() >= 2 else x.numel()
