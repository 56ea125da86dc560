"""Which layer a non-finite value is blamed on, from per-layer counts: one rule for the
window (``rules.Rules``) and for a step's flags (``monitor.StepMonitor``).

The first layer in forward order whose *output* went non-finite; else the last one (closest
to the loss) whose gradients did; None when neither.
"""

from __future__ import annotations

from typing import Callable, Hashable, Sequence, TypeVar

K = TypeVar("K", bound=Hashable)


def nonfinite_origin(order: Sequence[K], out_bad: Callable[[K], float],
                     grad_bad: Callable[[K], float]) -> K | None:
    """``order``: layers in forward order; ``out_bad(k)``/``grad_bad(k)``: the non-finite
    count of layer ``k``'s outputs / gradients."""
    for k in order:
        if out_bad(k) > 0:
            return k
    for k in reversed(order):
        if grad_bad(k) > 0:
            return k
    return None
