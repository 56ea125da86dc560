"""Alerts and how they reach the user: warnings, an exception, a logger or a callable."""

from __future__ import annotations

import logging
import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import (
    Callable,
    Generic,
    Hashable,
    Iterable,
    Protocol,
    Sequence,
    TypeVar,
    Union,
)

# the record, the kinds and the number format live in the torch-free schema; re-exported here
from gradwatch.schema import KINDS as KINDS
from gradwatch.schema import Alert as Alert
from gradwatch.schema import fmt as fmt

ON_ALERT = ("warn", "raise", "log", "ignore")

logger = logging.getLogger("gradwatch")


#: ``Alert.cause``: why, from measured evidence (API.md, "Alerts"); "unknown" when the
#: evidence supports none of the others.
CAUSES = ("init_scale", "recurrent_gain", "learning_rate", "bias_shift", "forward_op",
          "backward_op", "parameters", "input", "unknown")


class GradwatchWarning(RuntimeWarning):
    """Base class of every warning gradwatch issues."""


class VanishingGradientWarning(GradwatchWarning):
    pass


class ExplodingGradientWarning(GradwatchWarning):
    pass


class NonFiniteWarning(GradwatchWarning):
    pass


class DeadActivationWarning(GradwatchWarning):
    pass


class SaturationWarning(GradwatchWarning):
    pass


WARNING_FOR: dict[str, type[GradwatchWarning]] = {
    "vanishing": VanishingGradientWarning,
    "exploding": ExplodingGradientWarning,
    "nonfinite": NonFiniteWarning,
    "dead": DeadActivationWarning,
    "saturated": SaturationWarning,
}


class GradientAlertError(RuntimeError):
    """Raised by ``step()``/``flush()`` under ``on_alert="raise"``; carries the ``alert``."""

    def __init__(self, alert: Alert) -> None:
        super().__init__(describe(Group(alert.kind, alert.cause, [alert])))
        self.alert = alert


OnAlert = Union[str, Callable[[Alert], None]]


def validate_on_alert(on_alert: object) -> None:
    if callable(on_alert):
        return
    if not isinstance(on_alert, str):
        raise TypeError(
            f"on_alert must be one of {ON_ALERT} or a callable(Alert), got {on_alert!r}"
        )
    if on_alert not in ON_ALERT:
        raise ValueError(
            f"on_alert must be one of {ON_ALERT} or a callable(Alert), got {on_alert!r}"
        )


def warn_at_caller(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the user's line (the first frame outside gradwatch
    and torch), without a per-module registry: every alert message is unique (it names
    the step), so the registry ``warnings.warn`` keeps would grow for the whole run. The
    rules already rate-limit, so nothing needs de-duplicating here."""
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_globals.get("__name__", "").split(".")[0] in (
        "gradwatch", "torch"
    ):
        frame = frame.f_back
    warnings.warn_explicit(
        message,
        category,
        frame.f_code.co_filename,
        frame.f_lineno,
        module=frame.f_globals.get("__name__"),
        registry=None,
        module_globals=frame.f_globals,
    )


def deliver(alert: Alert, on_alert: OnAlert) -> None:
    """Hand one alert to the user, on the training thread."""
    if callable(on_alert):
        on_alert(alert)
    elif on_alert == "raise":
        raise GradientAlertError(alert)
    else:
        deliver_grouped([alert], on_alert)


def one_by_one(on_alert: OnAlert) -> bool:
    """A callable gets every alert and "raise" raises the first: those are delivered one
    alert at a time; warnings and log lines are grouped (``deliver_grouped``)."""
    return callable(on_alert) or on_alert == "raise"


def deliver_grouped(alerts: Sequence[Alert], on_alert: OnAlert) -> None:
    """One warning (or log line) per window (or step), kind and cause, led by the worst
    layer, naming the others and carrying the worst layer's hint."""
    if on_alert not in ("warn", "log"):
        return
    for g in group(alerts, lambda a: (a.step, a.kind, a.cause)):
        text = describe(g)
        if on_alert == "warn":
            warn_at_caller(text, WARNING_FOR[g.kind])
        else:
            logger.warning(text)


# -- grouping: many layers with one kind and cause read as one finding ------------------------
class AlertLike(Protocol):
    """What grouping reads: an ``Alert``, or an alert read back from a log."""

    @property
    def step(self) -> int: ...
    @property
    def layer(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def value(self) -> float: ...
    @property
    def threshold(self) -> float: ...
    @property
    def cause(self) -> str: ...
    @property
    def hint(self) -> str: ...


A_ = TypeVar("A_", bound=AlertLike)


def severity(a: AlertLike) -> float:
    """How far past its threshold an alert is (a ratio, larger is worse); a non-finite
    alert is ranked by arrival (the first is the origin)."""
    if a.kind == "nonfinite":
        return 0.0
    if a.kind == "vanishing":
        return a.threshold / a.value if a.value > 0 else math.inf
    return a.value / a.threshold if a.threshold > 0 else a.value


@dataclass
class Group(Generic[A_]):
    """Alerts of one kind and cause (in arrival order, which is forward order within a
    window)."""

    kind: str
    cause: str
    alerts: list[A_] = field(default_factory=list)

    @property
    def worst(self) -> A_:
        return max(self.alerts, key=severity)  # the first of equals (max keeps it)

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(a.layer for a in self.alerts))


def group(alerts: Iterable[A_], key: Callable[[A_], Hashable]) -> list[Group[A_]]:
    """Alerts grouped by ``key`` (it must fix kind and cause), in order of first arrival."""
    out: dict[Hashable, Group[A_]] = {}
    for a in alerts:
        k = key(a)
        if k not in out:
            out[k] = Group(a.kind, a.cause)
        out[k].alerts.append(a)
    return list(out.values())


def layer_list(names: Sequence[str], most: int = 4) -> str:
    """'a', 'b', 'c' for a few names; the first and the last of many ('0' .. '16')."""
    if len(names) <= most:
        return ", ".join(f"'{n}'" for n in names)
    return f"'{names[0]}' .. '{names[-1]}'"


def describe(g: Group[Alert]) -> str:
    """The text of a group: the worst alert's message, the other layers with the count,
    then the cause and the worst layer's hint."""
    w = g.worst
    names = g.layers
    text = w.message
    if len(names) > 1:
        text += f" [{len(names)} layers: {layer_list(names)}]"
    why = f"cause {w.cause}: {w.hint}" if w.hint else f"cause {w.cause}"
    return f"{text}\n  {why}"
