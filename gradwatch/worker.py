"""The background thread that runs the rules and the sinks off the training thread."""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable


class WorkerThread(threading.Thread):
    """The thread of a ``Worker`` (a class of its own: code that may run on it, such as a
    finalizer called by the garbage collector, can tell and never wait for itself)."""


class Worker:
    """A single daemon thread running submitted jobs in order.

    ``on_error(exc)`` is called (on the worker thread) when a job raises; the worker keeps
    running, so one bad window never stops the next ones.
    """

    def __init__(self, on_error: Callable[[BaseException], None]) -> None:
        self._q: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._on_error = on_error
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()  # re-entrant: see Watcher._lock

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                thread = WorkerThread(target=self._run, name="gradwatch-worker",
                                      daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # interpreter shutting down: no new threads
                    self._run_inline(job)
                    return
                self._thread = thread
        self._q.put(job)

    def _run_inline(self, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as e:  # noqa: BLE001 - reported, never propagated
            try:
                self._on_error(e)
            except Exception:
                pass

    def join(self, timeout: float | None = None) -> bool:
        """Wait until every submitted job has run; False if ``timeout`` ran out first."""
        if self._thread is None or not self._thread.is_alive():
            return True
        if timeout is None:
            self._q.join()
            return True
        deadline = time.monotonic() + timeout
        with self._q.all_tasks_done:
            while self._q.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._q.all_tasks_done.wait(left)
        return True

    @staticmethod
    def on_worker_thread() -> bool:
        """True on the thread of any ``Worker`` (joining from there could wait for itself)."""
        return isinstance(threading.current_thread(), WorkerThread)

    def stop_later(self) -> None:
        """End the thread once the jobs queued so far have run; waits for nothing."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                self._q.put(None)

    def close(self, timeout: float | None = None) -> None:
        t = self._thread
        if t is not None and t.is_alive():
            self._q.put(None)
            t.join(timeout)
        self._thread = None

    def _run(self) -> None:
        while True:
            job = self._q.get()
            try:
                if job is None:
                    return
                self._run_inline(job)
            finally:
                self._q.task_done()
