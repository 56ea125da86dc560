"""Nothing lost at process exit: open watchers are flushed and closed at interpreter exit
(``atexit``) and on SIGTERM.

The registry is process-wide by nature (there is one interpreter exit and one SIGTERM
disposition per process). It holds watchers weakly, so it never keeps one alive. The SIGTERM
handler is installed from the main thread only, while at least one watcher is open; it closes
the open watchers, then hands the signal on to the handler that was installed before it (or
to the default action: the process ends by SIGTERM, as it would have without gradwatch). When
the last watcher closes, the previous handler is put back unless someone replaced ours since.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
import weakref
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from gradwatch.worker import Worker


class Closable(Protocol):
    """What the exit, the model's attachment and the garbage collector need of a watcher."""

    @property
    def _closed(self) -> bool: ...

    def close(self) -> None: ...

    def _close_at_exit(self, budget: float | None = None, wait: bool = True) -> None: ...


_open: weakref.WeakSet[Closable] = weakref.WeakSet()
# background threads still writing the last window of a watcher closed where nobody could
# wait for them (collected by the garbage collector on a gradwatch thread): waited for at exit
_draining: weakref.WeakSet[Worker] = weakref.WeakSet()
# re-entrant: the SIGTERM handler runs on the main thread, possibly inside register()
_lock = threading.RLock()
# "handler": the SIGTERM handler gradwatch installed last (None: none in place)
_state: dict[str, Any] = {"atexit": False, "handler": None, "pid": os.getpid()}
# At exit, the most seconds spent closing one watcher: a stuck background thread (say, the
# signal came while the training thread held a lock it needs) must not hang the exit.
EXIT_BUDGET = 15.0


def register(w: Closable) -> None:
    """Called when a watcher opens."""
    with _lock:
        if _state["pid"] != os.getpid():  # a forked child: start from an empty registry
            _open.clear()
            _state.update(handler=None, pid=os.getpid())
        _open.add(w)
        if not _state["atexit"]:
            atexit.register(_at_exit)
            _state["atexit"] = True
    _install()


def unregister(w: Closable) -> None:
    """Called when a watcher closes."""
    with _lock:
        _open.discard(w)
        empty = len(_open) == 0
    if empty:
        _restore()


def drain(worker: Worker) -> None:
    """A closed watcher's background thread still has its last window to write."""
    with _lock:
        _draining.add(worker)


def close_all() -> None:
    """Flush and close every open watcher, and wait for the background threads of closed
    ones still writing; never raises (used at exit).

    Only in the process that opened them: a forked child (a DataLoader worker) holds copies
    of the parent's watchers, and must not write into the parent's logs."""
    with _lock:
        mine = _state["pid"] == os.getpid()
        watchers = list(_open) if mine else []
        workers = list(_draining) if mine else []
    for w in watchers:
        try:
            w._close_at_exit(EXIT_BUDGET)
        except Exception:  # noqa: BLE001 - at exit, a failure must not hide the others
            pass
    for wk in workers:
        wk.join(EXIT_BUDGET)


def _at_exit() -> None:
    close_all()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class SigtermHandler:
    """Closes the open watchers, then hands the signal on to ``previous``.

    One per installation, each with its own ``previous``: should a handler installed later
    by the user chain back to an earlier one of ours, the chain still ends."""

    def __init__(self, previous: Any) -> None:
        self.previous = previous

    def __call__(self, signum: int, frame: Any) -> None:
        close_all()  # the last close puts ``previous`` back in place
        _chain(self.previous, signum, frame)


def _install() -> None:
    if not _main_thread():
        return
    try:
        current = signal.getsignal(signal.SIGTERM)
        if current is not None and current is _state["handler"]:
            return  # ours is in place
        handler = SigtermHandler(current)
        signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError, AttributeError):  # not the main interpreter, no SIGTERM
        return
    _state["handler"] = handler


def _restore() -> None:
    handler: SigtermHandler | None = _state["handler"]
    if handler is None or not _main_thread():
        return
    previous = handler.previous
    try:
        if signal.getsignal(signal.SIGTERM) is handler:  # else: replaced since, leave it
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    except (ValueError, OSError):
        return
    _state["handler"] = None


def _chain(previous: Any, signum: int, frame: Any) -> None:
    if previous is signal.SIG_IGN:
        return
    if callable(previous):
        previous(signum, frame)
        return
    # SIG_DFL, or a handler installed outside Python: end the process the default way
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
