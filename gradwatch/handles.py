"""Hooks held weakly, and every removable handle of a watcher in one place.

* ``Inert``: what a gradwatch hook becomes in a copy or a pickle of the model (a callable
  that does nothing), so a copied model is not watched.
* ``WeakHook``: the base of the hook objects gradwatch registers on modules, tensors and
  torch's registries: it holds its target by weak reference (the registries would otherwise
  keep the watcher alive) and pickles as ``Inert``.
* ``HandleRegistry``: owns every removable handle of one watcher (module hooks, tensor
  hooks, torch's global optimizer hooks, the lazy-module hook, the GradScaler tap), so
  "no hook left after close" is a property of this one object: ``remove_all``.
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol


class Inert:
    """What a gradwatch hook becomes in a copy or a pickle of the model: it does nothing."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None


class WeakHook:
    """A hook that holds its target weakly (``self._ref()``: the target, or None once it is
    gone) and pickles or deep-copies as ``Inert``."""

    __slots__ = ("_ref",)

    def __init__(self, target: Any) -> None:
        self._ref = weakref.ref(target)

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (Inert, ())


class Removable(Protocol):
    def remove(self) -> None: ...


class HandleRegistry:
    """Every removable handle of one watcher, by group; ``remove_all`` at close.

    Groups: ``"module"`` (module forward hooks, removed at close), ``"optimizer"`` (torch's
    global optimizer step hooks and the root's forward counter), ``"lazy"`` (the
    materialization hook, removed once the parameters have their shapes) and ``"amp"`` (the
    GradScaler tap). The tensor hooks of a step (output gradients, the trace's gradient
    checks) keep no handle: they die with their tensors and are inert once the watcher
    closes (a handle per hook per step, held to the step's end, made the garbage
    collector's full passes frequent)."""

    def __init__(self) -> None:
        self._groups: dict[str, list[Removable]] = {}

    def add(self, group: str, handle: Removable) -> None:
        self._groups.setdefault(group, []).append(handle)

    def remove(self, group: str) -> None:
        handles = self._groups.get(group)
        if handles:
            for h in handles:
                h.remove()
            handles.clear()

    def remove_all(self) -> None:
        for group in list(self._groups):
            self.remove(group)

    def count(self) -> int:
        return sum(len(h) for h in self._groups.values())
