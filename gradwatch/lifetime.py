"""How long a watcher lives: as long as its model, or until ``unwatch()``/``close()``.

The model holds its watcher strongly (an attribute of the unwrapped module), so the result
of ``watch()`` may be dropped. The watcher holds the model too; when both are dropped the
garbage collector frees the pair, and the watcher's finalizer first writes what was
collected and closes a writer it opened (``close_collected``). At interpreter exit
``shutdown`` closes the watchers still open.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from gradwatch import shutdown
from gradwatch.options import given
from gradwatch.selection import unwrap
from gradwatch.shutdown import Closable
from gradwatch.worker import Worker

ATTACH = "_gradwatch_attachment"


class Attachment:
    """Marks a model as watched and keeps its watcher alive. Pickles and deep-copies as an
    empty marker, so a copy of the model is not watched."""

    __slots__ = ("watcher",)

    def __init__(self, watcher: Closable | None = None) -> None:
        self.watcher = watcher

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (Attachment, ())


def attached(root: nn.Module) -> Closable | None:
    """The open watcher of an unwrapped model, if any."""
    att = root.__dict__.get(ATTACH)
    w = att.watcher if isinstance(att, Attachment) else None
    return w if w is not None and not w._closed else None


def attach(root: nn.Module, w: Closable) -> None:
    root.__dict__[ATTACH] = Attachment(w)


def detach(root: nn.Module, w: Closable) -> None:
    """Forget ``w`` on ``root`` (a newer watcher of the same model stays)."""
    att = root.__dict__.get(ATTACH)
    if isinstance(att, Attachment) and att.watcher is w:
        del root.__dict__[ATTACH]


def unwatch(model: nn.Module) -> None:
    """Close the watcher of ``model``: flush what was collected, remove every hook, close a
    writer the watcher opened. Nothing happens for a model that is not watched.

    ``model`` may be wrapped as for ``watch()`` (DDP, DataParallel, ``torch.compile``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {given(model)}")
    w = attached(unwrap(model))
    if w is not None:
        w.close()


def close_collected(w: Closable) -> None:
    """The watcher and its model are garbage: write and close. Never raises.

    The collector may run on any thread. On a gradwatch background thread nothing may wait
    for a background thread (it could be this one): the last window and the writer's close
    are queued, and the exit waits for them. Elsewhere the close waits, within the exit
    budget, so the data is on disk when ``gc.collect()`` returns."""
    try:
        if Worker.on_worker_thread():
            w._close_at_exit(0.0, wait=False)
        else:
            w._close_at_exit(shutdown.EXIT_BUDGET)
    except Exception:  # noqa: BLE001 - a finalizer must not raise
        pass
