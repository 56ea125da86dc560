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
import warnings
import weakref
from typing import Any, Callable

import torch

from gradwatch.alerts import GradwatchWarning


class _ScalerStep:
    """The instance attribute that stands in for ``scaler.step`` while watched.

    It serves every live tap on the scaler (several watchers may share one scaler, e.g.
    one model and optimizer each). Without a live tap it is a plain pass-through: that is
    what a pickled or copied scaler gets, so a copy is not watched.
    """

    def __init__(self, scaler: Any) -> None:
        self._scaler = scaler
        self.taps: list[weakref.ref[ScalerTap]] = []

    def live(self) -> list[ScalerTap]:
        taps = [t() for t in self.taps]
        return [t for t in taps if t is not None]

    def __call__(self, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        real = types.MethodType(type(self._scaler).step, self._scaler)
        taps = [t for t in self.live() if t.active(optimizer)]
        if not taps:
            return real(optimizer, *args, **kwargs)
        for t in taps:
            t.before_step()
        stepped = [False]

        def mark(*_: Any) -> None:
            stepped[0] = True

        handle = optimizer.register_step_post_hook(mark)
        try:
            out = real(optimizer, *args, **kwargs)
        finally:
            handle.remove()
        for t in taps:
            t.after_step(stepped[0])
        return out

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_ScalerStep, (self._scaler,))


class ScalerTap:
    """Connects one GradScaler to one watcher (see the module docstring).

    ``unscale(factor)`` multiplies the staged output-gradient Σg² by ``factor`` (a device
    tensor), at most once per watcher step; ``skipped()`` is called on the training thread
    when the scaler skipped the optimizer step. ``optimizer``: the one whose skipped steps
    end a watcher step (None: the watcher is stepped by hand, a skip waits for ``step()``);
    held weakly, the watcher holds one given to ``watch()``. ``accepts(opt)``, while
    ``optimizer`` is None: whether ``scaler.step(opt)`` concerns this watcher (it may make
    ``opt`` the watcher's optimizer, a step the scaler skips included).
    """

    def __init__(self, scaler: Any, optimizer: Any, unscale: Callable[[torch.Tensor], None],
                 skipped: Callable[[], None],
                 accepts: Callable[[Any], bool] | None = None) -> None:
        self.scaler = scaler
        self._optimizer: weakref.ref[Any] | None = None
        self.optimizer = optimizer
        self._accepts = accepts
        self._unscale = unscale
        self._skipped = skipped
        self._unscaled = False  # this step's staged sums are unscaled already
        self.pending_skip = False  # for watchers stepped by hand: consumed by step()
        cur = scaler.__dict__.get("step")
        if not isinstance(cur, _ScalerStep):
            if cur is not None:  # someone else's wrapper: leave it alone, stay inactive
                warnings.warn(
                    "gradwatch: scaler.step is already replaced on this GradScaler instance; "
                    "skipped AMP steps cannot be detected and output-gradient stats stay "
                    "scaled",
                    GradwatchWarning,
                    stacklevel=4,
                )
                self._wrapper: _ScalerStep | None = None
                return
            cur = _ScalerStep(scaler)
            scaler.step = cur
        cur.taps.append(weakref.ref(self))
        self._wrapper = cur

    @property
    def optimizer(self) -> Any:
        return self._optimizer() if self._optimizer is not None else None

    @optimizer.setter
    def optimizer(self, opt: Any) -> None:
        self._optimizer = weakref.ref(opt) if opt is not None else None

    def active(self, optimizer: Any) -> bool:
        if not getattr(self.scaler, "is_enabled", lambda: True)():
            return False
        mine = self.optimizer
        if mine is not None:
            return optimizer is mine
        return self._accepts is None or self._accepts(optimizer)

    def before_step(self) -> None:
        if self._unscaled:
            return
        get = getattr(self.scaler, "_get_scale_async", None)
        scale = get() if get is not None else None
        if isinstance(scale, torch.Tensor):
            inv = torch.reciprocal(scale.detach().to(torch.float32))
            self._unscale(inv * inv)
            self._unscaled = True

    def after_step(self, stepped: bool) -> None:
        if stepped:
            return
        if self.optimizer is None:
            self.pending_skip = True  # the user's watcher.step() ends this step
        else:
            self._skipped()

    def new_step(self) -> None:
        """The watcher's step ended (committed or dropped)."""
        self._unscaled = False

    def take_pending_skip(self) -> bool:
        skip, self.pending_skip = self.pending_skip, False
        return skip

    def remove(self) -> None:
        w, self._wrapper = self._wrapper, None
        if w is None:
            return
        w.taps = [t for t in w.taps if t() is not None and t() is not self]
        if not w.taps and self.scaler.__dict__.get("step") is w:
            del self.scaler.__dict__["step"]
