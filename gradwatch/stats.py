"""Pure tensor -> tensor reductions used by the hooks.

Every function here runs on the tensor's own device, accumulates in fp32 whatever the
input dtype, and returns device tensors: nothing reads a value back to the host.

Cost model (measured on CPU, one thread; DESIGN.md has the table): plain reductions that
allocate nothing (``sum``, ``dot``, ``aminmax``) cost about one memory pass; elementwise
comparisons allocate a temporary and cost several times that; every op launch costs a few
microseconds whatever its size. So each activation gets the cheap exact reductions over
every element, and the counting stats (zeros, saturated, non-finite elements) are taken on
an evenly strided sample of large tensors (``sample_view``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

# Columns of the per-call activation vector returned by ``activation_sums``.
A_S1, A_S2, A_HI, A_LO, A_NNZ, A_NF, A_SAT = range(7)
ACT_VEC = 7

# Element sampling of large activations (the counting stats only, see ``activation_sums``).
SAMPLE_SIZE = 4096
#: Tensors with more elements than this are sampled; smaller ones are read whole.
SAMPLE_ABOVE = 4 * SAMPLE_SIZE


def _as_f32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float32 else x.float()


def sample_view(flat: Tensor, n: int, phase: int = 0) -> Tensor:
    """``n`` evenly strided elements of the 1-D tensor ``flat`` (a view, no copy).

    The stride is odd (``numel // n`` rounded down to odd), so the sample does not alias
    with the power-of-two sizes of rows and channels, and the start offset is
    ``phase % stride``: a caller that rotates ``phase`` visits every element over
    ``stride`` calls, each element with the same probability. Requires
    ``flat.numel() >= 2 * n``.
    """
    N = flat.numel()
    stride = N // n
    if stride % 2 == 0:
        stride -= 1
    off = phase % stride
    return flat.as_strided((n,), (stride,), flat.storage_offset() + off)


def activation_sums(x: Tensor, bounds: tuple[float, float] | None, margin: float,
                    sample: int | None = SAMPLE_SIZE, phase: int = 0) -> Tensor:
    """One output tensor -> fp32 vector ``[Σx, Σx², max x, min x, nonzeros, nonfinite,
    saturated]`` (``max|x|`` is ``max(max x, -min x)``; the buffers take it once per step).

    ``Σx``, ``Σx²``, ``max x`` and ``min x`` are exact, over every element. The counts are
    exact for tensors of at most ``4 * sample`` elements (``SAMPLE_ABOVE`` = 16,384 by
    default) or when ``sample`` is None; above that they are counted on ``sample`` evenly
    strided elements (``sample_view``, start offset ``phase``) and scaled by
    ``numel / sample``. The estimated fractions (zeros, saturated) then have a standard
    error of at most ``0.5 / sqrt(sample)`` (0.0078 for 4,096) for data without structure
    aligned with the stride, i.e. below 0.03 with 99.99% confidence; the window average over
    ``k`` sampled steps (rotating offsets) divides that by about ``sqrt(k)``. A non-finite
    element anywhere is never missed: it makes the exact ``Σx²`` non-finite, and the buffers
    turn that into a non-finite count of at least 1 (``WindowBuffers.settle_nonfinite``).

    ``saturated`` counts elements within ``margin * (hi - lo)`` of a bound of ``bounds``
    (0 when ``bounds`` is None). NaN propagates into the sums and the max, as it should: a
    NaN layer reports NaN stats. Call it under ``torch.no_grad()`` (the hooks do).
    """
    flat = x.reshape(-1)
    N = flat.numel()
    if N == 0:
        return torch.zeros(ACT_VEC, dtype=torch.float32, device=flat.device)
    if flat.dtype in (torch.float32, torch.float64):
        s1 = flat.sum()
        s2 = torch.dot(flat, flat)
    else:  # half types: accumulate in fp32
        s1 = torch.sum(flat, dtype=torch.float32)
        n2 = torch.linalg.vector_norm(flat, dtype=torch.float32)
        s2 = n2 * n2
    lo, hi = torch.aminmax(flat)
    if sample is not None and N > 4 * sample:
        v = sample_view(flat, sample, phase)
        scale = N / sample
    else:
        v = flat
        scale = 1.0
    # count_nonzero: one pass, no temporary (a bool sum converts every element first).
    # x - x is 0 for finite x and NaN for NaN/Inf, and NaN counts as nonzero.
    cnt = [torch.count_nonzero(v), torch.count_nonzero(v - v)]
    if bounds is not None:
        lo_b, hi_b = bounds
        m = margin * (hi_b - lo_b)
        cnt.append(torch.count_nonzero(v <= lo_b + m) + torch.count_nonzero(v >= hi_b - m))
    counts = torch.stack(cnt).to(torch.float32)
    if scale != 1.0:
        counts = counts.mul_(scale)
    parts = [torch.stack([s1, s2, hi.to(s1.dtype), lo.to(s1.dtype)]), counts]
    if bounds is None:
        parts.append(counts.new_zeros(1))
    return torch.cat(parts).to(torch.float32)


def nonfinite_sum(x: Tensor) -> Tensor:
    """Σx in fp32: non-finite exactly when ``x`` holds a NaN/Inf (or the sum overflows past
    3.4e38). One cheap pass; the buffers turn it into a flag once per step."""
    return torch.sum(x, dtype=torch.float32)


def nonfinite_flag(x: Tensor) -> Tensor:
    """1.0 if ``x`` holds any NaN/Inf, else 0.0, from a single fp32 sum (no extra pass).

    A sum of finite fp32 values is finite unless it overflows past 3.4e38.
    """
    return torch.isfinite(nonfinite_sum(x)).logical_not().to(torch.float32)


def grad_sq_sum(g: Tensor) -> Tensor:
    """Σg² in fp32 (a dense view of a sparse gradient is taken first). Gradients in a
    tensor hook need no ``no_grad``; call it under ``no_grad`` elsewhere."""
    if g.is_sparse:
        g = g.coalesce()._values()
    if g.dtype in (torch.float32, torch.float64) and g.is_contiguous():
        flat = g.view(-1)
        return torch.dot(flat, flat).to(torch.float32)
    n = torch.linalg.vector_norm(g, dtype=torch.promote_types(g.dtype, torch.float32))
    return (n * n).to(torch.float32)


def foreach_norms(tensors: Sequence[Tensor], ord: float) -> Tensor:
    """Per-tensor norms of a list, one fp32 vector, using the fused foreach kernel."""
    dense = [t.coalesce()._values() if t.is_sparse else t for t in tensors]
    return torch.stack(torch._foreach_norm(dense, ord, dtype=torch.float32))


def foreach_absmax(tensors: Sequence[Tensor]) -> Tensor:
    """Per-tensor max |x| of a list, one fp32 vector.

    ``max(max x, -min x)`` from one ``aminmax`` per tensor: on CPU ``_foreach_norm(ord=inf)``
    is 20-50x slower than this plain reduction. An empty tensor gives 0.
    """
    lows, highs = [], []
    for t in tensors:
        if t.is_sparse:
            t = t.coalesce()._values()
        if t.numel() == 0:
            t = torch.zeros(1, dtype=t.dtype, device=t.device)
        lo, hi = torch.aminmax(t)
        lows.append(lo)
        highs.append(hi)
    return torch.maximum(torch.stack(highs), torch.stack(lows).neg()).to(torch.float32)
