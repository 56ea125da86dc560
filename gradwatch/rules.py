"""The detectors: pure functions of a Snapshot plus bounded per-layer history -> Alerts.

``Thresholds`` holds every limit. ``Rules.evaluate`` runs once per flushed window (on the
background thread); ``Rules.nonfinite_now`` runs on the training thread from the per-step
non-finite flags, so a NaN is reported within one step, without waiting for the flush.
Patience, warm-up, hysteresis and rate limiting live here and nowhere else.
"""

from __future__ import annotations

import math
import statistics
import threading
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

from gradwatch.alerts import Alert
from gradwatch.selection import LayerInfo


@dataclass(frozen=True)
class Thresholds:
    """Limits of the rules. Defaults were measured on the zoo in ``tests/zoo.py`` (README)."""

    vanishing_rms: float = 1e-7
    """A layer's ``grad_rms`` below this is vanishing (absolute floor)."""
    vanishing_ratio: float = 1e-3
    """... or below this fraction of the largest layer's ``grad_rms`` in the same window."""
    exploding_rms: float = 1e2
    """A layer's ``grad_rms`` above this is exploding (absolute ceiling)."""
    exploding_ratio: float = 1e3
    """... or above this multiple of the median layer's ``grad_rms`` (after warm-up)."""
    spike_factor: float = 1e2
    """... or above this multiple of its own running average (after warm-up)."""
    extreme_rms: float = 1e5
    """Above this, exploding fires at once, without patience or warm-up."""
    dead_frac: float = 0.99
    """A ReLU-like layer whose outputs are exactly zero at least this often is dead."""
    saturated_frac: float = 0.9
    """A bounded activation with at least this fraction of outputs at its bounds is saturated."""
    saturation_margin: float = 0.01
    """An output within this fraction of the range from a bound counts as saturated."""
    patience: int = 2
    """Windows a condition must hold before it is reported."""
    warmup: int = 1
    """Windows before the relative and spike rules apply (absolute rules apply at once)."""
    rate_limit: int = 10
    """After an alert, the same (layer, kind) is held back for this many windows."""
    ema: float = 0.9
    """Decay of the running average used by the spike rule."""

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type == "int" or isinstance(f.default, int):
                if not isinstance(v, int) or isinstance(v, bool):
                    raise TypeError(f"Thresholds.{f.name} must be an int, got {v!r}")
                lo = 0 if f.name == "warmup" else 1
                if v < lo:
                    raise ValueError(f"Thresholds.{f.name} must be >= {lo}, got {v!r}")
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise TypeError(f"Thresholds.{f.name} must be a number, got {v!r}")
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"Thresholds.{f.name} must be finite and >= 0, got {v!r}")
            if f.name in ("vanishing_ratio", "dead_frac", "saturated_frac", "ema",
                          "saturation_margin") and not 0 <= v <= 1:
                raise ValueError(f"Thresholds.{f.name} must be in [0, 1], got {v!r}")

    @classmethod
    def coerce(cls, value: Thresholds | Mapping[str, Any] | None) -> Thresholds:
        if value is None:
            return cls()
        if isinstance(value, Thresholds):
            return value
        if isinstance(value, Mapping):
            names = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - names)
            if unknown:
                raise ValueError(
                    f"thresholds has unknown key(s) {unknown}; allowed: {sorted(names)}"
                )
            return cls(**value)
        raise TypeError(
            f"thresholds must be a gradwatch.Thresholds, a dict of its fields or None, "
            f"got {value!r}"
        )


def _fmt(v: float) -> str:
    return f"{v:.3g}"


