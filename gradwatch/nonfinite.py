"""The non-finite origin, end to end on the host side: what a step sends to the host with its
flags (the trace rows and every parameter gradient's norm), and what becomes of it there.

``NonFiniteTracker.payload`` runs on the training thread at the end of a step (device ops
only); ``NonFiniteTracker.read`` runs when the flags reached the host (``flags.py``) and
only does work when the step held a NaN: it names the origin (``origin.py``), confirms a
``"parameters"`` cause by checking that module's weights (a device op whose result is read
when it has reached the host, never with a wait), counts what the NaN spread to into the
origin's alert, and re-arms once a whole step is finite again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from gradwatch import origin as O
from gradwatch import stats as S
from gradwatch.buffers import ParamStepStats
from gradwatch.distributed import local
from gradwatch.flags import HostFlags
from gradwatch.hostcopy import HostCopy
from gradwatch.record import Record

if TYPE_CHECKING:
    from gradwatch.params import ParamTracker


@dataclass
class PayloadRecord:
    """The host half of a step's non-finite payload: the trace record the device rows
    belong to, and how the rows were laid out."""

    rec: Record
    present: tuple[int, ...]  # tracker-trainable indices with a gradient
    shadow: tuple[int, ...]  # shadow-parameter indices with a gradient
    sampled: bool  # watched outputs were counted on the device
    # when the record was taken: before the optimizer updated the parameters (they are
    # still those the forward used), or after
    before_update: bool = True
    param_sums: bool = False  # the payload ends with an fp32 sum of every parameter
    modules: tuple[int, ...] | None = None  # compiled code: per-module counts, this order


def fault_in(tr: np.ndarray, n_rows: int, n_grads: int) -> bool:
    """A step's payload shows a non-finite fault: a NaN anywhere, or an Inf in a gradient
    row. An Inf in the forward rows alone is absorbed (a ``-inf`` mask; one that reaches
    the loss makes its gradients non-finite); the norms that follow the rows overflow to
    Inf for finite gradients of ~1e19 (an exploding gradient, not a non-finite one)."""
    return bool(np.isnan(tr).any()) or not np.isfinite(tr[n_rows: n_rows + n_grads]).all()


@dataclass
class Found:
    """A named origin, ready to be alerted: ``count`` non-finite tensors in the step."""

    step: int
    layer: str
    cause: str
    stage: str
    message: str
    hint: str
    count: float
    # values may have grown past the float range (an Inf born from finite values, weights
    # gone non-finite in an update): the learning rate is a candidate cause
    overflow: bool = False
    alt: Found | None = None  # what it is when the parameters check finite (Origin.alt)

    def take(self, other: Found) -> None:
        """Become ``other`` (the same step and count)."""
        self.layer, self.cause, self.stage = other.layer, other.cause, other.stage
        self.message, self.hint, self.overflow = other.message, other.hint, other.overflow
        self.alt = None


class NonFiniteTracker:
    """Host-side state of the non-finite origin for one watcher.

    ``mm``: the model's module map (``origin.ModelMap``); ``mods``: every module
    (``named_modules()`` order, root first); ``chosen``: the watched (name, module) pairs;
    ``tracker``: the watcher's ``params.ParamTracker`` (its trainable parameters are the
    watched layers' own)."""

    def __init__(self, mm: O.ModelMap, mods: Sequence[tuple[str, nn.Module]],
                 chosen: Sequence[tuple[str, nn.Module]], tracker: ParamTracker) -> None:
        self.mm = mm
        index = {id(m): i for i, (_, m) in enumerate(mods)}
        self.slot_module = [index[id(m)] for _, m in chosen]
        self.module_slot = {m: s for s, m in enumerate(self.slot_module)}
        self.tracker = tracker
        self.tracked_module = [self.slot_module[slot] for _, slot in tracker.trainable]
        # trainable parameters owned by modules that are not watched: their gradient norms
        # too, so that a NaN gradient is seen in every module
        seen = {id(p) for p, _ in tracker.trainable}
        self.shadow: list[tuple[nn.Parameter, int]] = []
        for i, (_, m) in enumerate(mods):
            for p in m._parameters.values():
                if p is not None and p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    self.shadow.append((p, i))
        # every parameter once, and per module the indices of its own
        self.all_params: list[nn.Parameter] = []
        self.params_of: list[list[int]] = []
        pidx: dict[int, int] = {}
        for _, m in mods:
            own = []
            for p in m._parameters.values():
                if p is None:
                    continue
                if id(p) not in pidx:
                    pidx[id(p)] = len(self.all_params)
                    self.all_params.append(p)
                own.append(pidx[id(p)])
            self.params_of.append(own)
        self.armed = True
        self.last_finite = 0  # the last step whose trace held no NaN
        self.last_bad = -1  # the last step whose trace held one
        # light-step non-finite outputs per watched layer; None while the window has none
        self._n_watched = len(chosen)
        self.host_nf: np.ndarray | None = None
        self._pending: list[tuple[Found, HostCopy, int, bool]] = []

    # -- training thread, end of a step (device ops only) -------------------------------------
    def payload(self, rows: list[Tensor], grads: ParamStepStats | None,
                param_sums: bool = False
                ) -> tuple[list[Tensor], tuple[tuple[int, ...], tuple[int, ...]]]:
        """The parts of a step's payload: ``rows`` (the trace's forward and gradient rows,
        the per-module counts of compiled code), then the parameter-gradient norms (tracked,
        then shadow), then with ``param_sums`` an fp32 sum of every parameter
        (``all_params``: their values as the forward used them, when taken before the
        update); and which parameters those norms are of."""
        parts = list(rows)
        present: tuple[int, ...] = ()
        if grads is not None and grads.norms is not None:
            parts.append(grads.norms)
            present = self.tracker.present
        shadow = tuple(k for k, (p, _) in enumerate(self.shadow) if p.grad is not None)
        if shadow:
            gs = [local(self.shadow[k][0].grad) for k in shadow]  # type: ignore[arg-type]
            parts.append(S.foreach_norms(gs, 2.0))
        if param_sums and self.all_params:
            ps = [local(p.detach()) for p in self.all_params]
            parts.append(S.foreach_norms(ps, 1.0))
        return parts, (present, shadow)

    # -- when the flags reach the host ----------------------------------------------------------
    def read(self, item: HostFlags) -> list[Found]:
        """Alerts-to-be for one step's flags (``item.meta``: its ``PayloadRecord``)."""
        out: list[Found] = []
        meta = item.meta
        if item.trace is None or meta is None:
            return out
        rec, present, shadow, sampled = meta.rec, meta.present, meta.shadow, meta.sampled
        n_rows, n_g = rec.n_rows, rec.n_grads
        tr = item.trace
        fv, gv = tr[:n_rows], tr[n_rows: n_rows + n_g]
        at = n_rows + n_g
        mflags = None
        if meta.modules is not None:
            n_m = len(self.mm.names)
            mflags = tr[at: at + 6 * n_m].reshape(n_m, 6)
            at += 6 * n_m
        pn = tr[at:]
        if not fault_in(tr, n_rows, n_g):
            return out
        # steps without a NaN are not polled: a gap since the last NaN step means the model
        # was finite in between (re-armed), and ``since`` is the last finite step
        if item.step - 1 > self.last_bad:
            self.last_finite = item.step - 1
            self.armed = True
        self.last_bad = item.step
        st = O.entry_status(rec, fv)
        if not sampled:
            self._count(rec, st)
        if not self.armed:
            return out
        pg_own = [O.FINITE] * len(self.mm.names)
        mods = [self.tracked_module[k] for k in present] + [self.shadow[k][1] for k in shadow]
        for m, v in zip(mods, pn):
            if math.isnan(v):
                pg_own[m] = O.NAN
            elif math.isinf(v) and pg_own[m] != O.NAN:  # Inf, or a norm that overflowed
                pg_own[m] = O.INF
        origin = None
        if mflags is not None and mflags.any():
            origin = O.module_origin(mflags, meta.modules or (), pg_own, self.mm)
        if origin is None and (st == O.NAN).any():
            origin = O.forward_origin(rec, st, self.mm)
        if origin is None:
            gst = {j: int(s) for j, s in zip(rec.fired, O.status(gv[rec.fired]))}
            origin = O.backward_origin(rec, gst, pg_own, self.mm)
            if origin is None or origin.weak:
                # an Inf the model returned, not absorbed by the loss: born in the forward
                origin = O.loss_origin(rec, st, gst, self.mm) or origin
        if origin is None:
            return out
        self.armed = False
        count = float(np.count_nonzero(~np.isfinite(tr)))
        found = self._found(item.step, origin, count, rec, st, fv)
        if origin.alt is not None:
            found.alt = self._found(item.step, origin.alt, count, rec, st, fv)
        own = self.params_of[origin.module]
        if not (origin.check_params and own):
            if found.alt is not None:
                found.take(found.alt)
            return out + [found]
        if meta.param_sums:  # the parameters' sums as the forward used them came along
            sums = tr[len(tr) - len(self.all_params):]
            self._judge(found, origin.module, sums[own], exact=True)
            return out + [found]
        ps = [local(self.all_params[i].detach()) for i in own]
        with torch.no_grad():
            check = torch.stack([torch.sum(p, dtype=torch.float32) for p in ps])
        self._pending.append((found, HostCopy(check), origin.module, meta.before_update))
        return out + self.settle()

    def _judge(self, found: Found, m: int, sums: np.ndarray, exact: bool) -> None:
        """forward_op or parameters, from the sums of module ``m``'s own parameters.
        ``exact``: those are the values the forward used; else they are read after the
        optimizer's update, which a NaN gradient of this very step makes NaN too."""
        if np.isfinite(sums).all() or (found.alt is not None and not exact):
            if found.alt is not None:
                found.take(found.alt)
            return
        head = found.message.split("; ", 1)[0]
        if exact:
            since = self.last_finite
            found.cause = "parameters"
            found.message = head + (f"; its own parameters held NaN/Inf (since the update "
                                    f"of step {since})")
            found.hint = hint("parameters", self.mm.names[m], self.mm.types[m], since=since)
            found.overflow = True
        else:
            found.cause = "unknown"
            found.message = head + ("; its parameters are NaN/Inf after this step's "
                                    "update: whether the forward already used them so is "
                                    "not known")
            found.hint = ""

    def settle(self) -> list[Found]:
        """Parameter checks that reached the host: ``forward_op`` or ``parameters``."""
        if not self._pending:
            return []
        out = []
        left = []
        for found, hv, m, exact in self._pending:
            if not hv.ready():
                left.append((found, hv, m, exact))
                continue
            self._judge(found, m, hv.numpy(), exact)
            out.append(found)
        self._pending = left
        return out

    def _count(self, rec: Record, st: np.ndarray) -> None:
        """Light step: +1 per non-finite output tensor of each watched layer (sampled steps
        count elements on the device)."""
        for m, _, outs in rec.calls:
            s = self.module_slot.get(m)
            if s is not None:
                n = sum(1 for k in outs if st[k] in (O.NAN, O.INF))
                if n:
                    if self.host_nf is None:
                        self.host_nf = np.zeros(self._n_watched)
                    self.host_nf[s] += n

    def take_counts(self) -> np.ndarray | None:
        """The window's light-step counts (None: none), handed over at its flush."""
        out, self.host_nf = self.host_nf, None
        return out

    def _half(self, rec: Record, st: np.ndarray, o: O.Origin) -> bool:
        """Float16 is involved in a forward origin: a non-finite float16 value among the
        Inf born there, the outputs of the origin's call, or what its code handed to its
        submodules (an output entry that came from a child counts too)."""
        half = set(rec.half)
        if not half:
            return False
        m, anc = o.module, self.mm.ancestors
        cand = [o.entry] if o.entry >= 0 else []
        for c, ins, outs in rec.calls:
            if c == m:
                cand += outs
            elif m in anc[c]:
                cand += ins
        return any(rec.row[k] in half and st[k] != O.FINITE for k in cand)

    def _found(self, step: int, o: O.Origin, count: float, rec: Record,
               st: np.ndarray | None = None, fv: np.ndarray | None = None) -> Found:
        mm = self.mm
        name, typ = mm.names[o.module], mm.types[o.module]
        where = {"forward_op": f"born in the forward of '{name}' ({typ})",
                 "backward_op": f"born in the backward of '{name}' ({typ})",
                 "parameters": f"the parameters of '{name}' ({typ})",
                 "input": f"in the model's input, first received by '{name}' ({typ})",
                 "unknown": f"first seen at '{name}' ({typ})"}[o.cause]
        if o.cause == "forward_op" and st is not None:
            half = self._half(rec, st, o)
            if half and O.INF_BORN in o.detail:
                o.detail = o.detail.replace(O.INF_BORN, "its output holds Inf from finite "
                                            "inputs: a float16 overflow (float16 ends at "
                                            "65504)")
            elif half:
                o.detail += " (float16 values are involved, whose range ends at 65504)"
            elif O.INF_BORN in o.detail and fv is not None and o.entry >= 0:
                neg = fv[rec.row[o.entry]] < 0
                o.detail = o.detail.replace(O.INF_BORN, (
                    "its output holds -Inf from finite float32 inputs (log of 0, or a "
                    "result below the float32 range)" if neg else
                    "its output holds +Inf from finite float32 inputs (a result past the "
                    "float32 range, e.g. exp of a large value, or a division by 0)"))
        msg = f"{o.stage}: NaN/Inf {where}; {o.detail}"
        # a gradient gone Inf, or NaN in a module of torch's whose backward keeps finite
        # values finite short of an overflow (``selection.grad_safe``: not hooked)
        inf = o.cause == "backward_op" and ("Inf" in o.detail or not mm.hooked[o.module])
        overflow = (o.cause in ("parameters", "unknown") or inf
                    or (o.cause == "forward_op" and o.entry >= 0
                        and "float16" not in o.detail))
        return Found(step, name, o.cause, o.stage, msg,
                     hint(o.cause, name, typ, stage=o.stage, detail=o.detail,
                          loss=o.module == 0 and "loss" in o.detail, overflow=inf),
                     count, overflow)


