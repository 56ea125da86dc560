"""Lazy modules (``nn.LazyLinear``, ``nn.LazyConv2d``...): parameters without a shape until
the first forward pass.

A model watched before that forward has parameters that cannot be measured yet. The
watcher starts with no parameter statistics and a forward hook on the root
(``MaterializedHook``); once every parameter is materialized (right after the first forward,
before its backward) the watcher tracks them, so parameter statistics start with the first
step. Materializing keeps each parameter's identity (torch swaps its class in place), so an
optimizer built before the first forward holds the same objects.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Iterable

import torch
from torch.nn.parameter import is_lazy

from gradwatch.handles import WeakHook


def any_lazy(params: Iterable[torch.Tensor]) -> bool:
    return any(is_lazy(p) for p in params)


class MaterializedHook(WeakHook):
    """Forward hook on the watched root: calls ``on_forward`` (a bound method, held weakly)
    after each forward until the parameters are materialized (the watcher then removes it).
    Inert when copied or pickled with the model."""

    __slots__ = ()

    def __init__(self, on_forward: Callable[[], None]) -> None:
        self._ref = weakref.WeakMethod(on_forward)  # type: ignore[arg-type]

    def __call__(self, module: Any, args: Any, output: Any) -> None:
        fn = self._ref()
        if fn is not None:
            fn()
        return None
