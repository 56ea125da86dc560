"""GradScaler (AMP): unscaled output-gradient stats, and steps the scaler skips.

Facts this relies on (torch 2.13): ``scaler.step(opt)`` unscales the gradients in place
(unless ``scaler.unscale_(opt)`` already did) and then calls ``opt.step()`` only if they are
finite, so the optimizer step hooks see unscaled gradients and do not fire at all on a
skipped step. Output-gradient tensor hooks run during ``backward`` and see gradients of the
*scaled* loss.

``ScalerTap`` wraps ``step`` on the given scaler instance (the class is untouched, and
``close()`` restores it). Around the real ``step`` it

* divides the staged output-gradient sums of squares by ``scale**2``, on the device (the
  scale cannot change before ``scaler.update()``, which comes after ``scaler.step()``);
* notes whether the optimizer actually stepped (a temporary step post hook), which is
  known on the host without a sync of its own: ``scaler.step`` has already read the
  inf/NaN flag to decide.
"""

from __future__ import annotations

import types
import weakref
from typing import Any, Callable

import torch


class _ScalerStep:
    """The instance attribute that stands in for ``scaler.step`` while watched.

    Without a live tap it is a plain pass-through: that is what a pickled or copied scaler
    gets, so a copy is not watched (and a later ``watch()`` may install a tap on it).
    """

    def __init__(self, scaler: Any, tap: ScalerTap | None) -> None:
        self._scaler = scaler
        self._tap = weakref.ref(tap) if tap is not None else None

    def tap(self) -> ScalerTap | None:
        return self._tap() if self._tap is not None else None

    def __call__(self, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        real = types.MethodType(type(self._scaler).step, self._scaler)
        tap = self.tap()
        if tap is None or not tap.active(optimizer):
            return real(optimizer, *args, **kwargs)
        tap.before_step()
        stepped = [False]

        def mark(*_: Any) -> None:
            stepped[0] = True

        handle = optimizer.register_step_post_hook(mark)
        try:
            out = real(optimizer, *args, **kwargs)
        finally:
            handle.remove()
        tap.after_step(stepped[0])
        return out

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_ScalerStep, (self._scaler, None))


class ScalerTap:
    """Connects one GradScaler to one watcher (see the module docstring).

    ``unscale(factor)`` multiplies the staged output-gradient Σg² by ``factor`` (a device
    tensor); ``skipped()`` is called on the training thread when the scaler skipped the
    optimizer step.
    """

    def __init__(self, scaler: Any, optimizer: Any, unscale: Callable[[torch.Tensor], None],
                 skipped: Callable[[], None]) -> None:
        self.scaler = scaler
        self.optimizer = optimizer
        self._unscale = unscale
        self._skipped = skipped
        self.pending_skip = False  # for watchers stepped by hand: consumed by step()
        cur = scaler.__dict__.get("step")
        self._installed = cur is None or (isinstance(cur, _ScalerStep) and cur.tap() is None)
        if self._installed:
            scaler.step = _ScalerStep(scaler, self)

    def active(self, optimizer: Any) -> bool:
        enabled = getattr(self.scaler, "is_enabled", lambda: True)()
        return bool(enabled) and (self.optimizer is None or optimizer is self.optimizer)

    def before_step(self) -> None:
        get = getattr(self.scaler, "_get_scale_async", None)
        scale = get() if get is not None else None
        if isinstance(scale, torch.Tensor):
            inv = torch.reciprocal(scale.detach().to(torch.float32))
            self._unscale(inv * inv)

    def after_step(self, stepped: bool) -> None:
        if stepped:
            return
        if self.optimizer is None:
            self.pending_skip = True  # the user's watcher.step() ends this step
        else:
            self._skipped()

    def take_pending_skip(self) -> bool:
        skip, self.pending_skip = self.pending_skip, False
        return skip

    def remove(self) -> None:
        if self._installed and isinstance(self.scaler.__dict__.get("step"), _ScalerStep):
            del self.scaler.__dict__["step"]
        self._installed = False
