"""``Thresholds``: every limit of the rules, checked when made (a leaf module: the rules,
the diagnosis and ``watch()`` all read it)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping


@dataclass(frozen=True)
class Thresholds:
    """Limits of the rules. Defaults were measured on the zoo in ``tests/support/zoo.py``: see
    ``docs/thresholds.md`` for each value and the measurements behind it."""

    vanishing_rms: float = 1e-7
    """A layer's ``grad_rms`` below this is vanishing (absolute floor)."""
    vanishing_ratio: float = 1e-3
    """... or below this fraction of the largest non-exploding layer's ``grad_rms`` in the
    same window (scale-free; after warm-up)."""
    exploding_rms: float = 10.0
    """A layer's ``grad_rms`` above this is exploding (absolute ceiling)."""
    exploding_ratio: float = 100.0
    """... or above this multiple of the median layer's ``grad_rms`` (after warm-up; needs
    at least 3 layers with gradients)."""
    spike_factor: float = 100.0
    """... or above this multiple of its own running average (after warm-up)."""
    extreme_rms: float = 1e3
    """Above this, exploding fires at once, without patience or warm-up."""
    dead_frac: float = 0.99
    """A ReLU-like layer whose outputs are exactly zero at least this often is dead."""
    saturated_frac: float = 0.4
    """A bounded activation with at least this fraction of outputs at its bounds is saturated
    (when ``saturated_units`` of its units are stuck too)."""
    saturated_units: float = 0.1
    """... and at least this fraction of its units sits at a bound for every sample of the
    batch (a well-trained tanh net saturates many outputs, but not whole units)."""
    saturation_margin: float = 0.01
    """An output within this fraction of the range from a bound counts as saturated (for
    sigmoid and tanh: the local derivative is below ~4% of its peak)."""
    patience: int = 2
    """Windows a condition must hold before it is reported, and stay clear before the same
    (layer, kind) is re-armed (hysteresis)."""
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
            if f.name in ("vanishing_ratio", "dead_frac", "saturated_frac", "saturated_units",
                          "ema", "saturation_margin") and not 0 <= v <= 1:
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
