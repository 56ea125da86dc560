"""The on-device window state.

Two levels, both preallocated ``[layers, columns]`` fp32 tensors on the training device:

* the **stage** collects one training step (all forward calls, all micro-batches);
* the **window** accumulates per-step statistics until the next flush.

Each column declares how it reduces across steps and ranks (``sum`` or ``max``); reset,
the per-step commit and the distributed reduction all follow from that declaration.
No method here reads a device value on the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gradwatch import stats as S

# The public statistics, in display order (API.md). Also the TensorBoard tag names.
STATS: tuple[str, ...] = (
    "grad_norm",
    "grad_rms",
    "grad_max",
    "weight_norm",
    "update_ratio",
    "act_mean",
    "act_std",
    "act_max",
    "act_zero_frac",
    "act_sat_frac",
    "out_grad_rms",
    "nonfinite",
)

# Stage columns (one step).
ST_N, ST_S1, ST_S2, ST_NNZ, ST_SAT, ST_NF, ST_MAX, ST_GN, ST_GS2, ST_GNF = range(10)
STAGE_COLS = 10

# Window columns: (name, reduce). Means are stored as sums plus a count column.
WINDOW: tuple[tuple[str, str], ...] = (
    ("grad_norm", "sum"),
    ("grad_rms", "sum"),
    ("grad_cnt", "sum"),
    ("grad_max", "max"),
    ("weight_norm", "sum"),
    ("weight_cnt", "sum"),
    ("update_ratio", "sum"),
    ("update_cnt", "sum"),
    ("act_mean", "sum"),
    ("act_std", "sum"),
    ("act_zero_frac", "sum"),
    ("act_sat_frac", "sum"),
    ("act_cnt", "sum"),
    ("act_max", "max"),
    ("out_grad_rms", "sum"),
    ("out_grad_cnt", "sum"),
    ("nonfinite", "sum"),
    ("act_nonfinite", "sum"),  # outputs only: where a NaN starts (the rules' origin)
)
W = {name: i for i, (name, _) in enumerate(WINDOW)}
SUM_COLS = [i for i, (_, r) in enumerate(WINDOW) if r == "sum"]
MAX_COLS = [i for i, (_, r) in enumerate(WINDOW) if r == "max"]

# stat -> (value column, count column or None for a plain sum)
_FINAL: dict[str, tuple[str, str | None]] = {
    "grad_norm": ("grad_norm", "grad_cnt"),
    "grad_rms": ("grad_rms", "grad_cnt"),
    "grad_max": ("grad_max", "grad_cnt"),
    "weight_norm": ("weight_norm", "weight_cnt"),
    "update_ratio": ("update_ratio", "update_cnt"),
    "act_mean": ("act_mean", "act_cnt"),
    "act_std": ("act_std", "act_cnt"),
    "act_max": ("act_max", "act_cnt"),
    "act_zero_frac": ("act_zero_frac", "act_cnt"),
    "act_sat_frac": ("act_sat_frac", "act_cnt"),
    "out_grad_rms": ("out_grad_rms", "out_grad_cnt"),
    "nonfinite": ("nonfinite", None),
    "_act_nonfinite": ("act_nonfinite", None),
}
# Columns of ``finalize()``: the public STATS, then internal ones for the rules.
FINAL_KEYS: tuple[str, ...] = tuple(_FINAL)
assert FINAL_KEYS[: len(STATS)] == STATS


@dataclass
class ParamStepStats:
    """Per-layer parameter statistics of one optimizer step, as device vectors ``[layers]``."""

    grad_norm: Tensor
    grad_rms: Tensor
    grad_max: Tensor
    grad_present: Tensor  # 1.0 where the layer had at least one gradient this step
    grad_nonfinite: Tensor


class WindowBuffers:
    """Preallocated stage and window tensors for ``n_layers`` layers on ``device``."""

    def __init__(self, n_layers: int, device: torch.device) -> None:
        self.n_layers = n_layers
        self.device = device
        self.stage = torch.zeros(n_layers, STAGE_COLS, dtype=torch.float32, device=device)
        self.window = torch.zeros(n_layers, len(WINDOW), dtype=torch.float32, device=device)
        self._final_idx = torch.tensor(
            [W[v] for v, _ in _FINAL.values()], dtype=torch.long, device=device
        )
        cnt = [W[c] if c is not None else -1 for _, c in _FINAL.values()]
        self._cnt_idx = torch.tensor([max(c, 0) for c in cnt], dtype=torch.long, device=device)
        self._is_mean = torch.tensor([c >= 0 for c in cnt], device=device)
        self._settled = False

    # -- hot path: called from hooks ------------------------------------------------------
    def add_activation(self, slot: int, vec: Tensor, numel: int) -> None:
        """Add one output tensor's ``stats.activation_sums`` vector to the stage."""
        row = self.stage[slot]
        row[ST_N].add_(numel)
        row[ST_S1 : ST_NF + 1].add_(vec[: S.A_NF + 1])
        torch.maximum(row[ST_MAX], vec[S.A_MAX], out=row[ST_MAX])

    def add_nonfinite(self, slot: int, flag: Tensor) -> None:
        self.stage[slot, ST_NF].add_(flag)

    def add_check_sum(self, slot: int, s: Tensor) -> None:
        """On a step without activation stats: add an output's fp32 sum, only so that a
        NaN/Inf in it shows at ``settle_nonfinite`` (the count column stays 0, so no
        activation stat is taken from it)."""
        self.stage[slot, ST_S1].add_(s)

    def add_out_grad(self, slot: int, sq: Tensor, numel: int) -> None:
        row = self.stage[slot]
        row[ST_GN].add_(numel)
        row[ST_GS2].add_(sq)

    def add_out_grad_check(self, slot: int, s: Tensor) -> None:
        """The output-gradient counterpart of ``add_check_sum``."""
        self.stage[slot, ST_GS2].add_(s)

    def settle_nonfinite(self) -> None:
        """Turn the staged sums into non-finite counts, once per step, for all layers at
        once: a layer whose output sums are non-finite counts at least 1 non-finite output
        element; one whose output-gradient sum is non-finite counts 1 more. Idempotent
        until the stage is cleared."""
        if self._settled:
            return
        self._settled = True
        st = self.stage
        nf = st[:, ST_NF]
        bad = torch.isfinite(st[:, ST_S1] + st[:, ST_S2]).logical_not_()
        torch.where(bad, torch.clamp(nf, min=1.0), nf, out=nf)
        gbad = torch.isfinite(st[:, ST_GS2]).logical_not_()
        st[:, ST_GNF].add_(gbad)

    # -- once per step ----------------------------------------------------------------------
    def commit_step(self, params: ParamStepStats | None, weights: Tensor | None,
                    updates: Tensor | None) -> None:
        """Turn the stage into per-step stats, add them to the window, clear the stage.

        ``weights``/``updates`` are per-layer weight norms and update ratios (NaN where a
        layer has none), or None on steps where they were not measured.
        """
        self.settle_nonfinite()
        st, win = self.stage, self.window
        n = st[:, ST_N]
        has = n > 0
        one = torch.ones_like(n)
        n1 = torch.where(has, n, one)
        mean = st[:, ST_S1] / n1
        var = (st[:, ST_S2] - st[:, ST_S1] * mean) / torch.clamp(n1 - 1, min=1.0)
        std = torch.sqrt(torch.clamp(var, min=0.0))
        zero = torch.zeros_like(n)
        hasf = has.to(torch.float32)
        win[:, W["act_mean"]] += torch.where(has, mean, zero)
        win[:, W["act_std"]] += torch.where(has, std, zero)
        win[:, W["act_zero_frac"]] += torch.where(has, 1.0 - st[:, ST_NNZ] / n1, zero)
        win[:, W["act_sat_frac"]] += torch.where(has, st[:, ST_SAT] / n1, zero)
        win[:, W["act_cnt"]] += hasf
        win[:, W["act_max"]] = torch.maximum(win[:, W["act_max"]], st[:, ST_MAX])
        gn = st[:, ST_GN]
        ghas = gn > 0
        win[:, W["out_grad_rms"]] += torch.where(
            ghas, torch.sqrt(st[:, ST_GS2] / torch.where(ghas, gn, one)), zero
        )
        win[:, W["out_grad_cnt"]] += ghas.to(torch.float32)
        win[:, W["nonfinite"]] += st[:, ST_NF] + st[:, ST_GNF]
        win[:, W["act_nonfinite"]] += st[:, ST_NF]
        if params is not None:
            p = params.grad_present
            ok = p > 0
            win[:, W["grad_norm"]] += torch.where(ok, params.grad_norm, zero)
            win[:, W["grad_rms"]] += torch.where(ok, params.grad_rms, zero)
            win[:, W["grad_cnt"]] += p
            win[:, W["grad_max"]] = torch.maximum(
                win[:, W["grad_max"]], torch.where(ok, params.grad_max, zero)
            )
            win[:, W["nonfinite"]] += params.grad_nonfinite
        if weights is not None:
            ok = ~torch.isnan(weights)
            win[:, W["weight_norm"]] += torch.where(ok, weights, zero)
            win[:, W["weight_cnt"]] += ok.to(torch.float32)
        if updates is not None:
            ok = ~torch.isnan(updates)
            win[:, W["update_ratio"]] += torch.where(ok, updates, zero)
            win[:, W["update_cnt"]] += ok.to(torch.float32)
        st.zero_()
        self._settled = False

    def step_flags(self, params: ParamStepStats | None) -> Tensor:
        """``[layers, 2]`` non-finite counts of this step: outputs, gradients. Call before
        ``commit_step``; the watcher copies it to the host without waiting (pinned)."""
        self.settle_nonfinite()
        grads = self.stage[:, ST_GNF]
        if params is not None:
            grads = grads + params.grad_nonfinite
        return torch.stack([self.stage[:, ST_NF], grads], dim=1)

    def discard_step(self) -> None:
        """Drop the staged step (a step the GradScaler skipped)."""
        self.stage.zero_()
        self._settled = False

    # -- once per flush ---------------------------------------------------------------------
    def finalize(self) -> Tensor:
        """Window -> ``[layers, len(FINAL_KEYS)]`` fp32 device tensor of window values.

        Means are divided by their counts; a stat with a zero count is NaN. A new tensor is
        returned, so the window can be reset right after.
        """
        win = self.window
        vals = win.index_select(1, self._final_idx)
        cnts = win.index_select(1, self._cnt_idx)
        mean = vals / cnts
        nan = torch.full_like(vals, math.nan)
        mean = torch.where(cnts > 0, mean, nan)
        # max-reduced stats (grad_max, act_max) are not divided, only masked by their count
        for stat in ("grad_max", "act_max"):
            j = FINAL_KEYS.index(stat)
            mean[:, j] = torch.where(cnts[:, j] > 0, vals[:, j], nan[:, j])
        return torch.where(self._is_mean, mean, vals)

    def reset_window(self) -> None:
        self.window.zero_()

    def reduce_across_ranks(self, group: object | None = None) -> None:
        """One all-reduce per declared reduction kind over the whole window buffer."""
        import torch.distributed as dist

        sums = self.window[:, SUM_COLS].contiguous()
        maxs = self.window[:, MAX_COLS].contiguous()
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)  # type: ignore[arg-type]
        dist.all_reduce(maxs, op=dist.ReduceOp.MAX, group=group)  # type: ignore[arg-type]
        self.window[:, SUM_COLS] = sums
        self.window[:, MAX_COLS] = maxs
