"""Per-layer gradient and activation histograms, binned on the device (``histograms=True``).

Fixed bins, the same for every layer and every window: symmetric and log-spaced,
``PER_DECADE`` bins per decade of ``|x|`` from ``1e-12`` to ``1e6`` on each side of zero,
plus one middle bin for ``|x| < 1e-12`` (zeros included). Values beyond ``1e6`` (and
infinities) land in the outermost bins; NaN is left out (the ``nonfinite`` stat counts it).

Each tensor is binned with ``torch.histc`` into a ``[2, layers, NBINS + 4]`` fp32 device
buffer (bucket counts, then min, max, sum, sum of squares); nothing is read on the host
until the flush copies that buffer once.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from gradwatch.faults import FaultGuard
from gradwatch.hostcopy import HostCopy

OFF = "histograms"  # the fault guard's name for this part

LO_EXP, HI_EXP, PER_DECADE = -12, 6, 4
HALF = (HI_EXP - LO_EXP) * PER_DECADE  # log bins on each side of zero
NBINS = 2 * HALF + 1
GRAD, ACT = 0, 1
KINDS = ("grad_hist", "act_hist")  # tag names: gradwatch/<kind>/<layer>
_MIN, _MAX, _SUM, _SQ = NBINS, NBINS + 1, NBINS + 2, NBINS + 3


def bucket_limits() -> np.ndarray:
    """Right edge of every bin, ascending (TensorBoard's ``bucket_limit``)."""
    neg = [-(10.0 ** (LO_EXP + (HALF - 1 - i) / PER_DECADE)) for i in range(HALF)]
    pos = [10.0 ** (LO_EXP + (k + 1) / PER_DECADE) for k in range(HALF)]
    return np.array(neg + [10.0**LO_EXP] + pos, dtype=np.float64)


def bin_counts(x: Tensor) -> Tensor:
    """``[NBINS]`` fp32 counts of the elements of ``x`` in the fixed bins (on x's device)."""
    xf = x.detach().reshape(-1).float()
    # position in bin units from the edge of the middle bin: |x| < 1e-12 (and 0) -> 0,
    # |x| in [10^(LO + k/PD), 10^(LO + (k+1)/PD)) -> [k + 0.5, k + 1.5); in-place on temporaries
    u = torch.log10(xf.abs())
    u.sub_(LO_EXP).mul_(PER_DECADE).clamp_(-0.5, HALF - 1e-3).add_(0.5)
    y = torch.copysign(u, xf)
    y = torch.nan_to_num_(y, nan=4.0 * HALF)  # NaN: outside the range, histc skips it
    return torch.histc(y, bins=NBINS, min=-(HALF + 0.5), max=HALF + 0.5)


def _moments(x: Tensor) -> Tensor:
    xf = x.detach().reshape(-1).float()
    lo_hi = torch.aminmax(xf)
    return torch.stack([lo_hi.min, lo_hi.max, xf.sum(), torch.dot(xf, xf)])


class DeviceHistograms:
    """Window state of the histograms of ``n_layers`` layers on ``device``.

    Called from the forward hook (activations) and the optimizer step pre-hook (parameter
    gradients), on sampled steps only. A failure switches histograms off (``OFF``) and is
    reported once by the fault guard; it never reaches the training.
    """

    def __init__(self, n_layers: int, device: torch.device, guard: FaultGuard) -> None:
        self.device = device
        self.guard = guard
        self.buf = torch.zeros(2, n_layers, NBINS + 4, dtype=torch.float32, device=device)
        self._reset_moments()

    def _reset_moments(self) -> None:
        self.buf[:, :, _MIN] = math.inf
        self.buf[:, :, _MAX] = -math.inf

    def _add(self, kind: int, slot: int, x: Tensor) -> None:
        row = self.buf[kind, slot]
        row[:NBINS].add_(bin_counts(x).to(self.device))
        m = _moments(x).to(self.device)
        torch.minimum(row[_MIN], m[0], out=row[_MIN])
        torch.maximum(row[_MAX], m[1], out=row[_MAX])
        row[_SUM:].add_(m[2:])

    @property
    def on(self) -> bool:
        return OFF not in self.guard.off

    def add_activation(self, slot: int, x: Tensor) -> None:
        if OFF in self.guard.off:
            return
        try:
            self._add(ACT, slot, x)
        except Exception as e:
            self.guard.fail(OFF, "activation histogram", str(slot), e)

    def add_grads(self, params: Sequence[tuple[Tensor, int]]) -> None:
        """``(parameter, layer slot)`` pairs; parameters without a gradient are skipped."""
        if OFF in self.guard.off:
            return
        try:
            for p, slot in params:
                g = p.grad
                if g is not None and not g.is_sparse:
                    self._add(GRAD, slot, g)
        except Exception as e:
            self.guard.fail(OFF, "gradient histogram", "*", e)

    def take(self) -> Any:
        """Start the one host copy of the window's counts and reset (training thread)."""

        copy = HostCopy(self.buf)
        self.buf.zero_()
        self._reset_moments()
        return copy


def raw_histogram(row: np.ndarray) -> dict[str, Any] | None:
    """One host row -> keyword arguments of ``SummaryWriter.add_histogram_raw`` (None when
    the row is empty). Empty bins at either end are trimmed."""
    counts = row[:NBINS].astype(np.float64)
    nz = np.flatnonzero(counts)
    if nz.size == 0:
        return None
    a, b = int(nz[0]), int(nz[-1]) + 1
    limits = bucket_limits()[a:b].copy()
    lo, hi = float(row[_MIN]), float(row[_MAX])
    if math.isfinite(hi):
        limits[-1] = max(limits[-1], hi)  # the outer bins also hold values beyond 1e6
    return {
        "min": lo if math.isfinite(lo) else float(limits[0]),
        "max": hi if math.isfinite(hi) else float(limits[-1]),
        "num": int(counts.sum()),
        "sum": float(row[_SUM]),
        "sum_squares": float(row[_SQ]),
        "bucket_limits": limits.tolist(),
        "bucket_counts": counts[a:b].tolist(),
    }