def hint(cause: str, name: str, typ: str, since: int | None = None, stage: str = "",
         detail: str = "", loss: bool = False, overflow: bool = False) -> str:
    """What to try, for a non-finite origin. ``overflow``: a gradient went Inf (values
    grew past the float range), not NaN from finite values."""
    q = f"'{name}'"
    if cause == "parameters":
        return (f"the weights of {q} became NaN/Inf in the optimizer update after step "
                f"{since}: an update too large for them (lower the learning rate, clip "
                "gradients with torch.nn.utils.clip_grad_norm_) or a NaN gradient then; "
                "restart from a checkpoint taken before that step")
    if cause == "input":
        return ("the batch already holds NaN/Inf before the model: check the data pipeline "
                "(missing values, a division by a zero std when normalising); filter or "
                "torch.nan_to_num the inputs")
    if cause == "backward_op":
        if overflow:
            return (f"the gradient overflowed to Inf in the backward of {q} ({typ}): values "
                    "or gradients grew past the float range (weights grown by updates too "
                    "large, activations or a loss too large): lower the learning rate, clip "
                    "gradients (torch.nn.utils.clip_grad_norm_), check the weights' scale")
        if loss:
            return ("the loss is finite but its gradient is not: look at the loss code for "
                    "sqrt, pow, log or a norm evaluated at 0 (their derivative is infinite "
                    "there), or a division by a value that can be 0")
        return (f"the gradient turns NaN inside {q} ({typ}) although its forward is finite: "
                "an op there has an infinite derivative at the values it saw (sqrt or pow at "
                "0, a norm of a zero vector, torch.where over a branch that is NaN/Inf where "
                "it is not selected); compute the unsafe branch on safe values, e.g. "
                "torch.where(x > 0, x, 1).sqrt(), or add an epsilon (x.norm() + 1e-12)")
    if cause == "forward_op":
        if "float16" in detail:
            return (f"values overflowed to Inf in {q} ({typ}): its inputs or weights are too "
                    "large for the dtype (float16 ends at 65504: use bfloat16 autocast or a "
                    "GradScaler, keep this layer in float32, or normalise its input)")
        return (f"an op in the forward of {q} ({typ}) makes NaN/Inf from finite values: look "
                "for log or sqrt of values <= 0, division by 0, or exp of large values there; "
                "clamp the argument (torch.log(x.clamp_min(1e-12))) or use the stable form "
                "(torch.logsumexp, F.log_softmax)")
    return ""

