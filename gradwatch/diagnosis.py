"""Why an alert fired: the evidence the watcher measured -> ``Alert.cause`` and ``Alert.hint``.

Runs beside the rules (on the background thread for window alerts, on the training thread
for an extreme gradient reported within its step) and reads only host data: the
initialization audit made once at ``watch()`` (``audit.py``), the forward order, and a
bounded history of the flushed windows. It never touches the model or the device.

The causes and what each needs (thresholds in ``CauseLimits``, measured on the zoo, see
docs/diagnosis.md):

* ``recurrent_gain``: an exploding gradient at a recurrent layer, or below one in forward
  order, whose recurrent weight had a largest singular value above ``recurrent_gain``.
* ``init_scale``: the weights along the layer's path (between normalization layers) are
  off the Glorot/He scale for their fan-in/fan-out and the activation after them: growing
  a signal ``init_grow``-fold or more before an exploding gradient or a saturated
  activation (or a vanishing gradient below that saturated activation), or shrinking it
  to ``init_shrink`` or less around a vanishing one.
* ``learning_rate``: with no cause above, the median ``update_ratio`` over the layers was
  at least ``update_ratio`` in the windows before a gradient blew up; or a ReLU that was
  alive died right after the median ``update_ratio`` jumped ``update_jump``-fold.
* ``bias_shift``: a dead ReLU-like layer whose pre-activations (the outputs of the module
  before it) have a mean at least ``shift`` standard deviations below zero.
* otherwise ``unknown``: a wrong cause is worse than none.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics
import threading
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from gradwatch.alerts import Alert, fmt
from gradwatch.audit import InitAudit
from gradwatch.paths import Paths, place_on_graph
from gradwatch.selection import LayerInfo
from gradwatch.thresholds import Thresholds

Stats = Mapping[str, Mapping[str, float]]
Fault = Callable[..., None]  # (stage, layer, exc, defer=...): reported once, see hooks.py
#: Where a bounded activation is flat: |x| beyond this is within ``saturation_margin`` of
#: a bound (computed for the margin in use, see ``flat_beyond``).
_FLAT = {"Sigmoid": lambda m: math.log((1 - m) / m), "Tanh": lambda m: math.atanh(1 - 2 * m)}


@dataclass(frozen=True)
class CauseLimits:
    """The evidence a cause needs. Measured on the zoo (``tests/support/zoo.py``): see
    docs/diagnosis.md for each value and the measurements behind it."""

    init_grow: float = 4.0
    """Growth of a signal's scale along a path (the product of each layer's excess over
    the Glorot/He range, from the last normalization layer) from which weights too large
    are a cause."""
    init_shrink: float = 0.01
    """Product of the per-layer excess over a whole path at or below which weights too
    small are a cause of a vanishing gradient."""
    recurrent_gain: float = 1.5
    """Largest singular value of a recurrent weight's gate block above which it is a cause
    of an exploding gradient."""
    update_ratio: float = 0.05
    """Median ``update_ratio`` over the layers, in the windows before a blow-up, from which
    the learning rate is a cause (about 1e-3 is the usual healthy order)."""
    update_jump: float = 5.0
    """... or a jump of the median ``update_ratio`` to this multiple of its earlier median
    (a learning-rate spike) right before a ReLU that was alive died."""
    shift: float = 2.0
    """A dead ReLU's pre-activations with a mean at least this many standard deviations
    below zero are shifted (bias or input)."""
    history: int = 8
    """Windows of history kept (per layer: the zero fraction; per window: the median
    update ratio)."""


LIMITS = CauseLimits()


def flat_beyond(type_name: str, margin: float) -> float | None:
    """|x| beyond which a sigmoid/tanh output is within ``margin`` of the range from a
    bound (4.6 for a sigmoid and 2.3 for a tanh at 1%); None for other activations."""
    f = _FLAT.get(type_name)
    return f(margin) if f is not None and 0 < margin < 0.5 else None


@dataclass
class _Window:
    step: int
    index: int  # windows seen before this one
    update: float  # median update_ratio over the layers (NaN: none measured)
    zero: dict[str, float]  # act_zero_frac of the ReLU-like layers


class Diagnosis:
    """Evidence -> (cause, hint) for the alerts of the vanishing, exploding, dead and
    saturated rules. Thread-safe: the history is written on the background thread and
    read on both."""

    def __init__(self, audit: InitAudit, layers: Sequence[LayerInfo], thresholds: Thresholds,
                 limits: CauseLimits = LIMITS, fault: Fault | None = None) -> None:
        self.fault = fault
        self.off = False  # switched off after an internal failure: causes stay "unknown"
        self.audit = audit
        self.limits = limits
        self.margin = thresholds.saturation_margin
        self.dead_frac = thresholds.dead_frac
        self.sat_frac = thresholds.saturated_frac
        self.info = {li.name: li for li in layers}
        self.relu_like = tuple(li.name for li in layers if li.relu_like)  # for the rules too
        self._lock = threading.Lock()
        self._history: collections.deque[_Window] = collections.deque(maxlen=limits.history)
        self._seen = 0
        watched = set(self.info)
        self._paths = Paths()
        try:  # until a window says otherwise, the order is the registration order
            self._paths = Paths.place([n for n in audit.order if n in watched], audit,
                                      self.info, confirmed=False)
        except Exception as e:  # noqa: BLE001 - reported, never propagated
            self._failed(e)

    # -- forward order ------------------------------------------------------------------------
    def _failed(self, e: Exception, layer: str = "*") -> None:
        """A bug here must not cost the alerts: the diagnosis switches itself off (reported
        once, from the thread it happened on, delivered on the training thread)."""
        self.off = True
        if self.fault is not None:
            self.fault("diagnosis (alert causes)", layer, e, defer=True)

    def see_order(self, order: Sequence[str]) -> None:
        """The forward order of the watched layers, from a window (background thread)."""
        p = self._paths
        graph = self.audit.graph
        if self.off or not order or (p.confirmed and list(order) == p.order
                                     and (graph is None or p.on_graph)):
            return
        try:
            placed = place_on_graph(list(order), self.audit, self.info, graph) \
                if graph is not None else \
                Paths.place(list(order), self.audit, self.info, confirmed=True)
            with self._lock:
                self._paths = placed
        except Exception as e:  # noqa: BLE001 - reported, never propagated
            self._failed(e)

    # -- history --------------------------------------------------------------------------------
    def record(self, step: int, stats: Stats) -> None:
        """Keep what later diagnoses need from a window (bounded)."""
        if self.off:
            return
        try:
            ur = [s["update_ratio"] for s in stats.values()
                  if math.isfinite(s.get("update_ratio", math.nan))]
            zero = {n: stats[n]["act_zero_frac"] for n in self.relu_like
                    if "act_zero_frac" in stats.get(n, ())}
            with self._lock:
                self._history.append(_Window(step, self._seen, statistics.median(ur) if ur
                                             else math.nan, zero))
                self._seen += 1
        except Exception as e:  # noqa: BLE001 - reported, never propagated
            self._failed(e)

    # -- causes ---------------------------------------------------------------------------------
    def explain(self, alert: Alert, stats: Stats | None = None, streak: int = 0) -> Alert:
        """``alert`` with its cause and hint. ``stats``: the window it was found in (None
        for an alert found within a step); ``streak``: windows its condition has held
        (those are not "before" it)."""
        if self.off:
            return alert
        try:
            with self._lock:
                found = {
                    "exploding": self._exploding,
                    "vanishing": self._vanishing,
                    "saturated": self._saturated,
                    "dead": self._dead,
                }.get(alert.kind, lambda *_: None)(alert.layer, stats or {}, streak)
        except Exception as e:  # noqa: BLE001 - the alert goes out without a cause
            self._failed(e, alert.layer)
            return alert
        if found is None:
            return alert
        cause, hint = found
        return dataclasses.replace(alert, cause=cause, hint=hint)

    def _recurrent(self, layer: str) -> tuple[str, str] | None:
        """A recurrent layer at or after ``layer`` in forward order with a gain too large."""
        at = self._paths.index.get(layer, 0)
        for name, g in self.audit.gains.items():
            if g.gain < self.limits.recurrent_gain:
                continue
            if name != layer and self._paths.index.get(name, -1) < at:
                continue
            gate = f" (its {g.gate} gate)" if g.gate else ""
            via = "" if name == layer else f"the gradient reaching '{layer}' comes through " \
                                           f"'{name}': "
            other = "" if self.info[name].type_name in ("LSTM", "GRU") else \
                ", or use an LSTM or GRU"
            return "recurrent_gain", (
                f"{via}recurrent weight '{name}.{g.param}' had gain {fmt(g.gain)}{gate} "
                f"(largest singular value) at watch(): above 1 the error signal can grow up "
                f"to that factor per time step: initialise it orthogonal "
                f"(nn.init.orthogonal_), clip gradients (torch.nn.utils.clip_grad_norm_)"
                f"{other}")
        return None

    def _too_large(self, layer: str) -> tuple[str, str] | None:
        s = self._paths.scales.get(layer)
        if s is None:  # a layer without a weight matrix (a normalization's scale...)
            return self._too_large_after(layer)
        seg = self._paths.segment(s)
        top = max(seg, key=lambda x: x.growth)
        if top.growth < self.limits.init_grow:
            return None
        big = [x for x in seg if x.excess > 1]
        worst = max(big, key=lambda x: x.excess)
        names = f"'{big[0].name}'" if len(big) == 1 else \
            f"{len(big)} weight layers '{big[0].name}' .. '{big[-1].name}'"
        return "init_scale", (
            f"{worst.describe()}; {names} scale the signal up by about {fmt(top.growth)}x "
            f"along the path to '{top.name}', so activations and gradients grow layer after "
            f"layer: try {worst.remedy()} or a normalization layer")

    def _too_large_after(self, layer: str) -> tuple[str, str] | None:
        """The gradient reaching ``layer`` comes back through weight layers it feeds whose
        path grows a signal ``init_grow``-fold (on the dataflow: backward, a weight layer
        scales the gradient by about its excess too)."""
        after = self._paths.weights_after(layer)
        segs = {x.segment for x in after}
        seg = [x for x in self._paths.scales.values() if x.segment in segs]
        if not seg:
            return None
        top = max(seg, key=lambda x: x.growth)
        if top.growth < self.limits.init_grow:
            return None
        worst = max(seg, key=lambda x: x.excess)
        return "init_scale", (
            f"the gradient reaching '{layer}' comes back through weight layers that scale the "
            f"signal up by about {fmt(top.growth)}x along the path to '{top.name}': "
            f"{worst.describe()}: try {worst.remedy()}")

    def _lr_before(self, streak: int) -> tuple[float, int] | None:
        past = list(self._history)[:len(self._history) - streak] if streak else \
            list(self._history)
        past = [w for w in past if math.isfinite(w.update)]
        if not past:
            return None
        w = past[-1]
        return (w.update, w.step) if w.update >= self.limits.update_ratio else None

    def _exploding(self, layer: str, stats: Stats, streak: int) -> tuple[str, str] | None:
        found = self._recurrent(layer) or self._too_large(layer)
        if found:
            return found
        lr = self._lr_before(streak)
        if lr is not None:
            u, step = lr
            return "learning_rate", (
                f"the updates were large before it blew up: median update_ratio {fmt(u)} "
                f"over the layers in the window ending at step {step} (about 1e-3 is usual), "
                f"with a sound initialization: lower the learning rate (or its warm-up peak) "
                f"or clip gradients (torch.nn.utils.clip_grad_norm_)")
        return None

    def _vanishing(self, layer: str, stats: Stats, streak: int) -> tuple[str, str] | None:
        s = self._paths.scales.get(layer)
        seg = self._paths.segment(s) if s is not None else []
        path = self._paths.path_product(s) if s is not None else 1.0
        if s is not None and path <= self.limits.init_shrink:
            small = [x for x in seg if x.excess < 1]
            worst = min(small, key=lambda x: x.excess)
            return "init_scale", (
                f"{worst.describe()}; the {len(small)} weight layers '{small[0].name}' .. "
                f"'{small[-1].name}' of its path scale the signal by about {fmt(path)}, "
                f"forward and back: try {worst.remedy()} or a normalization layer")
        # a normalization downstream divides the gradient by the scale of a signal that
        # weights too large upstream grew
        grown = [(n, g) for n, g in self._paths.norms_after(layer)
                 if g >= self.limits.init_grow]
        if grown:
            norm, g = max(grown, key=lambda x: x[1])
            big = [x for x in self._paths.weights_before(norm) if x.excess > 1]
            if big:
                worst = max(big, key=lambda x: x.excess)
                return "init_scale", (
                    f"{worst.describe()}; weights too large upstream grow the signal "
                    f"entering '{norm}' about {fmt(g)}x, and a normalization divides the "
                    f"gradient it passes back by that scale: try {worst.remedy()}")
        # the gradient dies in a saturated activation above it, saturated by large weights
        at = self._paths.index.get(layer, 0)
        for name in self._paths.order[at + 1:]:
            info = self.info.get(name)
            if info is None or info.bounds is None:
                continue
            if stats.get(name, {}).get("act_sat_frac", 0.0) < self.sat_frac:
                continue
            found = self._saturated(name, stats, streak)
            if found is not None and found[0] == "init_scale":
                return "init_scale", f"'{name}' above it is saturated and passes little " \
                                     f"gradient down: {found[1]}"
        return None

    def _saturated(self, layer: str, stats: Stats, streak: int) -> tuple[str, str] | None:
        before = self._paths.before(layer)
        s = self._paths.scales.get(before) if before else None
        if s is None or s.growth < self.limits.init_grow:
            return None
        out = stats.get(s.name, {})
        std, mean = out.get("act_std", math.nan), out.get("act_mean", math.nan)
        flat = flat_beyond(self.info[layer].type_name, self.margin)
        seen = ""
        if math.isfinite(std):
            seen = f"; its outputs have std {fmt(std)} (mean {fmt(mean)})"
            if flat is not None:
                seen += f" where a {self.info[layer].type_name.lower()} is flat beyond " \
                        f"about ±{flat:.2g}"
        path = "" if s.excess >= self.limits.init_grow else \
            f" (about {fmt(s.growth)}x along its path)"
        if self.info[layer].type_name == "Sigmoid":
            # measured: with Xavier weights alone a deep sigmoid net trades saturation for
            # vanishing gradients (its slope is at most 1/4), as Glorot & Bengio found
            fix = ("try ReLU with nn.init.kaiming_normal_(w, nonlinearity='relu') or tanh "
                   "with nn.init.xavier_uniform_(w, gain=nn.init.calculate_gain('tanh')): "
                   "with Xavier weights alone a deep sigmoid net's gradients stay small (its "
                   "slope is at most 1/4)")
        else:
            fix = f"try {s.remedy()}, a non-saturating activation (ReLU, GELU) or a " \
                  f"normalization layer"
        return "init_scale", f"{s.describe()}{path}{seen}: {fix}"

    def _dead(self, layer: str, stats: Stats, streak: int) -> tuple[str, str] | None:
        found = self._lr_spike(layer)
        before = self._paths.before(layer)
        out = stats.get(before, {}) if before else {}
        mean, std = out.get("act_mean", math.nan), out.get("act_std", math.nan)
        if found is None and math.isfinite(mean) and math.isfinite(std) and mean < 0 \
                and mean <= -self.limits.shift * std:
            spread = f"std {fmt(std)}, {fmt(-mean / std)} std below zero" if std > 0 else \
                "all equal"
            w = self.audit.scales.get(before or "")
            bias = f"; the bias of '{before}' had mean {fmt(w.bias_mean)} at watch()" \
                if w is not None and w.bias_mean is not None and w.bias_mean <= mean / 2 \
                else ""
            found = "bias_shift", (
                f"its inputs (the outputs of '{before}') have mean {fmt(mean)} ({spread}), so "
                f"'{layer}' passes no gradient{bias}: re-initialise that bias "
                f"(nn.init.zeros_), check the input normalization, or use an activation "
                f"that cannot die (LeakyReLU, GELU)")
        upstream = [n for n in self._paths.order[:self._paths.index.get(layer, 0)]
                    if self.info.get(n) is not None and self.info[n].relu_like
                    and stats.get(n, {}).get("act_zero_frac", 0.0) >= self.dead_frac]
        if found is None:
            if upstream and mean == 0 and std == 0:  # fed nothing but zeros: no cause here
                return "unknown", (f"its inputs (the outputs of '{before}') are all 0: it is "
                                   f"downstream of dead '{upstream[-1]}'; fix that one first")
            return None
        if upstream:
            found = found[0], found[1] + f" (it is downstream of dead '{upstream[-1]}')"
        return found

    def _lr_spike(self, layer: str) -> tuple[str, str] | None:
        """A ReLU alive in an earlier window that died right after a jump of the median
        update ratio: in its last live window or the one after it (the history includes
        the current window; a jump once it is dead is not why it died)."""
        h = list(self._history)
        alive = [i for i, w in enumerate(h) if w.zero.get(layer, 1.0) < self.dead_frac]
        if not alive:
            return None
        for k in range(alive[-1], min(alive[-1] + 2, len(h))):
            base = [w.update for w in h[:k] if w.index > 0 and math.isfinite(w.update)]
            if not base or not math.isfinite(h[k].update):
                continue
            b = statistics.median(base)
            if b > 0 and h[k].update >= self.limits.update_jump * b:
                last = h[alive[-1]]
                jump = f"the median update_ratio jumped to {fmt(h[k].update)}, " \
                       f"{h[k].update / b:.0f}x its earlier {fmt(b)}"
                when = f"in the window ending at step {last.step} (zero fraction " \
                       f"{last.zero[layer]:.2f})"
                story = f"was still alive {when}, when {jump}, and died after it" \
                    if k == alive[-1] else \
                    f"was alive {when} and died after {jump} in the window ending at step " \
                    f"{h[k].step}"
                return "learning_rate", (
                    f"'{layer}' {story}: a learning-rate spike; lower the peak learning "
                    f"rate, warm it up or clip gradients (torch.nn.utils.clip_grad_norm_)")
        return None
