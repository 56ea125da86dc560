"""``Snapshot``: the host-side form of one flushed window (the device -> host copy itself is
``hostcopy.HostCopy``)."""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from gradwatch.buffers import FINAL_COLUMNS, FINAL_KEYS, STATS, W
from gradwatch.selection import LayerInfo

_PARAM_STATS = ("grad_norm", "grad_rms", "grad_max")


def applicable(info: LayerInfo, has_optimizer: bool) -> tuple[str, ...]:
    """The stats that apply to a layer; the others are absent from its dict, not zero."""
    out = []
    for s in STATS:
        if s in _PARAM_STATS and not info.has_trainable:
            continue
        if s == "weight_norm" and not info.has_params:
            continue
        if s == "update_ratio" and not (has_optimizer and info.has_trainable):
            continue
        if s == "act_sat_frac" and info.bounds is None:
            continue
        out.append(s)
    return tuple(out)


_VALUE_COLS = np.array([W[v] for v, _ in FINAL_COLUMNS.values()])
_COUNT_COLS = np.array([W[c] if c is not None else 0 for _, c in FINAL_COLUMNS.values()])
_IS_MEAN = np.array([c is not None for _, c in FINAL_COLUMNS.values()])
_NOT_DIVIDED = np.array([k in ("grad_max", "act_max") for k in FINAL_KEYS])


def final_values(window: np.ndarray) -> np.ndarray:
    """The window (its host copy, ``[layers, len(WINDOW)]`` fp32) -> ``[layers,
    len(FINAL_KEYS)]`` fp32 window values, on the background thread.

    Means are divided by their counts; a stat with a zero count is NaN. The max-reduced
    stats (grad_max, act_max) are not divided, only masked by their count. In fp32, as the
    window was kept (a division correctly rounded, on any device). Done here, not on the
    training thread: the flush there is one copy of the window and its reset."""
    vals = window.take(_VALUE_COLS, axis=1)  # row-major, as the rows are read
    cnts = window.take(_COUNT_COLS, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(_NOT_DIVIDED, vals, vals / cnts)
    return np.where(_IS_MEAN, np.where(cnts > 0, mean, np.float32(np.nan)), vals)


@dataclass
class Snapshot:
    """One flushed window: host floats per layer and stat (NaN: not collected this window).

    ``step`` is the number of training steps completed at the flush; ``amp_skipped`` the
    steps of the window that a GradScaler skipped.
    """

    step: int
    stats: dict[str, dict[str, float]]
    amp_skipped: int = 0
    act_nonfinite: dict[str, float] = field(default_factory=dict, repr=False, compare=False)
    act_stuck: dict[str, float] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "amp_skipped": self.amp_skipped,
                "stats": {k: dict(v) for k, v in self.stats.items()}}

    @classmethod
    def build(cls, step: int, values: np.ndarray, layers: Sequence[LayerInfo],
              order: Sequence[int], applies: Sequence[tuple[str, ...]],
              amp_skipped: int = 0) -> Snapshot:
        """From the ``[layers, FINAL_KEYS]`` host array; layers in ``order`` first."""
        seen = set(order)
        rows = list(order) + [i for i in range(len(layers)) if i not in seen]
        # one bulk conversion to Python floats (the same doubles ``float(values[i, j])``
        # gives), then each layer's row picked by a getter made once per stat set
        table = values.tolist()
        nf_col, stuck_col = _COL["_act_nonfinite"], _COL["_act_stuck_frac"]
        stats: dict[str, dict[str, float]] = {}
        act_nf: dict[str, float] = {}
        stuck: dict[str, float] = {}
        for i in rows:
            name = layers[i].name
            row = table[i]
            keys = applies[i]
            stats[name] = dict(zip(keys, _picker(keys)(row)))
            v = row[nf_col]
            act_nf[name] = 0.0 if math.isnan(v) else v
            if layers[i].bounds is not None:
                stuck[name] = row[stuck_col]
        return cls(step, stats, amp_skipped, act_nf, stuck)


_COL = {k: j for j, k in enumerate(FINAL_KEYS)}


@functools.cache
def _picker(keys: tuple[str, ...]) -> Callable[[Sequence[float]], Sequence[float]]:
    """The values of ``keys`` (a stat set: a handful per watcher) from one row, in order."""
    cols = [_COL[k] for k in keys]
    if len(cols) == 1:
        c = cols[0]
        return lambda row: (row[c],)
    if not cols:
        return lambda row: ()
    return operator.itemgetter(*cols)
