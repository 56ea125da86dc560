"""What ends a watcher's training step: an optimizer's ``step()`` or ``watcher.step()``.

Torch's global optimizer step hooks (``torch.optim.optimizer.register_optimizer_step_pre_hook``
and ``..._post_hook``) see the ``step()`` of every optimizer in the process. Each watcher
registers one of each (removed at close) and keeps, per optimizer, which parameters of the
watched model its ``param_groups`` hold (``WeakKeyDictionary``, looked up again only when
the number of groups changes): one Python call per optimizer step and hook.

Gradients are read where the optimizer that updates them reads them: at its pre-step (its
post-step when ``step()`` gets a closure, whose backward runs inside the step), so they are
accumulated, unscaled by a GradScaler (which unscales one optimizer at a time), clipped and
all-reduced as that optimizer uses them. Each optimizer reads the watched parameters it
holds; one that holds them all reads them in one pass.

The modes of a watcher:

* ``"optimizer"``: a *driving* optimizer, given to ``watch(optimizer=...)`` or *found*: the
  first optimizer whose ``step()`` updates a watched parameter. From then on it is used
  exactly as if it had been given, and the watcher's step ends when its ``step()`` returns
  (or when a GradScaler skips it). Other optimizers that update watched parameters are
  *companions*: what they read (gradients of their parameters at their pre-step, weights
  before the first update of the step) counts in the step in progress: one that steps
  before the driver in the same iteration, in that step, one that steps after it, in the
  next. The update ratio of a step runs from before the first optimizer update of the
  step to its end, all optimizers together. A found driver is held weakly: when it is
  garbage (the loop made a new optimizer), the next optimizer that updates a watched
  parameter is found the same way.
* ``"manual"``: ``watcher.step()`` ends each step (loops without a torch optimizer). Once
  it is called, the user steps the watcher. Optimizers that update watched parameters
  still read their gradients (when the model ran a training forward since the last step:
  what ``watcher.step()`` then reports, unless another forward comes first; else
  ``watcher.step()`` reads every watched gradient itself) and measure update ratios. A loop
  that calls both ``opt.step()`` and ``watcher.step()`` counts each step once: the first
  ``watcher.step()`` right after a step the found optimizer ended (no training forward in
  between) confirms that step instead of ending another, and switches to manual stepping.
* ``"auto"``: neither yet.

Training forward passes (grad enabled) of the watched model are counted by a root forward
hook (eager mode; a compiled forward is not counted). ``TRAINING_FORWARDS_WITHOUT_STEP``
of them with no step ending gets one ``UserWarning`` saying how to step the watcher.
"""

from __future__ import annotations

import warnings
import weakref
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from gradwatch.alerts import GradientAlertError, logger
from gradwatch.faults import FaultGuard
from gradwatch.handles import HandleRegistry, WeakHook

if TYPE_CHECKING:
    from gradwatch.engine import StepEngine

AUTO, OPTIMIZER, MANUAL = "auto", "optimizer", "manual"
_DRIVER, _COMPANION = "driver", "companion"
OFF = "stepping"  # the fault guard's name for this part

#: Training forward passes (grad enabled) of the watched model with no step ending before
#: the watcher warns, once. Far above any gradient-accumulation factor in common use (tens
#: of micro-batches per optimizer step, rarely a few hundred), and still early: a few
#: minutes into a typical run rather than at its end.
TRAINING_FORWARDS_WITHOUT_STEP = 1000


def closure_given(args: Any, kwargs: Any) -> bool:
    """Whether ``optimizer.step`` was called with a closure (positional or keyword)."""
    closure = kwargs.get("closure") if kwargs else None
    if closure is None and len(args) > 1:  # args[0] is the optimizer itself
        closure = args[1]
    return callable(closure)


def warn_usage(msg: str, stacklevel: int) -> None:
    """A ``UserWarning`` about how gradwatch is used (not a model-health alert, not an
    internal fault); where warnings are errors (``-W error``) it is logged instead: it
    must not stop the training either."""
    try:
        warnings.warn(msg, UserWarning, stacklevel=stacklevel)
    except Exception:
        logger.warning(msg)


