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

# Stage columns (one step). S2, NNZ, NF, SAT run in the order of
# ``stats.activation_sums``, so a batch of its vectors adds in two ops.
ST_N, ST_S1, ST_S2, ST_NNZ, ST_NF, ST_SAT, ST_MAX, ST_GN, ST_GS2, ST_GNF = range(10)
STAGE_COLS = 10
assert (S.A_NNZ - S.A_S2, S.A_NF - S.A_S2, S.A_SAT - S.A_S2) == (1, 2, 3)
# Per-call results held until the next fold: bounded, also when step() is never called.
MAX_PENDING = 1024

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
# Runs of adjacent window columns that ``commit_step`` updates with one op each.
_GN, _GMAX, _WN, _UR, _ACT0, _ACTMAX, _OG, _NF = (
    W["grad_norm"], W["grad_max"], W["weight_norm"], W["update_ratio"], W["act_mean"],
    W["act_max"], W["out_grad_rms"], W["nonfinite"])
assert [W[k] - _GN for k in ("grad_rms", "grad_cnt")] == [1, 2]
assert (W["weight_cnt"] - _WN, W["update_cnt"] - _UR, W["out_grad_cnt"] - _OG) == (1, 1, 1)
assert [W[k] - _ACT0 for k in ("act_std", "act_zero_frac", "act_sat_frac", "act_cnt")] == [
    1, 2, 3, 4]
