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
# S2, NNZ, NF, SAT run in the order of ``stats.activation_sums``: one add per call.
(ST_N, ST_S1, ST_S2, ST_NNZ, ST_NF, ST_SAT, ST_MAX, ST_GN, ST_GS2, ST_GNF, ST_STUCK,
 ST_UNITS) = range(12)
STAGE_COLS = 12
assert (S.A_NNZ - S.A_S2, S.A_NF - S.A_S2, S.A_SAT - S.A_S2) == (1, 2, 3)

# Window columns: (name, reduce across ranks). Means are stored as sums plus a count column.
# "same": the parameter statistics are already global on every rank (DDP all-reduces the
# gradients; sharded norms are all-reduced when measured), so they are not reduced again.
WINDOW: tuple[tuple[str, str], ...] = (
    ("grad_norm", "same"),
    ("grad_rms", "same"),
    ("grad_cnt", "same"),
    ("grad_max", "same"),
    ("weight_norm", "same"),
    ("weight_cnt", "same"),
    ("update_ratio", "same"),
    ("update_cnt", "same"),
    ("grad_nonfinite", "same"),  # the parameter part of "nonfinite"
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
    ("act_stuck_frac", "sum"),  # bounded activations: units at a bound for every sample
    ("stuck_cnt", "sum"),
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
    "_act_stuck_frac": ("act_stuck_frac", "stuck_cnt"),
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

    # -- hot path: called from hooks ------------------------------------------------------
    def add_activation(self, slot: int, vec: Tensor, numel: int) -> None:
        """Add one output tensor's ``stats.activation_sums`` vector to the stage."""
        row = self.stage[slot]
        row[ST_N].add_(numel)
        row[ST_S1 : ST_S1 + 1].add_(vec[S.A_S1 : S.A_S1 + 1])
        row[ST_S2 : ST_SAT + 1].add_(vec[S.A_S2 : S.A_SAT + 1])
        amax = torch.maximum(vec[S.A_HI], vec[S.A_LO].neg())
        torch.maximum(row[ST_MAX], amax, out=row[ST_MAX])

    def add_stuck(self, slot: int, stuck: Tensor, units: int) -> None:
        """Add a bounded activation's ``stats.stuck_units`` count (of ``units`` units)."""
        row = self.stage[slot]
        row[ST_STUCK].add_(stuck)
        row[ST_UNITS].add_(units)

    def add_nonfinite(self, slot: int, flag: Tensor) -> None:
        self.stage[slot, ST_NF].add_(flag)

    def add_grad_nonfinite(self, slot: int, flag: Tensor) -> None:
        self.stage[slot, ST_GNF].add_(flag)

    def add_out_grad(self, slot: int, sq: Tensor, numel: int) -> None:
        row = self.stage[slot]
        row[ST_GN].add_(numel)
        row[ST_GS2].add_(sq)
        # NaN only: Σg² of finite values overflows to inf for |g| ~ 1e19 (exploding, not
        # non-finite); an Inf element reaches the parameter gradients, checked exactly
        row[ST_GNF].add_(torch.isnan(sq))

    # -- once per step ----------------------------------------------------------------------
    def commit_step(self, params: ParamStepStats | None, weights: Tensor | None,
                    updates: Tensor | None) -> None:
        """Turn the stage into per-step stats, add them to the window, clear the stage.

        ``weights``/``updates`` are per-layer weight norms and update ratios (NaN where a
        layer has none), or None on steps where they were not measured.
        """
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
        units = st[:, ST_UNITS]
        uhas = units > 0
        win[:, W["act_stuck_frac"]] += torch.where(
            uhas, st[:, ST_STUCK] / torch.where(uhas, units, one), zero)
        win[:, W["stuck_cnt"]] += uhas.to(torch.float32)
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
            win[:, W["grad_nonfinite"]] += params.grad_nonfinite
        if weights is not None:
            ok = ~torch.isnan(weights)
            win[:, W["weight_norm"]] += torch.where(ok, weights, zero)
            win[:, W["weight_cnt"]] += ok.to(torch.float32)
        if updates is not None:
            ok = ~torch.isnan(updates)
            win[:, W["update_ratio"]] += torch.where(ok, updates, zero)
            win[:, W["update_cnt"]] += ok.to(torch.float32)
        st.zero_()

    def step_flags(self, params: ParamStepStats | None) -> Tensor:
        """``[layers, 3]`` of this step: non-finite counts in the outputs and in the
        gradients, and the parameter-gradient RMS (0 without one), for the rules that fire
        within a step. Call before ``commit_step``; the watcher copies it to the host without
        waiting (``flags.StepFlags``)."""
        # A large output's non-finite count is estimated on a sample (stats.py), but its
        # sum covers every element: a NaN/Inf anywhere counts at least 1.
        nf = self.stage[:, ST_NF]
        bad = torch.isfinite(self.stage[:, ST_S1]).logical_not_() & (self.stage[:, ST_N] > 0)
        torch.where(bad, torch.clamp(nf, min=1.0), nf, out=nf)
        grads = self.stage[:, ST_GNF]
        rms = torch.zeros_like(grads)
        if params is not None:
            grads = grads + params.grad_nonfinite
            rms = torch.where(params.grad_present > 0, params.grad_rms, rms)
        return torch.stack([self.stage[:, ST_NF], grads, rms], dim=1)

    def scale_out_grads(self, factor: Tensor) -> None:
        """Multiply the staged output-gradient Σg² by ``factor`` (AMP: 1/scale²)."""
        self.stage[:, ST_GS2].mul_(factor)

    def discard_step(self) -> None:
        """Drop the staged step (a step the GradScaler skipped)."""
        self.stage.zero_()

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
        """One all-reduce per declared reduction kind over the whole window buffer.

        Columns declared "same" keep their local value. ``nonfinite`` sums the local
        part (outputs, output gradients) and adds the parameter part once.
        """
        import torch.distributed as dist

        nf, gnf = W["nonfinite"], W["grad_nonfinite"]
        self.window[:, nf] -= self.window[:, gnf]
        sums = self.window[:, SUM_COLS].contiguous()
        maxs = self.window[:, MAX_COLS].contiguous()
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)  # type: ignore[arg-type]
        dist.all_reduce(maxs, op=dist.ReduceOp.MAX, group=group)  # type: ignore[arg-type]
        self.window[:, SUM_COLS] = sums
        self.window[:, MAX_COLS] = maxs
        self.window[:, nf] += self.window[:, gnf]
