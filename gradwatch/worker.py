"""The background thread that runs the rules and the sinks off the training thread.

Waking a sleeping thread costs both threads: the training thread a system call, the woken
thread a cold start (its first numpy call after a wake took 5x its warm time), and the
writer thread of TensorBoard a wake of its own per event. Windows a few tens of
milliseconds apart (``every=10`` on a small model) paid that on every window. So a window
handed over less than ``BATCH_SECS`` after the one before waits for the worker's next tick
(``submit(later=True)``): the training thread only appends it to a list, and the worker,
which keeps ticking while windows keep coming, takes every waiting one in one wake. A
window after a quiet spell is taken at once; anything that reads or waits (``join``,
``close``) and any other job hands the waiting ones over first, in order.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable

#: The longest a window waits on the training thread for the worker's next tick (seconds).
BATCH_SECS = 1.0

Job = Callable[[], None]


class WorkerThread(threading.Thread):
    """The thread of a ``Worker`` (a class of its own: code that may run on it, such as a
    finalizer called by the garbage collector, can tell and never wait for itself)."""


class Worker:
    """A single daemon thread running submitted jobs in order.

    ``on_error(exc)`` is called (on the worker thread) when a job raises; the worker keeps
    running, so one bad window never stops the next ones.
    """

    def __init__(self, on_error: Callable[[BaseException], None]) -> None:
        self._q: queue.Queue[Job | None] = queue.Queue()
        self._on_error = on_error
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()  # re-entrant: see Watcher._lock
        self._later: list[Job] = []  # jobs waiting for the next tick, in order
        self._ticking = False  # the worker takes ``_later`` every BATCH_SECS

    def submit(self, job: Job, later: bool = False) -> None:
        """Queue ``job``; ``later``: it may wait for the worker's next tick (at most
        ``BATCH_SECS``) if the worker is already ticking."""
        with self._lock:
            self._later.append(job)  # behind the ones waiting: jobs run in submission order
            if self._thread is None or not self._thread.is_alive():
                thread = WorkerThread(target=self._run, name="gradwatch-worker",
                                      daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # interpreter shutting down: no new threads
                    jobs, self._later = self._later, []
                    for j in jobs:
                        self._run_inline(j)
                    return
                self._thread = thread
                self._ticking = False
            if later:
                if self._ticking:
                    return  # taken at the worker's next tick
                self._ticking = True
            self._hand_over()

    def _hand_over(self) -> None:
        """(Under ``_lock``.) The jobs waiting for a tick into the queue."""
        for j in self._later:
            self._q.put(j)
        self._later.clear()

    def _run_inline(self, job: Job) -> None:
        try:
            job()
        except BaseException as e:  # noqa: BLE001 - reported, never propagated
            try:
                self._on_error(e)
            except Exception:
                pass

    def join(self, timeout: float | None = None) -> bool:
        """Wait until every submitted job has run, the ones waiting for a tick included;
        False if ``timeout`` ran out first."""
        with self._lock:
            self._hand_over()
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
        """End the thread once the jobs submitted so far have run; waits for nothing."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                self._hand_over()
                self._q.put(None)

    def close(self, timeout: float | None = None) -> None:
        t = self._thread
        if t is not None and t.is_alive():
            with self._lock:
                self._hand_over()
                self._q.put(None)
            t.join(timeout)
        self._thread = None

    def _run(self) -> None:
        while True:
            try:  # ticking: wake every BATCH_SECS for the jobs that waited
                job = self._q.get(timeout=BATCH_SECS if self._ticking else None)
            except queue.Empty:
                with self._lock:
                    if self._later:
                        self._hand_over()
                    else:  # nothing came in a tick: sleep until a job wakes the thread
                        self._ticking = False
                continue
            try:
                if job is None:
                    return
                self._run_inline(job)
            finally:
                self._q.task_done()
