"""The detectors: a Snapshot plus bounded per-layer history (patience, rate limits, running
averages: state kept in ``Rules``) -> Alerts.

``Thresholds`` (``thresholds.py``, re-exported here) holds every limit. ``Rules.evaluate``
runs once per flushed window (on the background thread); ``Rules.nonfinite_now`` and
``Rules.exploding_now`` run on the training thread from the per-step flags (called by
``monitor.StepMonitor``), so a NaN or an extreme gradient is reported within one step,
without waiting for the flush.
Patience, warm-up, hysteresis and rate limiting live here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import statistics
import threading
from typing import Any, Callable, Mapping, Sequence, Tuple

from gradwatch.alerts import Alert
from gradwatch.audit import InitAudit
from gradwatch.blame import nonfinite_origin
from gradwatch.diagnosis import Diagnosis, Fault
from gradwatch.schema import fmt
from gradwatch.selection import LayerInfo
from gradwatch.steplr import StepUpdates
from gradwatch.thresholds import Thresholds

__all__ = ["NONFINITE_KEY", "Rules", "Thresholds", "classify_grads", "classify_updates",
           "optimizer_family"]


_fmt = fmt  # the one number format of every view (schema.fmt)


Verdict = Tuple[float, float, bool]  # value, threshold, extreme
_NONFINITE = operator.methodcaller("get", "nonfinite", 0)  # a layer's count, 0 when absent


def classify_grads(rms: Mapping[str, float], ema: Mapping[str, float], warm: bool,
                   t: Thresholds, versus_median: bool = True
                   ) -> tuple[dict[str, Verdict], dict[str, Verdict]]:
    """Vanishing and exploding layers of one window from their (finite, > 0) ``grad_rms``.

    Each relative rule uses a reference that the other condition cannot distort: vanishing
    is measured against the largest layer that is not exploding, and the ratio-to-median
    rule against the median of the layers that are neither vanishing nor exploding (in a
    net whose lower half vanishes, the healthy top is not "exploding"). ``ema``: each
    layer's running average of normal windows, for the spike rule. ``versus_median``
    False (an adaptive optimizer: a gradient 100x the median layer's still makes a step of
    about ``lr``): the ratio-to-median rule is left out; the absolute and spike rules stay.
    """
    exploding: dict[str, Verdict] = {}
    for n, v in rms.items():  # absolute: from the first window
        if v > t.extreme_rms:
            exploding[n] = (v, t.extreme_rms, True)
        elif v > t.exploding_rms:
            exploding[n] = (v, t.exploding_rms, False)

    def vanishing_vs(ref: float) -> dict[str, Verdict]:
        out: dict[str, Verdict] = {}
        for n, v in rms.items():
            if n in exploding:
                continue
            if v < t.vanishing_rms:
                out[n] = (v, t.vanishing_rms, False)
            elif warm and v < t.vanishing_ratio * ref:
                out[n] = (v, t.vanishing_ratio * ref, False)
        return out

    def top() -> float:
        return max((v for n, v in rms.items() if n not in exploding), default=math.nan)

    vanishing = vanishing_vs(top())
    if warm:
        normal = [v for n, v in rms.items() if n not in exploding and n not in vanishing]
        med = statistics.median(normal) if len(normal) >= 3 else math.nan
        for n, v in rms.items():
            if n in exploding or n in vanishing:
                continue
            avg = ema.get(n)
            if versus_median and v > t.exploding_ratio * med:
                exploding[n] = (v, t.exploding_ratio * med, False)
            elif avg is not None and v > t.spike_factor * avg:
                exploding[n] = (v, t.spike_factor * avg, False)
        vanishing = vanishing_vs(top())
    return vanishing, exploding


#: Optimizers whose update does not shrink with the gradient (it is divided by a running
#: measure of the gradient's own size, or is its sign): torch's classes by name, and any
#: optimizer whose parameter groups carry an ``eps`` or ``betas`` (Adam-like ones from other
#: libraries: Adafactor, 8-bit Adam, fused Adam, Lion...).
ADAPTIVE = frozenset({"Adam", "AdamW", "Adamax", "NAdam", "RAdam", "SparseAdam", "Adagrad",
                      "Adadelta", "RMSprop", "Rprop", "Adafactor", "Lion"})
SGD_LIKE, ADAPTIVE_FAMILY = "sgd", "adaptive"


def optimizer_family(opt: Any) -> tuple[str, float]:
    """(``"adaptive"`` or ``"sgd"``, the optimizer's ``eps``) of an optimizer; an optimizer
    that is not known (None: no optimizer seen yet, or stepped by hand) is SGD-like, the
    setting in which a small gradient is a small update. ``eps``: the smallest over the
    parameter groups (1e-8 where the optimizer has none)."""
    if opt is None:
        return SGD_LIKE, math.nan
    groups = getattr(opt, "param_groups", None) or []
    eps: list[float] = []
    keys: set[str] = set()
    for g in groups:
        if isinstance(g, Mapping):
            keys |= set(g)
            e = g.get("eps")
            e = e[0] if isinstance(e, (tuple, list)) and e else e
            if isinstance(e, (int, float)) and not isinstance(e, bool) and e > 0:
                eps.append(float(e))
    names = {k.__name__ for k in type(opt).__mro__}
    if names & ADAPTIVE or "eps" in keys or "betas" in keys:
        return ADAPTIVE_FAMILY, min(eps) if eps else 1e-8
    return SGD_LIKE, math.nan


def classify_updates(rms: Mapping[str, float], updates: Mapping[str, float],
                     exploding: Mapping[str, Verdict], warm: bool, eps: float,
                     t: Thresholds) -> dict[str, Verdict]:
    """Vanishing layers under an adaptive optimizer: its gradient is down at the optimizer's
    ``eps`` (there ``update ~ lr * g / eps`` shrinks with the gradient again, and decoupled
    weight decay is all that moves the weights), or the step no longer moves its weights
    (its ``update_ratio`` below ``vanishing_ratio`` of the median layer's, after warm-up).
    A gradient small by design (a branch behind a LayerScale of 1e-6, query/key projections
    at a 0.02 init) still makes a normal step: Adam's update is about ``lr`` per element
    whatever the gradient's scale."""
    ups = {n: u for n, u in updates.items() if n in rms and math.isfinite(u) and u > 0}
    med = statistics.median(ups.values()) if len(ups) >= 3 else math.nan
    out: dict[str, Verdict] = {}
    for n, v in rms.items():
        if n in exploding:
            continue
        u = ups.get(n)
        if v < t.vanishing_eps * eps:
            out[n] = (v, t.vanishing_eps * eps, False)
        elif u is not None and warm and u < t.vanishing_ratio * med:
            out[n] = (u, t.vanishing_ratio * med, False)
    return out


def absorbed_inf(s: Mapping[str, float]) -> bool:
    """A layer's window stats show infinities of one sign in its outputs and no NaN (the
    fp32 sum of a tensor is NaN when it holds a NaN or infinities of both signs)."""
    return math.isinf(s.get("act_mean", math.nan))


NONFINITE_KEY = ("*", "nonfinite")
"""Non-finite values are one event for the whole model: once reported at the layer where
they started, the layers they spread to are not reported again until it clears."""


class Rules:
    """Stateful evaluation over windows. State is per (layer, kind): O(layers), bounded.

    ``evaluate`` runs on the background thread, ``nonfinite_now`` on the training thread;
    the rate-limiting state they share is guarded by a lock.
    """

    def __init__(self, thresholds: Thresholds, layers: Sequence[LayerInfo],
                 audit: InitAudit | None = None, fault: Fault | None = None) -> None:
        self.t = thresholds
        self.layers = {li.name: li for li in layers}
        self._bounded = tuple(li.name for li in layers if li.bounds is not None)
        # cause and hint of each alert, from the init audit and the windows' history
        self.diagnosis = Diagnosis(audit or InitAudit(), layers, thresholds, fault=fault)
        self.windows = 0
        self._streak: dict[tuple[str, str], int] = {}
        self._clear: dict[tuple[str, str], int] = {}
        self._quiet_until: dict[tuple[str, str], int] = {}
        self._held: dict[tuple[str, str], int] = {}
        self._ema: dict[str, float] = {}
        self._lock = threading.Lock()  # the training thread and the worker both emit
        # non-finite origins are named per step from the flags (``nonfinite_now``); the
        # window's own naming is the fallback when that part is switched off
        self.per_step_nonfinite = True
        # the optimizer in use, read at each window: an object with an ``optimizer``
        # attribute (the watcher's ``stepping.Stepping``); None: SGD-like
        self.optimizer_source: Any = None


        # per-step learning-rate evidence (training thread): the updates of the last steps
        self.step_lr = StepUpdates()

    # -- rate limiting ------------------------------------------------------------------------
    def _emit(self, step: int, layer: str, kind: str, stat: str, value: float,
              threshold: float, why: str, key: tuple[str, str] | None = None,
              note: str = "") -> Alert | None:
        key = key or (layer, kind)
        with self._lock:
            if self.windows < self._quiet_until.get(key, -1):
                self._held[key] = self._held.get(key, 0) + 1
                return None
            held = self._held.pop(key, 0)
            self._quiet_until[key] = self.windows + self.t.rate_limit
        extra = (f"; {note}" if note else "") + (
            f" ({held} similar alert(s) held back)" if held else "")
        msg = (
            f"gradwatch: {kind} at layer '{layer}' (step {step}): {stat}={_fmt(value)} "
            f"{why} {_fmt(threshold)}{extra}"
        )
        return Alert(step, layer, kind, stat, value, threshold, msg)

    def _condition(self, key: tuple[str, str], holds: bool, immediate: bool = False) -> bool:
        """Patience and hysteresis: True once ``holds`` has lasted ``patience`` windows (at
        once if ``immediate``); re-armed after it has been clear for ``patience`` windows."""
        if not holds:
            self._streak.pop(key, None)
            c = self._clear.get(key)
            if c is not None:
                c += 1
                if c >= self.t.patience:  # cleared for good: the next one is reported at once
                    del self._clear[key]
                    with self._lock:
                        self._quiet_until.pop(key, None)
                        self._held.pop(key, None)
                else:
                    self._clear[key] = c
            return False
        self._clear[key] = 0
        s = self._streak.get(key, 0) + 1
        self._streak[key] = s
        return immediate or s >= self.t.patience

    # -- per window -----------------------------------------------------------------------------
    def evaluate(self, step: int, stats: Mapping[str, Mapping[str, float]],
                 order: Sequence[str], act_nonfinite: Mapping[str, float],
                 act_stuck: Mapping[str, float] | None = None) -> list[Alert]:
        """One window's alerts. ``order``: layers in forward order; ``act_nonfinite``: per
        layer, non-finite elements in its outputs alone (to find where a NaN started);
        ``act_stuck``: per bounded layer, the fraction of units at a bound for every sample
        (None: not measured, the saturation rule then reads ``act_sat_frac`` alone)."""
        out: list[Alert] = []
        self.diagnosis.see_order(order)

        def add(a: Alert | None) -> None:
            if a is not None:
                out.append(a)

        # non-finite: name the origin, the first layer in forward order whose output went bad
        origin = self._origin(stats, order, act_nonfinite)
        if (self._condition(NONFINITE_KEY, origin is not None, immediate=True) and origin
                and not self.per_step_nonfinite):
            add(self._emit(step, origin, "nonfinite", "nonfinite",
                           stats.get(origin, {}).get("nonfinite", math.nan), 0.0, ">",
                           NONFINITE_KEY))
        if origin is None:  # everything downstream of a NaN is meaningless this window
            self._window(step, stats, add, act_stuck)
        self.windows += 1
        return out

    def _window(self, step: int, stats: Mapping[str, Mapping[str, float]],
                add: Callable[[Alert | None], None],
                act_stuck: Mapping[str, float] | None) -> None:
        t = self.t
        warm = self.windows >= t.warmup
        self.diagnosis.record(step, stats)

        def add_why(a: Alert | None) -> None:  # cause and hint, from this window on
            if a is not None:
                a = self.diagnosis.explain(a, stats, self._streak.get((a.layer, a.kind), 1))
                add(self._step_lr(a) if a.kind == "exploding" else a)

        # A parameter without a gradient (None: unused branch, frozen; or exactly zero:
        # behind a dead ReLU, set_to_none=False) has no grad_rms here: never vanishing.
        # inf stays: finite gradients whose norm overflowed fp32 (|g| ~ 1e19) are exploding.
        rms = {n: s["grad_rms"] for n, s in stats.items()
               if "grad_rms" in s and not math.isnan(s["grad_rms"]) and s["grad_rms"] > 0}
        family, eps = self.optimizer_family()
        vanishing, exploding = classify_grads(rms, self._ema, warm, t,
                                              versus_median=family != ADAPTIVE_FAMILY)
        if family == ADAPTIVE_FAMILY:  # a small gradient is not a small update there
            updates = {n: s["update_ratio"] for n, s in stats.items() if "update_ratio" in s}
            vanishing = classify_updates(rms, updates, exploding, warm, eps, t)
        for name, v in rms.items():  # the running average learns only from normal windows
            if name not in exploding:
                ema = self._ema.get(name)
                self._ema[name] = v if ema is None else t.ema * ema + (1 - t.ema) * v
        # a layer where no condition holds and none is pending (a streak or a clearing
        # count: ``_condition`` sets ``_clear`` with every streak) has nothing to update
        pending = {key[0] for key in self._clear}
        maybe = self._candidates(stats, pending.union(vanishing, exploding))
        for name, s in stats.items():
            if name not in maybe:
                continue
            info = self.layers.get(name)
            van = vanishing.get(name)
            exp = exploding.get(name)
            z = s.get("act_zero_frac", math.nan)
            dead = info is not None and info.relu_like and z >= t.dead_frac
            f = s.get("act_sat_frac", math.nan)
            units = act_stuck.get(name, math.nan) if act_stuck is not None else 1.0
            sat = (info is not None and info.bounds is not None and f >= t.saturated_frac
                   and units >= t.saturated_units)
            if van is None and exp is None and not dead and not sat and name not in pending:
                continue
            if self._condition((name, "vanishing"), van is not None) and van:
                stat = "update_ratio" if family == ADAPTIVE_FAMILY and \
                    van[0] == stats[name].get("update_ratio") else "grad_rms"
                add_why(self._emit(step, name, "vanishing", stat, van[0], van[1], "<"))
            if self._condition((name, "exploding"), exp is not None,
                               exp is not None and exp[2]) and exp:
                add_why(self._emit(step, name, "exploding", "grad_rms", exp[0], exp[1], ">"))
            if self._condition((name, "dead"), dead) and dead:
                add_why(self._emit(step, name, "dead", "act_zero_frac", z, t.dead_frac, ">="))
            if self._condition((name, "saturated"), sat) and sat:
                add_why(self._emit(step, name, "saturated", "act_sat_frac", f, t.saturated_frac,
                               ">=", note=f"{units:.0%} of its units at a bound for every "
                               "sample" if act_stuck is not None else ""))

    def _candidates(self, stats: Mapping[str, Mapping[str, float]], flagged: set[str]
                    ) -> set[str]:
        """The layers where a condition may hold this window, found without a Python step
        per layer: ``flagged`` (a vanishing or exploding verdict, a pending streak) and the
        dead or saturated candidates among the ReLU-like and bounded layers (the others
        can be neither). ``_window`` checks each of them in full and skips the rest."""
        t = self.t
        flagged.update(n for n in self.diagnosis.relu_like if n in stats and stats[n].get(
            "act_zero_frac", math.nan) >= t.dead_frac)
        flagged.update(n for n in self._bounded if n in stats and stats[n].get(
            "act_sat_frac", math.nan) >= t.saturated_frac)
        return flagged

    def optimizer_family(self) -> tuple[str, float]:
        """The family of the optimizer in use (``optimizer_family``), SGD-like when none is
        known."""
        src = self.optimizer_source
        try:
            return optimizer_family(getattr(src, "optimizer", None) if src is not None
                                    else None)
        except Exception:  # noqa: BLE001 - an exotic optimizer: read as SGD-like
            return SGD_LIKE, math.nan

    @staticmethod
    def _origin(stats: Mapping[str, Mapping[str, float]], order: Sequence[str],
                act_nonfinite: Mapping[str, float]) -> str | None:
        """Where the window's non-finite *fault* started (``blame.nonfinite_origin``): the
        first layer in forward order whose output held a NaN, else the last one (closest to
        the loss) whose gradients went non-finite; None when there is no fault. An infinity
        that a layer's outputs held without a NaN (its ``act_mean`` is +-Inf: one sign, no
        NaN) and that reached no gradient was absorbed downstream (a ``-inf`` mask before a
        softmax, the log-probability of an impossible class): counted in ``nonfinite``, no
        origin."""

        # no output count and no gradient count above zero: no fault (the common window,
        # decided in C-level loops, no Python step per layer: a count is falsy when 0 and
        # NaN is not; ``0.0 < v`` is false for a NaN, as ``v > 0`` is)
        if not any(act_nonfinite.values()) and not any(
                map((0.0).__lt__, map(_NONFINITE, stats.values()))):
            return None

        def out_bad(n: str) -> float:
            nf = act_nonfinite.get(n, 0)
            return nf if nf > 0 and not absorbed_inf(stats.get(n, {})) else 0.0

        def grad_bad(n: str) -> float:  # non-finite beyond what its outputs held
            return stats.get(n, {}).get("nonfinite", 0) - act_nonfinite.get(n, 0)

        origin = nonfinite_origin(order, out_bad, grad_bad)
        if origin is not None:
            return origin
        for n in stats:  # a layer never called in forward order
            if grad_bad(n) > 0:
                return n
        return None

    def _step_lr(self, a: Alert) -> Alert:
        """An exploding alert the windows' history does not explain (too early: the first
        window) gets ``learning_rate`` from the updates of the steps before it."""
        if a.cause != "unknown":
            return a
        hint = self.step_lr.hint(a.step, f"'{a.layer}' blew up")
        return a if hint is None else dataclasses.replace(a, cause="learning_rate", hint=hint)

    def exploding_now(self, step: int, layer: str, rms: float) -> Alert | None:
        """A per-step ``grad_rms`` above ``extreme_rms``, reported from the training thread
        within the step (the window's evaluation shares its rate limit)."""
        if not rms > self.t.extreme_rms:
            return None
        a = self._emit(step, layer, "exploding", "grad_rms", rms, self.t.extreme_rms, ">")
        if a is None:
            return None
        return self._step_lr(self.diagnosis.explain(a))

    def nonfinite_now(self, step: int, layer: str, count: float,
                      note: str = "") -> Alert | None:
        """A non-finite origin found from a step's flags, reported from the training thread
        at once. Rate-limited per origin layer: what the NaN spreads to is not reported
        separately (``nonfinite.NonFiniteTracker`` re-arms once a step is finite again)."""
        return self._emit(step, layer, "nonfinite", "nonfinite", count, 0.0, ">", note=note)
