"""The on-device window state.

Two levels, both preallocated ``[layers, columns]`` fp32 tensors on the training device:

* the **stage** collects one training step (all forward calls, all micro-batches);
* the **window** accumulates per-step statistics until the next flush.

Each column declares how it reduces across steps and ranks (``sum`` or ``max``); reset,
the per-step commit and the distributed reduction all follow from that declaration.
No method here reads a device value on the host."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gradwatch import cpukernels as K
from gradwatch import stats as S
from gradwatch.hostcopy import device_tensor
from gradwatch.schema import STATS as STATS  # the public statistics, in display order

# Stage columns (one step). ST_N..ST_UNITS are sums over the calls of the step, in the order
# of the per-call activation rows the hooks log (``log_activation``); ST_MAX is a max.
(ST_N, ST_S1, ST_S2, ST_NNZ, ST_NF, ST_SAT, ST_STUCK, ST_UNITS, ST_MAX, ST_GN, ST_GS2,
 ST_GNF) = range(12)
STAGE_COLS = 12
#: One activation call: ``[n, Σx, Σx², nonzeros, nonfinite, saturated, stuck units, units,
#: max x, min x]``; the first ``ROW_SUMS`` are added into the stage, the last two give ST_MAX.
ROW = 10
ROW_SUMS = ST_UNITS + 1
#: Calls logged before an early fold (forward passes that no optimizer step ends).
FOLD_AT = 512

# Window columns: (name, reduce across ranks). Means are stored as sums plus a count column.
# "same": the parameter statistics are already global on every rank (DDP all-reduces the
# gradients; sharded norms are all-reduced when measured), so they are not reduced again.
WINDOW: tuple[tuple[str, str], ...] = (
    ("grad_norm", "same"),
    ("grad_rms", "same"),
    ("grad_cnt", "same"),
    ("grad_max", "same"),
    ("grad_max_cnt", "same"),
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
#: Columns of ``step_flags``: non-finite outputs, non-finite gradients, gradient RMS,
#: update ratio.
FLAG_COLS = 4
SUM_COLS = [i for i, (_, r) in enumerate(WINDOW) if r == "sum"]
MAX_COLS = [i for i, (_, r) in enumerate(WINDOW) if r == "max"]
# commit_step: the window columns of each part's per-step values, in stacking order
_ACT_COLS = ("act_mean", "act_std", "act_zero_frac", "act_sat_frac", "act_cnt",
             "out_grad_rms", "out_grad_cnt", "act_stuck_frac", "stuck_cnt")
_PARTS = (("grad_norm", "grad_rms", "grad_cnt", "grad_nonfinite"),
          ("weight_norm", "weight_cnt"), ("update_ratio", "update_cnt"))

# stat -> (value column, count column or None for a plain sum)
FINAL_COLUMNS: dict[str, tuple[str, str | None]] = {
    "grad_norm": ("grad_norm", "grad_cnt"),
    "grad_rms": ("grad_rms", "grad_cnt"),
    "grad_max": ("grad_max", "grad_max_cnt"),
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
# Columns of ``snapshot.final_values``: the public STATS, then internal ones for the rules.
FINAL_KEYS: tuple[str, ...] = tuple(FINAL_COLUMNS)
assert FINAL_KEYS[: len(STATS)] == STATS


@dataclass
class ParamStepStats:
    """Per-layer parameter statistics of one optimizer step, as device vectors ``[layers]``.

    The per-layer non-finite counts (``grad_nonfinite``) are given, or made when first read
    from ``norms`` (a NaN norm counts one in its layer, ``layer_of``): a light step that
    the host found finite (``finite``, CPU) never makes them."""

    grad_norm: Tensor
    grad_rms: Tensor
    grad_max: Tensor | None  # None on light steps (measured on sampled steps only)
    grad_present: Tensor  # 1.0 where the layer had at least one gradient this step
    nonfinite: Tensor | None  # None: made from ``norms`` when first read
    norms: Tensor | None = None  # per parameter with a gradient (``ParamTracker.present``)
    layer_of: Tensor | None = None  # the layer of each of ``norms``
    finite: bool = False  # every norm was read finite on the host
    norm_sum: float | None = None  # the sum of ``norms``, where the host has it (CPU kernel)
    out: Any = None  # the C kernel's output these are views of (``ParamTracker.recycle``)

    @property
    def grad_nonfinite(self) -> Tensor:
        if self.nonfinite is None:
            assert self.norms is not None and self.layer_of is not None
            self.nonfinite = nan_per_layer(torch.zeros_like(self.grad_norm), self.layer_of,
                                           self.norms)
        return self.nonfinite


def nan_per_layer(zeros: Tensor, layer_of: Tensor, norms: Tensor) -> Tensor:
    """Per layer, the parameters whose gradient norm is NaN (``zeros``: ``[layers]``, not
    written). NaN only: an Inf norm is a finite gradient of ~1e19 (exploding)."""
    return zeros.index_add(0, layer_of, torch.isnan(norms).to(torch.float32))


class WindowBuffers:
    """Preallocated stage and window tensors for ``n_layers`` layers on ``device``."""

    def __init__(self, n_layers: int, device: torch.device) -> None:
        self.n_layers = n_layers
        self.device = device
        self.stage = torch.zeros(n_layers, STAGE_COLS, dtype=torch.float32, device=device)
        self.window = torch.zeros(n_layers, len(WINDOW), dtype=torch.float32, device=device)
        # per-call logs of the eager hooks (see ``fold``): rows of preallocated tensors, and
        # the slot of each row
        self._act_log = torch.zeros(FOLD_AT, ROW, dtype=torch.float32, device=device)
        self._grad_log = torch.zeros(FOLD_AT, 2, dtype=torch.float32, device=device)
        self._row_slots: list[int] = []
        self._g_slots: list[int] = []
        # CPU: the C kernels (``cpukernels``) add a call into its layer's stage row, at its
        # address; ``_direct``: some did since the stage was last cleared
        self.rows_in_place = device.type == "cpu"
        self._stage_addr = self.stage.data_ptr() if self.rows_in_place else 0
        self._direct = False
        self._idx: dict[tuple[int, ...], Tensor] = {}
        self._zero = torch.zeros(n_layers, dtype=torch.float32, device=device)
        # the window columns of a light step's commit (``commit_step``): with its non-finite
        # counts, and without them (known to be 0)
        light = [W[n] for n in ("grad_norm", "grad_rms", "grad_cnt", "grad_nonfinite",
                                "nonfinite")]
        self._light_cols = (device_tensor(light, torch.long, device),
                            device_tensor(light[:3], torch.long, device))
        self._light_idx = (tuple(light), tuple(light[:3]))  # the same, for add_columns
        self._zero_flags = torch.zeros(n_layers, FLAG_COLS, dtype=torch.float32,
                                       device=device)
        self._act_cols = torch.tensor([W[c] for c in _ACT_COLS], dtype=torch.long,
                                      device=device)
        self._col_idx: dict[tuple[bool, bool, bool], Tensor] = {}
        # CPU, ``cpukernels.commit``: the window columns of the activation statistics and
        # the stage's non-finite counts added into theirs, (mode, column, address, stride)
        self._act_cols_host = tuple(W[c] for c in _ACT_COLS) + (W["act_max"],)
        self._stage_ops = tuple(
            (K.ADD, W[col], self._stage_addr + st * 4, STAGE_COLS)
            for col, st in (("act_nonfinite", ST_NF), ("nonfinite", ST_NF),
                            ("nonfinite", ST_GNF))) if self.rows_in_place else ()

    # -- hot path: called from hooks ------------------------------------------------------
    # Eager hooks stack each call's device scalars into the next row of a preallocated log
    # (one op per call); ``fold`` adds the rows into the stage with a handful of ops once
    # per step.
    # Compiled code (torch.compile traces the hooks) adds into the stage directly instead:
    # the ``add_*`` methods, a few small ops per call but no Python state in the graph.

    def log_activation(self, slot: int, row: list[Tensor]) -> None:
        """One output tensor: ``ROW`` fp32 device scalars (see ``ROW``), stacked into the
        next row of a preallocated log (nothing small stays allocated until the fold)."""
        torch.stack(row, out=self._act_log[len(self._row_slots)])
        self._row_slots.append(slot)
        if len(self._row_slots) >= FOLD_AT:
            self.fold()

    def stage_row_at(self, slot: int) -> int:
        """CPU (``rows_in_place``): the address of ``slot``'s stage row, into which a kernel
        adds an output's call (``cpukernels.act_row``) as ``fold`` adds a logged row."""
        self._direct = True
        return self._stage_addr + slot * (STAGE_COLS * 4)

    def stage_grad_at(self, slot: int) -> int:
        """CPU: the address of ``slot``'s output-gradient stage columns (``ST_GN``..), into
        which ``cpukernels.sq_row`` adds an output gradient."""
        self._direct = True
        return self._stage_addr + (slot * STAGE_COLS + ST_GN) * 4

    def log_rows(self, slots: list[int], rows: Tensor) -> None:
        """Several outputs' activation rows at once (``[n, ROW]``, see ``log_activation``)."""
        self._put(self._act_log, self._row_slots, slots, rows)

    def log_grad_rows(self, slots: list[int], rows: Tensor) -> None:
        """Several output gradients at once (``[n, 2]``: element count, Σg²)."""
        self._put(self._grad_log, self._g_slots, slots, rows)

    def _put(self, log: Tensor, have: list[int], slots: list[int], rows: Tensor) -> None:
        for a in range(0, len(slots), FOLD_AT):
            part = slots[a: a + FOLD_AT]
            if len(have) + len(part) > FOLD_AT:
                self.fold()
            n = len(have)
            log[n: n + len(part)].copy_(rows[a: a + len(part)])
            have.extend(part)

    def log_out_grad(self, slot: int, sq: Tensor, n: Tensor) -> None:
        """One output gradient: its element count and Σg² (fp32 device scalars)."""
        torch.stack([n, sq], out=self._grad_log[len(self._g_slots)])
        self._g_slots.append(slot)
        if len(self._g_slots) >= FOLD_AT:
            self.fold()

    def _index(self, slots: list[int]) -> Tensor:
        key = tuple(slots)
        idx = self._idx.get(key)
        if idx is None:
            if len(self._idx) >= 256:  # bounded: the call order of a model rarely changes
                self._idx.clear()
            idx = self._idx[key] = device_tensor(key, torch.long, self.device)
        return idx

    def fold(self) -> None:
        """Add the logged calls into the stage and clear the logs."""
        st = self.stage
        if self._row_slots:
            rows = self._act_log[: len(self._row_slots)]
            idx = self._index(self._row_slots)
            st[:, :ROW_SUMS].index_add_(0, idx, rows[:, :ROW_SUMS])
            amax = torch.maximum(rows[:, ROW_SUMS], rows[:, ROW_SUMS + 1].neg())
            st[:, ST_MAX].scatter_reduce_(0, idx, amax, "amax")
            self._row_slots.clear()
        if self._g_slots:
            g = self._grad_log[: len(self._g_slots)]
            # NaN only: Σg² of finite values overflows to inf for |g| ~ 1e19 (exploding, not
            # non-finite); an Inf element reaches the parameter gradients, checked there
            g = torch.cat([g, torch.isnan(g[:, 1:]).to(torch.float32)], 1)
            st[:, ST_GN : ST_GNF + 1].index_add_(0, self._index(self._g_slots), g)
            self._g_slots.clear()

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

    def add_out_grad(self, slot: int, sq: Tensor, numel: int) -> None:
        row = self.stage[slot]
        row[ST_GN].add_(numel)
        row[ST_GS2].add_(sq)
        row[ST_GNF].add_(torch.isnan(sq))  # NaN only, as in ``fold``

    # -- once per step ----------------------------------------------------------------------
    def commit_step(self, params: ParamStepStats | None, weights: Tensor | None,
                    updates: Tensor | None, sampled: bool = True) -> None:
        """Turn the stage into per-step stats, add them to the window, clear the stage.

        ``weights``/``updates`` are per-layer weight norms and update ratios (NaN where a
        layer has none), or None on steps where they were not measured. ``sampled``: the step
        collected the full stat set; a light step only carries non-finite flags and the
        parameter-gradient norms. The per-step values of each part are stacked and added
        into the window with one ``index_add_`` over its columns."""
        st, win = self.stage, self.window
        if self._light(params, sampled) and weights is None and updates is None:
            # the hooks staged nothing: only the parameter-gradient part goes in (without its
            # non-finite counts when known to be 0); the C kernel's own vectors (params._Out)
            assert params is not None  # are added with nothing to check
            out = params.out
            if out is not None and params.finite and out.key[1] == win.shape[0] and K.add_at(
                    win, self._light_idx[True], (*out.ptrs[1:3], params.grad_present.data_ptr())):
                return
            vals = [params.grad_norm, params.grad_rms, params.grad_present]
            if not params.finite:
                vals += [params.grad_nonfinite] * 2
            # CPU: one C call adds the vectors into their columns (no stack, no index_add_)
            if not (self.rows_in_place and K.add_columns(
                    win, self._light_idx[params.finite], vals)):
                win.index_add_(1, self._light_cols[params.finite], torch.stack(vals, 1))
            return
        self.fold()
        if self.rows_in_place and self._commit_kernel(params, weights, updates, sampled):
            st.zero_()
            self._direct = False
            return
        if sampled:
            self._commit_activations()
        nf = st[:, ST_NF] + st[:, ST_GNF]
        vals = [st[:, ST_NF]]
        if params is not None:
            # a layer without gradients has norm 0 and present 0: it adds nothing
            vals += [params.grad_norm, params.grad_rms, params.grad_present,
                     params.grad_nonfinite]
            nf = nf + params.grad_nonfinite
            if params.grad_max is not None:
                c = W["grad_max"]
                torch.maximum(win[:, c], params.grad_max, out=win[:, c])
                win[:, W["grad_max_cnt"]] += params.grad_present
        for v in (weights, updates):
            if v is not None:
                ok = ~torch.isnan(v)
                vals += [torch.where(ok, v, self._zero), ok.to(torch.float32)]
        vals.append(nf)
        key = (params is not None, weights is not None, updates is not None)
        win.index_add_(1, self._cols(key), torch.stack(vals, 1))
        st.zero_()
        self._direct = False

    def _commit_kernel(self, params: ParamStepStats | None, weights: Tensor | None,
                       updates: Tensor | None, sampled: bool) -> bool:
        """CPU: ``commit_step``'s ops below in one C call (``cpukernels.commit``), the same
        columns from the same fp32 operations. False where the kernel does not take them."""
        nf = W["nonfinite"]
        ops: list[tuple[int, int, Tensor]] = []
        if params is not None:
            norm, rms, cnt, g_nf = (W[c] for c in _PARTS[0])
            ops += [(K.ADD, norm, params.grad_norm), (K.ADD, rms, params.grad_rms),
                    (K.ADD, cnt, params.grad_present)]
            if not (params.finite and params.nonfinite is None):  # else known to be 0
                ops += [(K.ADD, g_nf, params.grad_nonfinite),
                        (K.ADD, nf, params.grad_nonfinite)]
            if params.grad_max is not None:
                ops += [(K.MAX, W["grad_max"], params.grad_max),
                        (K.ADD, W["grad_max_cnt"], params.grad_present)]
        for (value, count), v in zip(_PARTS[1:], (weights, updates)):
            if v is not None:
                ops += [(K.ADD_KNOWN, W[value], v), (K.COUNT_KNOWN, W[count], v)]
        return K.commit(self.window, ops, self._stage_ops,
                        self._stage_addr if sampled else None, self._act_cols_host)

    def _light(self, params: ParamStepStats | None, sampled: bool) -> bool:
        """A light step with gradients: its hooks staged nothing (they collect on sampled
        steps only, and each step's commit or discard clears the stage), so its flags and
        its window part come from the parameter gradients alone."""
        return not sampled and params is not None and not (
            self._row_slots or self._g_slots or self._direct)

    def _cols(self, key: tuple[bool, bool, bool]) -> Tensor:
        """Window columns of ``commit_step``'s stacked values, for which parts are present."""
        idx = self._col_idx.get(key)
        if idx is None:
            names = ["act_nonfinite"]
            for on, part in zip(key, _PARTS):
                if on:
                    names += part
            names.append("nonfinite")
            idx = self._col_idx[key] = device_tensor([W[n] for n in names], torch.long,
                                                     self.device)
        return idx

    def _commit_activations(self) -> None:
        st = self.stage
        n, s1 = st[:, ST_N], st[:, ST_S1]
        n1 = torch.clamp(n, min=1.0)  # a layer not called this step has all sums 0
        mean = s1 / n1
        var = (st[:, ST_S2] - s1 * mean) / torch.clamp(n1 - 1, min=1.0)
        gn, units = st[:, ST_GN], st[:, ST_UNITS]
        vals = torch.stack([
            mean,
            torch.sqrt(torch.clamp(var, min=0.0)),
            (n - st[:, ST_NNZ]) / n1,
            st[:, ST_SAT] / n1,
            (n > 0).to(torch.float32),
            torch.sqrt(st[:, ST_GS2] / torch.clamp(gn, min=1.0)),
            (gn > 0).to(torch.float32),
            st[:, ST_STUCK] / torch.clamp(units, min=1.0),
            (units > 0).to(torch.float32),
        ], 1)
        self.window.index_add_(1, self._act_cols, vals)
        c = W["act_max"]
        torch.maximum(self.window[:, c], st[:, ST_MAX], out=self.window[:, c])

    def step_flags(self, params: ParamStepStats | None, sampled: bool = True,
                   updates: Tensor | None = None) -> Tensor:
        """``[layers, FLAG_COLS]`` of this step: non-finite counts in the outputs and in the
        gradients, the parameter-gradient RMS (0 without one) and the update ratio (0 where
        not measured), for the rules that fire within a step. Call before ``commit_step``;
        the step monitor copies it to the host without waiting (``flags.FlagsToHost``)."""
        if self._light(params, sampled):
            return torch.stack([self._zero, params.grad_nonfinite,  # type: ignore[union-attr]
                                params.grad_rms, self._zero], dim=1)  # type: ignore[union-attr]
        self.fold()
        st = self.stage
        if sampled:
            # A large output's non-finite count is estimated on a sample (stats.py), but its
            # sum covers every element: a NaN/Inf anywhere counts at least 1.
            nf = st[:, ST_NF]
            bad = torch.isfinite(st[:, ST_S1]).logical_not_() & (st[:, ST_N] > 0)
            torch.where(bad, torch.clamp(nf, min=1.0), nf, out=nf)
        upd = self._zero if updates is None else torch.nan_to_num(updates, nan=0.0)
        if params is None:
            return torch.stack([st[:, ST_NF], st[:, ST_GNF], self._zero, upd], dim=1)
        # a layer without gradients has grad_rms 0 and no non-finite count
        return torch.stack([st[:, ST_NF], st[:, ST_GNF] + params.grad_nonfinite,
                            params.grad_rms, upd], dim=1)

    def no_flags(self) -> Tensor:
        """``step_flags`` of a step with nothing to flag (a trace sent on its own)."""
        return self._zero_flags

    def scale_out_grads(self, factor: Tensor) -> None:
        """Multiply the staged output-gradient Σg² by ``factor`` (AMP: 1/scale²)."""
        self.fold()
        self.stage[:, ST_GS2].mul_(factor)

    def discard_step(self) -> None:
        """Drop the staged step (a step the GradScaler skipped)."""
        self._row_slots.clear()
        self._g_slots.clear()
        self.stage.zero_()
        self._direct = False

    # -- once per flush ---------------------------------------------------------------------
    def reset_window(self) -> None:
        self.window.zero_()

    def reduce_across_ranks(self, group: object | None = None) -> None:
        """One all-reduce per declared reduction kind over the whole window buffer.

        Columns declared "same" keep their local value. ``nonfinite`` sums the local
        part (outputs, output gradients) and adds the parameter part once."""
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
