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
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch.nn.parameter import is_lazy

from gradwatch.hooks import _Inert

if TYPE_CHECKING:
    from gradwatch.watcher import Watcher


def any_lazy(params: Iterable[torch.Tensor]) -> bool:
    return any(is_lazy(p) for p in params)


class MaterializedHook:
    """Forward hook on the watched root: tells the watcher after each forward until its
    parameters are materialized (the watcher then removes it). Inert when copied or
    pickled with the model."""

    __slots__ = ("_ref",)

    def __init__(self, watcher: Watcher) -> None:
        self._ref = weakref.ref(watcher)

    def __call__(self, module: Any, args: Any, output: Any) -> None:
        w = self._ref()
        if w is not None:
            w._materialized()
        return None

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_Inert, ())