class Rules:
    """Stateful evaluation over windows. State is per (layer, kind): O(layers), bounded."""

    def __init__(self, thresholds: Thresholds, layers: Sequence[LayerInfo]) -> None:
        self.t = thresholds
        self.layers = {li.name: li for li in layers}
        self.windows = 0
        self._streak: dict[tuple[str, str], int] = {}
        self._quiet_until: dict[tuple[str, str], int] = {}
        self._held: dict[tuple[str, str], int] = {}
        self._ema: dict[str, float] = {}
        self._lock = threading.Lock()  # the training thread and the worker both emit

    # -- rate limiting ------------------------------------------------------------------------
    def _emit(self, step: int, layer: str, kind: str, stat: str, value: float,
              threshold: float, why: str) -> Alert | None:
        key = (layer, kind)
        with self._lock:
            if self.windows < self._quiet_until.get(key, -1):
                self._held[key] = self._held.get(key, 0) + 1
                return None
            held = self._held.pop(key, 0)
            self._quiet_until[key] = self.windows + self.t.rate_limit
        extra = f" ({held} similar alert(s) held back)" if held else ""
        msg = (
            f"gradwatch: {kind} at layer '{layer}' (step {step}): {stat}={_fmt(value)} "
            f"{why} {_fmt(threshold)}{extra}"
        )
        return Alert(step, layer, kind, stat, value, threshold, msg)

    def _condition(self, key: tuple[str, str], holds: bool, immediate: bool = False) -> bool:
        """Patience and hysteresis: True once ``holds`` has lasted ``patience`` windows."""
        if not holds:
            if self._streak.pop(key, None) is not None:
                # cleared: re-arm, so the next occurrence is reported at once
                with self._lock:
                    self._quiet_until.pop(key, None)
                    self._held.pop(key, None)
            return False
        s = self._streak.get(key, 0) + 1
        self._streak[key] = s
        return immediate or s >= self.t.patience

    # -- per window -----------------------------------------------------------------------------
    def evaluate(self, step: int, stats: Mapping[str, Mapping[str, float]],
                 order: Sequence[str], act_nonfinite: Mapping[str, float]) -> list[Alert]:
        """One window's alerts. ``order``: layers in forward order; ``act_nonfinite``: per
        layer, non-finite elements in its outputs alone (to find where a NaN started)."""
        t = self.t
        out: list[Alert] = []
        warm = self.windows >= t.warmup
        rms = {n: s["grad_rms"] for n, s in stats.items()
               if "grad_rms" in s and math.isfinite(s["grad_rms"]) and s["grad_rms"] > 0}
        top = max(rms.values(), default=math.nan)
        med = statistics.median(rms.values()) if rms else math.nan

        def add(a: Alert | None) -> None:
            if a is not None:
                out.append(a)

        # non-finite: name the origin, the first layer in forward order whose output went bad
        bad = [n for n in order if stats.get(n, {}).get("nonfinite", 0) > 0]
        origin = self._origin(stats, order, act_nonfinite)
        for n in order:
            holds = n == origin
            if self._condition((n, "nonfinite"), holds, immediate=True):
                add(self._emit(step, n, "nonfinite", "nonfinite", stats[n]["nonfinite"], 0.0,
                               ">"))
        for name, s in stats.items():
            info = self.layers.get(name)
            r = rms.get(name)
            if bad:  # everything downstream of a NaN is meaningless this window
                continue
            # vanishing
            van = None
            if r is not None:
                if r < t.vanishing_rms:
                    van = ("grad_rms", r, t.vanishing_rms)
                elif warm and r < t.vanishing_ratio * top:
                    van = ("grad_rms", r, t.vanishing_ratio * top)
            if self._condition((name, "vanishing"), van is not None) and van:
                add(self._emit(step, name, "vanishing", van[0], van[1], van[2], "<"))
            # exploding
            exp = None
            extreme = False
            if r is not None:
                ema = self._ema.get(name)
                if r > t.extreme_rms:
                    exp, extreme = ("grad_rms", r, t.extreme_rms), True
                elif r > t.exploding_rms:
                    exp = ("grad_rms", r, t.exploding_rms)
                elif warm and len(rms) >= 3 and r > t.exploding_ratio * med:
                    exp = ("grad_rms", r, t.exploding_ratio * med)
                elif warm and ema is not None and r > t.spike_factor * ema:
                    exp = ("grad_rms", r, t.spike_factor * ema)
                if exp is None:  # the running average learns only from normal windows
                    self._ema[name] = r if ema is None else t.ema * ema + (1 - t.ema) * r
            if self._condition((name, "exploding"), exp is not None, extreme) and exp:
                add(self._emit(step, name, "exploding", exp[0], exp[1], exp[2], ">"))
            # dead units
            z = s.get("act_zero_frac", math.nan)
            dead = info is not None and info.relu_like and z >= t.dead_frac
            if self._condition((name, "dead"), dead) and dead:
                add(self._emit(step, name, "dead", "act_zero_frac", z, t.dead_frac, ">="))
            # saturation
            f = s.get("act_sat_frac", math.nan)
            sat = info is not None and info.bounds is not None and f >= t.saturated_frac
            if self._condition((name, "saturated"), sat) and sat:
                add(self._emit(step, name, "saturated", "act_sat_frac", f, t.saturated_frac,
                               ">="))
        self.windows += 1
        return out

    @staticmethod
    def _origin(stats: Mapping[str, Mapping[str, float]], order: Sequence[str],
                act_nonfinite: Mapping[str, float]) -> str | None:
        """First layer in forward order whose *output* went non-finite, else the last one
        (closest to the loss) whose gradients did."""
        for n in order:
            if act_nonfinite.get(n, 0) > 0:
                return n
        for n in reversed(order):
            if stats.get(n, {}).get("nonfinite", 0) > 0:
                return n
        return None

    def nonfinite_now(self, step: int, layer: str, count: float) -> Alert | None:
        """A per-step non-finite flag, reported from the training thread."""
        return self._emit(step, layer, "nonfinite", "nonfinite", count, 0.0, ">")
