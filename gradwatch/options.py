"""Argument checks for ``watch()`` (``WatchConfig``): every message names the argument,
what is allowed and the value given (TypeError for a wrong type, ValueError for a bad
value); and the writer a watcher opens."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from gradwatch.alerts import OnAlert, validate_on_alert
from gradwatch.thresholds import Thresholds


def given(v: object) -> str:
    """The value given, for an error message: a short repr and its type."""
    r = repr(v)
    if len(r) > 80:
        r = r[:77] + "..."
    return f"{r} ({type(v).__name__})"


def check_int(name: str, v: object) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{name} must be an int >= 1, got {v!r}")
    if v < 1:
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    return v


def check_sample_every(v: object) -> int | None:
    """``"auto"`` (None here: the watcher derives it from ``every``) or an int >= 1."""
    if isinstance(v, str) and v == "auto":
        return None
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"sample_every must be an int >= 1 or 'auto', got {v!r}")
    if v < 1:
        raise ValueError(f"sample_every must be an int >= 1 or 'auto', got {v!r}")
    return v


def check_bool(name: str, v: object) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be True or False, got {v!r}")
    return v


def open_writer(logdir: str | os.PathLike[str] | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # pragma: no cover - tensorboard is a dependency
        raise ImportError("gradwatch needs tensorboard: pip install tensorboard") from e
    if logdir is not None:
        path = os.fspath(logdir)
        try:
            os.makedirs(path, exist_ok=True)
            probe = os.path.join(path, ".gradwatch-write-test")
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError as e:
            raise ValueError(f"logdir {path!r} cannot be written: {e}") from e
        return SummaryWriter(log_dir=path)
    return SummaryWriter()


def _model_check(model: Any, optimizer: Any, scaler: Any) -> None:
    import torch

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {given(model)}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer or None, got {given(optimizer)}"
        )
    if scaler is not None and not (hasattr(scaler, "get_scale") and hasattr(scaler, "step")):
        raise TypeError(
            f"scaler must be a torch.amp.GradScaler or None, got {given(scaler)}"
        )


@dataclass(frozen=True)
class WatchConfig:
    """The arguments of ``watch()``, each checked (``check``) before the model is touched."""

    every: int
    sample_every: int | None  # None: "auto"
    tensorboard: bool
    histograms: bool
    images: bool
    on_alert: OnAlert
    thresholds: Thresholds

    @classmethod
    def check(cls, model: Any, optimizer: Any, scaler: Any, writer: Any, logdir: Any,
              tensorboard: Any, every: Any, sample_every: Any, thresholds: Any,
              on_alert: Any, histograms: Any, images: Any) -> WatchConfig:
        """Every argument checked, in the order ``watch()`` always checked them."""
        _model_check(model, optimizer, scaler)
        every = check_int("every", every)
        k = check_sample_every(sample_every)
        tensorboard = check_bool("tensorboard", tensorboard)
        histograms = check_bool("histograms", histograms)
        images = check_bool("images", images)
        validate_on_alert(on_alert)
        t = Thresholds.coerce(thresholds)
        if logdir is not None and not isinstance(logdir, (str, os.PathLike)):
            raise TypeError(f"logdir must be a path (str or os.PathLike), got {logdir!r}")
        if writer is not None and not hasattr(writer, "add_scalar"):
            raise TypeError(
                f"writer must be a torch.utils.tensorboard.SummaryWriter, got {given(writer)}"
            )
        return cls(every, k, tensorboard, histograms, images, on_alert, t)
