"""``Snapshot``: the host-side form of one flushed window (the device -> host copy itself is
``hostcopy.HostCopy``)."""

from __future__ import annotations

import functools
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
_NOT_MEAN = np.array([c is None for _, c in FINAL_COLUMNS.values()])
# read as they are (divided by 1): the max-reduced stats (masked by their count) and the
# values that are not means
_AS_IS = np.array([k in ("grad_max", "act_max") for k in FINAL_KEYS]) | _NOT_MEAN


def final_values(window: np.ndarray) -> np.ndarray:
    """The window (its host copy, ``[layers, len(WINDOW)]`` fp32) -> ``[layers,
    len(FINAL_KEYS)]`` fp32 window values, on the background thread.

    Means are divided by their counts; a stat with a zero count is NaN. The max-reduced
    stats (grad_max, act_max) are not divided, only masked by their count. In fp32, as the
    window was kept (a division correctly rounded, on any device). Done here, not on the
    training thread: the flush there is one copy of the window and its reset."""
    vals = window.take(_VALUE_COLS, axis=1)  # row-major, as the rows are read
    cnts = window.take(_COUNT_COLS, axis=1)
    ok = cnts > 0
    ok |= _NOT_MEAN
    cnts[:, _AS_IS] = 1.0
    out = np.full(vals.shape, np.nan, dtype=np.float32)
    return np.divide(vals, cnts, out=out, where=ok)


@dataclass
class Snapshot:
    """One flushed window: host floats per layer and stat (NaN: not collected this window).

    ``step`` is the number of training steps completed at the flush; ``amp_skipped`` the
    steps of the window that a GradScaler skipped. A snapshot made by ``build`` also keeps
    the host array its dicts were read from (``values``) and where each value sits in it
    (``layout``), so the TensorBoard sink takes them in one array read.
    """

    step: int
    stats: dict[str, dict[str, float]]
    amp_skipped: int = 0
    act_nonfinite: dict[str, float] = field(default_factory=dict, repr=False, compare=False)
    act_stuck: dict[str, float] = field(default_factory=dict, repr=False, compare=False)
    values: np.ndarray | None = field(default=None, repr=False, compare=False)
    layout: Layout | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "amp_skipped": self.amp_skipped,
                "stats": {k: dict(v) for k, v in self.stats.items()}}

    @classmethod
    def build(cls, step: int, values: np.ndarray, layers: Sequence[LayerInfo],
              order: Sequence[int], applies: Sequence[tuple[str, ...]],
              amp_skipped: int = 0, layout: Layout | None = None) -> Snapshot:
        """From the ``[layers, FINAL_KEYS]`` host array; layers in ``order`` first.
        ``layout``: the last snapshot's, used again while the layers, their stat sets and
        ``order`` are the same (a lazy module materialised replaces its ``LayerInfo``)."""
        key = (tuple(order), tuple(layers), tuple(applies))
        lay = layout if layout is not None and layout.key == key else Layout(
            layers, key, applies)
        # one bulk conversion to Python floats (the same doubles ``float(values[i, j])``
        # gives), then each layer's row picked by a getter made once per stat set
        table = values.tolist()
        stats = {name: dict(zip(keys, pick(table[i]))) for i, name, keys, pick in lay.items}
        nf = values[lay.rows, _COL["_act_nonfinite"]]
        nf = np.where(np.isnan(nf), np.float32(0.0), nf)  # NaN: not measured, not a count
        act_nf = dict(zip(lay.names, nf.tolist()))
        stuck = dict(zip(lay.bounded, values[lay.bounded_rows, _COL["_act_stuck_frac"]]
                         .tolist()))
        return cls(step, stats, amp_skipped, act_nf, stuck, values, lay)


class Layout:
    """Where a snapshot's values sit in the host array: its layers (in ``order`` first,
    then those never called), the row and stat set of each, and every (layer, stat) value's
    row and column in the order of the dicts. The publisher keeps the last one and gives it
    again while they are the same (``key``)."""

    def __init__(self, layers: Sequence[LayerInfo], key: tuple[Any, ...],
                 applies: Sequence[tuple[str, ...]]) -> None:
        self.key = key  # (order, layers, applies) as tuples
        order = key[0]
        seen = set(order)
        rows = list(order) + [i for i in range(len(layers)) if i not in seen]
        self.items = tuple((i, layers[i].name, applies[i], _picker(applies[i])) for i in rows)
        self.names = tuple(layers[i].name for i in rows)
        self.rows = np.asarray(rows, dtype=np.intp)
        bounded = [i for i in rows if layers[i].bounds is not None]
        self.bounded = tuple(layers[i].name for i in bounded)
        self.bounded_rows = np.asarray(bounded, dtype=np.intp)
        # for the sink: each layer's (name, stats), every value's row and column in that
        # order (names are unique: module names), and the layout's identity tells it
        self.keys = tuple((layers[i].name, applies[i]) for i in rows)
        self.unique = len(set(self.names)) == len(self.names)
        self.flat_rows = np.asarray([i for i in rows for _ in applies[i]], dtype=np.intp)
        self.flat_cols = np.asarray([_COL[k] for i in rows for k in applies[i]],
                                    dtype=np.intp)

    def __getstate__(self) -> dict[str, Any]:  # a snapshot is pickled with its layout
        state = dict(self.__dict__)
        state["items"] = tuple(item[:3] for item in self.items)  # the getters are made again
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["items"] = tuple((i, n, k, _picker(k)) for i, n, k in state["items"])
        self.__dict__.update(state)


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
