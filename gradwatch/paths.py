"""The initialization audit placed in the forward order: each audited layer's excess over
the Glorot/He range and the growth of a signal's scale along its path.

Pure host code for the diagnosis (``diagnosis.py``): the audit (``audit.py``) measured the
weights at ``watch()``; the forward order says which activation follows each layer and
where a path starts over (a normalization, recurrent or unaudited layer). See
docs/diagnosis.md, "The scale of a path".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from gradwatch.alerts import fmt
from gradwatch.audit import InitAudit, WeightScale
from gradwatch.selection import LayerInfo

#: The gain range assumed when the activation after a layer is not known (a function call
#: in ``forward``, an activation without a ``calculate_gain`` entry, or the forward order
#: not seen yet): linear/sigmoid to tanh, so that any standard initialization for some
#: activation counts as sound.
UNKNOWN_GAIN = (1.0, 5.0 / 3.0)


def excess(w: WeightScale, gain: float | None) -> float:
    """A weight's std over the top of the range of the standard inits (Glorot, He on the
    fan-in, He on the fan-out) for ``gain`` (> 1), over its bottom (< 1), or 1 inside it."""
    lo_g, hi_g = (gain, gain) if gain else UNKNOWN_GAIN
    refs = w.reference(1.0)
    lo, hi = lo_g * min(refs), hi_g * max(refs)
    if w.std > hi:
        return w.std / hi
    if w.std < lo:
        return w.std / lo
    return 1.0


@dataclass(frozen=True)
class Scale:
    """One audited layer placed in the forward order."""

    name: str
    w: WeightScale
    act: str | None  # the activation module after it (its type name), None if not known
    nonlinearity: str | None  # its torch.nn.init name ("relu", "tanh"...)
    gain: float | None
    excess: float
    segment: int  # layers of one segment are between the same two resets of the scale
    growth: float  # excess compounded from the segment start (bounded activations cap it)

    def reference(self) -> tuple[str, float]:
        """The reference init to name: He for the ReLU family, Glorot otherwise."""
        glorot, he_in, _ = self.w.reference(self.gain or 1.0)
        if self.nonlinearity in ("relu", "leaky_relu", "selu"):
            return "He", he_in
        return "Glorot", glorot

    def remedy(self) -> str:
        """The ``torch.nn.init`` call for the activation after it."""
        if self.nonlinearity in ("relu", "leaky_relu"):
            return f"nn.init.kaiming_normal_(w, nonlinearity='{self.nonlinearity}')"
        if self.nonlinearity in ("tanh", "selu"):
            return (f"nn.init.xavier_uniform_(w, "
                    f"gain=nn.init.calculate_gain('{self.nonlinearity}'))")
        if self.nonlinearity == "sigmoid":
            return "nn.init.xavier_uniform_(w)"
        return ("nn.init.xavier_uniform_(w) (tanh, sigmoid, linear) or "
                "nn.init.kaiming_normal_(w) (ReLU family)")

    def describe(self) -> str:
        ref, std = self.reference()
        before = f" before a {self.act}" if self.act else ""
        return (f"weights of '{self.name}' had std {fmt(self.w.std)} at watch(), "
                f"{fmt(self.w.std / std)}x the {ref} std {fmt(std)} for "
                f"{self.w.fan_in} -> {self.w.fan_out}{before}")


@dataclass
class Paths:
    """The audited layers of one forward order. ``confirmed``: the order was seen in a
    window (else it is the registration order, and no activation is taken as known)."""

    order: list[str] = field(default_factory=list)
    scales: dict[str, Scale] = field(default_factory=dict)
    index: dict[str, int] = field(default_factory=dict)
    confirmed: bool = False

    @classmethod
    def place(cls, order: Sequence[str], audit: InitAudit, info: Mapping[str, LayerInfo],
              confirmed: bool) -> Paths:
        """Walk the order: each audited layer gets the activation after it, its excess,
        its segment and the growth from the segment start. A normalization layer, a
        recurrent layer or any other layer with parameters that is not audited starts a new
        segment; a bounded activation caps the growth at 1 (it lets a shrink through)."""
        scales: dict[str, Scale] = {}
        seg, growth = 0, 1.0
        for i, name in enumerate(order):
            li = info.get(name)
            w = audit.scales.get(name)
            if w is not None:
                nxt = order[i + 1] if i + 1 < len(order) else None
                act = audit.gains_of.get(nxt) if nxt is not None and confirmed else None
                if audit.unseen_norms:  # a normalization we cannot place: layers alone
                    seg, growth = seg + 1, 1.0
                r = excess(w, act[1] if act else None)
                growth *= r
                scales[name] = Scale(name, w, info[nxt].type_name if act and nxt else None,
                                     act[0] if act else None, act[1] if act else None, r,
                                     seg, growth)
            elif li is not None and li.bounds is not None:
                growth = min(growth, 1.0)
            elif name in audit.norms or name in audit.gains or (li is not None
                                                                 and li.has_params):
                seg, growth = seg + 1, 1.0
        return cls(list(order), scales, {n: i for i, n in enumerate(order)}, confirmed)

    def segment(self, s: Scale) -> list[Scale]:
        return [x for x in self.scales.values() if x.segment == s.segment]

    def before(self, name: str) -> str | None:
        """The module called just before ``name`` (the one feeding it, in a chain)."""
        i = self.index.get(name)
        return self.order[i - 1] if i else None

    def path_product(self, s: Scale) -> float:
        return math.prod(x.excess for x in self.segment(s))
