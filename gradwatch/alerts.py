"""Alerts and how they reach the user: warnings, an exception, a logger or a callable."""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Union

KINDS = ("vanishing", "exploding", "nonfinite", "dead", "saturated")
ON_ALERT = ("warn", "raise", "log", "ignore")

logger = logging.getLogger("gradwatch")


#: ``Alert.cause``: why, from measured evidence (API.md, "Alerts"); "unknown" when the
#: evidence supports none of the others.
CAUSES = ("init_scale", "recurrent_gain", "learning_rate", "bias_shift", "forward_op",
          "backward_op", "parameters", "input", "unknown")


@dataclass(frozen=True)
class Alert:
    """One finding of the rules: ``kind`` at ``layer`` on ``stat`` at training ``step``.

    ``cause`` (one of ``CAUSES``) says why, from evidence the watcher measured; ``hint`` is
    one or two sentences with that evidence in numbers and what to try ("" when none)."""

    step: int
    layer: str
    kind: str
    stat: str
    value: float
    threshold: float
    message: str
    cause: str = "unknown"
    hint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
        super().__init__(alert.message)
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
    elif on_alert == "warn":
        warn_at_caller(alert.message, WARNING_FOR[alert.kind])
    elif on_alert == "raise":
        raise GradientAlertError(alert)
    elif on_alert == "log":
        logger.warning(alert.message)