assert W["act_nonfinite"] - _NF == 1
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
        self._acts: list[Tensor] = []
        self._act_keys: list[tuple[int, int]] = []
        self._checks: list[Tensor] = []
        self._check_slots: list[int] = []
        self._grads: list[Tensor] = []
        self._grad_keys: list[tuple[int, int]] = []
        self._key_cache: dict[tuple[tuple[int, int], ...], tuple[Tensor, Tensor]] = {}
        self._bounded: Tensor | None = None

    # -- hot path: called from hooks ------------------------------------------------------
    # The hooks push one small device vector per call; ``fold`` adds them to the stage in a
    # few batched ops (index_add_/scatter_reduce_) once per step, instead of 3-4 indexed
    # updates per call.
    def set_bounded(self, bounded: list[bool]) -> None:
        """Which layers have bounded outputs: the saturated count of the others is masked
        at ``fold`` (the hooks compute it with ``sat_placeholder=True``)."""
        self._bounded = torch.tensor(bounded, dtype=torch.float32, device=self.device)

    def push_activation(self, slot: int, vec: Tensor, numel: int) -> None:
        """Queue one output tensor's ``stats.activation_sums`` vector."""
        self._acts.append(vec)
        self._act_keys.append((slot, numel))
        if len(self._acts) >= MAX_PENDING:
            self.fold()

    def push_check_sum(self, slot: int, s: Tensor) -> None:
        """On a step without activation stats: queue an output's fp32 sum, only so that a
        NaN/Inf in it shows at ``settle_nonfinite`` (no activation stat is taken from it)."""
        self._checks.append(s)
        self._check_slots.append(slot)
        if len(self._checks) >= MAX_PENDING:
            self.fold()

    def push_out_grad(self, slot: int, sq: Tensor, numel: int) -> None:
        """Queue Σg² of one output gradient (``numel`` 0: a check sum Σg, no stat)."""
        self._grads.append(sq)
        self._grad_keys.append((slot, numel))
        if len(self._grads) >= MAX_PENDING:
            self.fold()

    def _index(self, keys: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        k = tuple(keys)
        hit = self._key_cache.get(k)
        if hit is None:
            hit = (torch.tensor([s for s, _ in keys], dtype=torch.long, device=self.device),
                   torch.tensor([float(n) for _, n in keys], device=self.device))
            if len(self._key_cache) >= 16:  # bounded: call patterns repeat step after step
                self._key_cache.clear()
            self._key_cache[k] = hit
        return hit

    def fold(self) -> None:
        """Add the queued per-call vectors to the stage (a few batched device ops)."""
        st = self.stage
        if self._acts:
            V = torch.stack(self._acts)
            idx, numel = self._index(self._act_keys)
            self._acts.clear()
            self._act_keys.clear()
            st[:, ST_N].index_add_(0, idx, numel)
            st[:, ST_S1].index_add_(0, idx, V[:, S.A_S1])
            st[:, ST_S2:ST_SAT + 1].index_add_(0, idx, V[:, S.A_S2:S.A_SAT + 1])
            if self._bounded is not None:
                st[:, ST_SAT].mul_(self._bounded)
            amax = torch.maximum(V[:, S.A_HI], V[:, S.A_LO].neg())
            st[:, ST_MAX].scatter_reduce_(0, idx, amax, "amax")
        if self._checks:
            idx = self._index([(s, 0) for s in self._check_slots])[0]
            st[:, ST_S1].index_add_(0, idx, torch.stack(self._checks))
            self._checks.clear()
            self._check_slots.clear()
        if self._grads:
            idx, numel = self._index(self._grad_keys)
            st[:, ST_GN].index_add_(0, idx, numel)
            st[:, ST_GS2].index_add_(0, idx, torch.stack(self._grads))
            self._grads.clear()
            self._grad_keys.clear()

    def add_activation(self, slot: int, vec: Tensor, numel: int) -> None:
        """Add one ``stats.activation_sums`` vector to the stage at once (no queue)."""
        row = self.stage[slot]
        row[ST_N].add_(numel)
        row[ST_S1].add_(vec[S.A_S1])
        row[ST_S2 : ST_SAT + 1].add_(vec[S.A_S2 : S.A_SAT + 1])
        amax = torch.maximum(vec[S.A_HI], vec[S.A_LO].neg())
        torch.maximum(row[ST_MAX], amax, out=row[ST_MAX])

    def add_nonfinite(self, slot: int, flag: Tensor) -> None:
        self.stage[slot, ST_NF].add_(flag)

    def add_check_sum(self, slot: int, s: Tensor) -> None:
        """``push_check_sum`` without the queue."""
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
        self.fold()
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
        self.fold()
        st, win = self.stage, self.window
        n = st[:, ST_N]
        has = n > 0
        n1 = torch.clamp(n, min=1.0)
        mean = st[:, ST_S1] / n1
        var = (st[:, ST_S2] - st[:, ST_S1] * mean) / torch.clamp(n1 - 1, min=1.0)
        act = torch.stack([mean, torch.sqrt(torch.clamp(var, min=0.0)),
                           1.0 - st[:, ST_NNZ] / n1, st[:, ST_SAT] / n1], dim=1)
        # on steps without stats the sum columns hold check sums (maybe NaN): masked here
        act = torch.where(has.unsqueeze(1), act, 0.0)
        win[:, _ACT0:_ACT0 + 5] += torch.cat([act, has.unsqueeze(1).to(act.dtype)], dim=1)
        torch.maximum(win[:, _ACTMAX], st[:, ST_MAX], out=win[:, _ACTMAX])
        gn = st[:, ST_GN]
        ghas = gn > 0
        rms = torch.where(ghas, torch.sqrt(st[:, ST_GS2] / torch.clamp(gn, min=1.0)), 0.0)
        nf = st[:, ST_NF]
        gnf = st[:, ST_GNF] if params is None else st[:, ST_GNF] + params.grad_nonfinite
        win[:, _OG:_OG + 2] += torch.stack([rms, ghas.to(rms.dtype)], dim=1)
        win[:, _NF:_NF + 2] += torch.stack([nf + gnf, nf], dim=1)
        if params is not None:
            p = params.grad_present
            ok = (p > 0).unsqueeze(1)
            pv = torch.stack([params.grad_norm, params.grad_rms], dim=1)
            win[:, _GN:_GN + 3] += torch.cat([torch.where(ok, pv, 0.0), p.unsqueeze(1)], dim=1)
            gmax = torch.where(ok.squeeze(1), params.grad_max, 0.0)
            torch.maximum(win[:, _GMAX], gmax, out=win[:, _GMAX])
        for vals, col in ((weights, _WN), (updates, _UR)):
            if vals is not None:
                ok_v = ~torch.isnan(vals)
                win[:, col:col + 2] += torch.stack(
                    [torch.where(ok_v, vals, 0.0), ok_v.to(vals.dtype)], dim=1)
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
        self.fold()
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
