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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradwatch.watcher import Watcher

_open: weakref.WeakSet[Watcher] = weakref.WeakSet()
# re-entrant: the SIGTERM handler runs on the main thread, possibly inside register()
_lock = threading.RLock()
_state: dict[str, Any] = {"atexit": False, "installed": False, "previous": None,
                          "pid": os.getpid()}
# At exit, the most seconds spent closing one watcher: a stuck background thread (say, the
# signal came while the training thread held a lock it needs) must not hang the exit.
EXIT_BUDGET = 15.0


def register(w: Watcher) -> None:
    """Called when a watcher opens."""
    with _lock:
        if _state["pid"] != os.getpid():  # a forked child: start from an empty registry
            _open.clear()
            _state.update(installed=False, previous=None, pid=os.getpid())
        _open.add(w)
        if not _state["atexit"]:
            atexit.register(_at_exit)
            _state["atexit"] = True
    _install()


def unregister(w: Watcher) -> None:
    """Called when a watcher closes."""
    with _lock:
        _open.discard(w)
        empty = len(_open) == 0
    if empty:
        _restore()


def close_all() -> None:
    """Flush and close every open watcher; never raises (used at exit).

    Only in the process that opened them: a forked child (a DataLoader worker) holds copies
    of the parent's watchers, and must not write into the parent's logs."""
    with _lock:
        watchers = list(_open) if _state["pid"] == os.getpid() else []
    for w in watchers:
        try:
            w._close_at_exit(EXIT_BUDGET)
        except Exception:  # noqa: BLE001 - at exit, a failure must not hide the others
            pass


def _at_exit() -> None:
    close_all()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _install() -> None:
    if _state["installed"] or not _main_thread():
        return
    try:
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError, AttributeError):  # not the main interpreter, no SIGTERM
        return
    _state["previous"] = previous
    _state["installed"] = True


def _restore() -> None:
    if not _state["installed"] or not _main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:
            previous = _state["previous"]
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    except (ValueError, OSError):
        return
    _state["installed"] = False
    _state["previous"] = None


def _on_sigterm(signum: int, frame: Any) -> None:
    previous = _state["previous"]
    close_all()  # the last close puts ``previous`` back in place
    _chain(previous, signum, frame)


def _chain(previous: Any, signum: int, frame: Any) -> None:
    if previous is signal.SIG_IGN:
        return
    if callable(previous) and previous is not _on_sigterm:
        previous(signum, frame)
        return
    # SIG_DFL, or a handler installed outside Python: end the process the default way
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