def _name(opt: Any) -> str:
    return f"{type(opt).__name__} (id {id(opt):#x})"


class _GlobalStepHook(WeakHook):
    """One of torch's global optimizer step hooks; holds the ``Stepping`` weakly (torch's
    registry is process-wide and would otherwise keep the watcher alive).

    It also holds its own handle: reachable from torch's registry, the handle's weak
    reference to that registry is not cleared when the garbage collector frees a watcher
    and its model together (weak references inside the garbage are cleared before the
    watcher's finalizer runs, which would leave the hook behind)."""

    __slots__ = ("_post", "handle")

    def __init__(self, stepping: Stepping, post: bool) -> None:
        super().__init__(stepping)
        self._post = post
        register = register_optimizer_step_post_hook if post else register_optimizer_step_pre_hook
        self.handle = register(self)

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        s = self._ref()
        if s is None or OFF in s.off:
            return None
        try:
            if self._post:
                s.post(optimizer, args, kwargs)
            else:
                s.pre(optimizer, args, kwargs)
        except GradientAlertError:  # on_alert="raise": from the step that found it
            raise
        except Exception as e:  # never the reason the training stops
            s.fail("optimizer step hook", e)
        return None


class _ForwardCounter(WeakHook):
    """Forward hook on the watched root: counts training forward passes (eager only: a
    Python counter in traced code would recompile every step). Inert when copied."""

    __slots__ = ()

    def __call__(self, module: Any, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling() or not torch.is_grad_enabled():
            return None
        s = self._ref()
        if s is not None and OFF not in s.off:
            try:
                s.forward()
            except Exception as e:  # never the reason the training stops
                s.fail("forward counter", e)
        return None


class _Held:
    """What one optimizer holds of the watched model, for ``len(param_groups)`` groups."""

    __slots__ = ("groups", "watched", "only")

    def __init__(self, groups: int, watched: bool, only: frozenset[int] | None) -> None:
        self.groups = groups
        self.watched = watched  # some parameter of the watched model
        self.only = only  # indices into the tracked parameters; None: all of them


class Stepping:
    """Decides, per optimizer step and per ``watcher.step()``, what it means for the
    watcher (see the module docstring) and calls the step engine's methods
    (``engine.StepEngine``); its hooks are owned by the watcher's ``HandleRegistry``."""

    def __init__(self, engine: StepEngine, root: torch.nn.Module,
                 params: Iterable[torch.Tensor], explicit: torch.optim.Optimizer | None,
                 guard: FaultGuard, handles: HandleRegistry) -> None:
        self._engine = weakref.ref(engine)
        self._ids = frozenset(id(p) for p in params)
        self._held: weakref.WeakKeyDictionary[Any, _Held] = weakref.WeakKeyDictionary()
        self.explicit = explicit
        self._found: weakref.ref[Any] | None = None  # a found driver
        self._manual_opt: weakref.ref[Any] | None = None  # an optimizer seen when manual
        self.mode = OPTIMIZER if explicit is not None else AUTO
        self.confirmable = False  # the last step was ended by a found driver, no forward since
        self.forwards = 0  # training forward passes seen in all
        self._since = 0  # ... since the step ``_at_step`` ended
        self._at_step = 0
        self._others = 0  # steps of other optimizers updating watched parameters, since
        self._unwatched = 0  # steps of optimizers updating no watched parameter, since
        self._other_names: set[str] = set()
        self._grads_at: tuple[int, int] | None = None  # (step, forwards) of early-read grads
        self._warned = False
        self._guard = guard
        self.off = guard.off  # OFF in it: switched off after an internal failure
        handles.add("optimizer", _GlobalStepHook(self, post=False).handle)
        handles.add("optimizer", _GlobalStepHook(self, post=True).handle)
        handles.add("optimizer", root.register_forward_hook(_ForwardCounter(self)))

    # -- what is known --------------------------------------------------------------------
    @property
    def driver(self) -> Any:
        """The driving optimizer (given or found; None when manual or not found yet)."""
        if self.explicit is not None:
            return self.explicit
        return self._found() if self._found is not None else None

    @property
    def optimizer(self) -> Any:
        """The optimizer whose update ratios are measured: the driver, or when stepped by
        hand one that updated watched parameters (None before any)."""
        if self.mode == MANUAL:
            return self._manual_opt() if self._manual_opt is not None else None
        return self.driver

    def _holds(self, opt: Any, w: StepEngine) -> _Held:
        groups = opt.param_groups
        held = self._held.get(opt)
        if held is None or held.groups != len(groups):
            mine = {id(p) for g in groups for p in g["params"]}
            tracked = w.params.trainable
            only = frozenset(k for k, (p, _) in enumerate(tracked) if id(p) in mine)
            held = _Held(len(groups), not mine.isdisjoint(self._ids),
                         None if len(only) == len(tracked) else only)
            self._held[opt] = held
        return held

    def forget(self) -> None:
        """The tracked parameters changed (lazy modules materialized): look again."""
        self._held = weakref.WeakKeyDictionary()

    def _role(self, opt: Any, w: StepEngine, adopt: bool) -> str | None:
        if self.mode == OPTIMIZER and opt is self.driver:
            return _DRIVER
        if not self._holds(opt, w).watched:
            return None
        if self.mode == MANUAL:
            if self._manual_opt is None or self._manual_opt() is None:
                self._manual_opt = weakref.ref(opt)
                self._known(w)
            return _COMPANION
        if adopt and self.driver is None:  # auto, or the found driver is gone
            self._found = weakref.ref(opt)
            self.mode = OPTIMIZER
            self._known(w)
            return _DRIVER
        return _COMPANION

    def _known(self, w: StepEngine) -> None:
        """An optimizer updates watched parameters: update ratios apply from now on, and a
        GradScaler's skipped steps of a driving optimizer end a step."""
        w.on_optimizer_known()
        w.set_amp_optimizer(self.driver if self.mode == OPTIMIZER else None)

    def accepts(self, opt: Any) -> bool:
        """For the GradScaler tap: ``scaler.step(opt)`` of an optimizer this watcher uses.

        A GradScaler often skips the first steps of fp16 training, and a skipped step never
        calls ``opt.step()``: the driver is found here too."""
        w = self._engine()
        return w is not None and self._role(opt, w, adopt=True) is not None

    # -- torch's global optimizer step hooks ------------------------------------------------
    def pre(self, opt: Any, args: Any, kwargs: Any) -> None:
        w = self._engine()
        if w is None or w.closed:
            return
        role = self._role(opt, w, adopt=True)
        self._count(w)
        if role is None:
            self._unwatched += 1
            return
        # with a closure (Lightning, LBFGS) the backward runs inside step(): the gradients
        # are read after it, in post() (optimizers do not modify .grad in place)
        closure = closure_given(args, kwargs)
        only = self._holds(opt, w).only
        if self.mode == MANUAL:
            # only when the model ran since the last step: else these are the gradients
            # the last watcher.step() reported (it came before this optimizer step)
            if not closure and self._since > 0:
                taken = w.start_take()
                w.read_grads(only)
                self._grads_at = (self._at_step, self._since)
                w.take_trace(taken)
        else:
            if role == _COMPANION:
                self._others += 1
                self._other_names.add(_name(opt))
            if not closure:
                # the step's forward and backward are done, no weight updated yet: the
                # moment to read its non-finite trace (the first optimizer of the step),
                # taken before the gradient pass, checked with its norms after it
                taken = w.start_take()
                w.read_grads(only)
                w.take_trace(taken)
        if w.collector.full:  # a sampled step: the weights before the first update
            w.copy_before_update(only)

    def post(self, opt: Any, args: Any, kwargs: Any) -> None:
        w = self._engine()
        if w is None or w.closed:
            return
        role = self._role(opt, w, adopt=False)
        if role is None:
            return
        if closure_given(args, kwargs):
            w.read_grads(self._holds(opt, w).only)
            self._count(w)
            self._grads_at = (self._at_step, self._since)
        if role == _DRIVER:
            w.end_step()
            self.ended_by_driver()

    def ended_by_driver(self) -> None:
        """A step was ended by the driver (stepped, or skipped by a GradScaler)."""
        self.confirmable = self.explicit is None

    # -- watcher.step() -----------------------------------------------------------------------
    def manual_step(self, w: StepEngine) -> bool:
        """``watcher.step()`` was called; False when it only confirms the step the found
        driver just ended. Either way the watcher is stepped by hand from now on."""
        was = self.mode
        if was != MANUAL:
            self.mode = MANUAL
            found = self.driver
            self._found = None
            if found is not None:
                self._manual_opt = weakref.ref(found)
            w.set_amp_optimizer(None)  # a skipped step now waits for watcher.step()
        if was == OPTIMIZER and self.confirmable:
            self.confirmable = False
            return False
        return True

    def step_by_hand(self, w: StepEngine) -> None:
        """``watcher.step()``: end the step in progress (unless it only confirms the step
        the found driver just ended, or the watcher is closed)."""
        if w.closed or not self.manual_step(w):
            return
        early = self.take_early_grads(w)
        if w.amp is not None and w.amp.take_pending_skip():
            w.end_step(skipped=True)
            return
        if not early:  # else: read at an optimizer step of this step, still current
            w.read_grads(None, merge=False)
        w.end_step()

    def commit_unstepped(self, w: StepEngine) -> None:
        """At close: the model ran forward but no step ever ended. Commit what was
        collected as one step (it is written as one window) and say how to step."""
        if w.step or not w.collector.order:
            return
        w.read_grads(None, merge=False)
        w.end_step()
        warn_usage(self.no_step_message(self.forwards)
                   + "; what was collected is written as one step", stacklevel=5)

    def take_early_grads(self, w: StepEngine) -> bool:
        """At ``watcher.step()``: whether the gradients read at optimizer steps of this step
        stand (no training forward of the model came after them)."""
        at, self._grads_at = self._grads_at, None
        self._count(w)
        return at is not None and at == (self._at_step, self._since)

    # -- forward passes -----------------------------------------------------------------------
    def _count(self, w: StepEngine) -> None:
        """Start the counts over when a step ended since they were last looked at."""
        if w.step != self._at_step:
            self._at_step = w.step
            self._since = self._others = self._unwatched = 0
            self._other_names.clear()

    def forward(self) -> None:
        w = self._engine()
        if w is None or w.closed:
            return
        self._count(w)
        self._since += 1
        self.forwards += 1
        self.confirmable = False
        if self._since == TRAINING_FORWARDS_WITHOUT_STEP and not self._warned:
            self._warned = True
            warn_usage(self.no_step_message(self._since), stacklevel=7)

    def no_step_message(self, forwards: int) -> str:
        """What is wrong when forward passes go by without a step, and what to do."""
        head = f"gradwatch: {forwards} training forward pass(es) of the watched model"
        if self.mode == MANUAL:
            return (f"{head} since the last watcher.step(): the watcher is stepped by hand "
                    "(watcher.step() was called); call it once per training step")
        if self.mode == OPTIMIZER:
            drv = self.driver
            msg = (f"{head} and no step of the optimizer given to watch(), {_name(drv)}"
                   if self.explicit is not None else
                   f"{head} and no step of the optimizer found earlier" if drv is None else
                   f"{head} and no step of the optimizer found, {_name(drv)}")
            msg += " since the last step"
            if self._others:
                msg += (f"; {', '.join(sorted(self._other_names))} stepped watched "
                        f"parameters {self._others} time(s) meanwhile: was the optimizer "
                        "replaced by a new one? Pass the new one to watch(), or leave "
                        "optimizer= out and gradwatch finds it")
            return msg
        msg = (f"{head} and no training step: no optimizer step() updated a parameter of "
               "the watched model and watcher.step() was not called")
        if self._unwatched:
            msg += (f" ({self._unwatched} optimizer step(s) updated only parameters of "
                    "other models: was the optimizer made for another copy of the model?)")
        return (msg + ". Step an optimizer made with this model's parameters, pass it as "
                "watch(optimizer=...), or call watcher.step() once per training step")

    def fail(self, stage: str, e: Exception) -> None:
        """An internal failure in a hook: reported once, the hooks turn inert."""
        self._guard.fail(OFF, stage, "*", e)
