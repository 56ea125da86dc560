"""Argument checks for ``watch()``: every message names the argument, what is allowed
and the value given (TypeError for a wrong type, ValueError for a bad value)."""

from __future__ import annotations

import os
from typing import Any


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
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"logdir {path!r} is a file: give a directory for the runs")
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
