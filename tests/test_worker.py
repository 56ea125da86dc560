"""The background thread's hand-over: windows close together wait for its next tick instead
of waking it one by one (``gradwatch.worker``), and nothing that reads or waits ever sees
a window still waiting."""

from __future__ import annotations

import threading
import time
import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import gradwatch
from gradwatch.worker import BATCH_SECS, Worker


def _until(cond: Any, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


class _Counted:
    """A worker whose queue counts the jobs put in from each thread (a put wakes it)."""

    def __init__(self) -> None:
        self.ran: list[int] = []
        self.errors: list[BaseException] = []
        self.worker = Worker(self.errors.append)
        self.puts: dict[str, int] = {}
        q = self.worker._q
        put = q.put

        def counted(item: Any, *a: Any, **k: Any) -> None:
            name = threading.current_thread().name
            self.puts[name] = self.puts.get(name, 0) + 1
            put(item, *a, **k)

        q.put = counted  # type: ignore[method-assign]

    def job(self, k: int) -> Any:
        return lambda: self.ran.append(k)


def test_windows_close_together_wake_the_worker_once() -> None:
    c = _Counted()
    c.worker.submit(c.job(0), later=True)  # after a quiet spell: taken at once
    assert _until(lambda: c.ran == [0], 2.0)
    for k in range(1, 21):  # 20 more within a tick: appended, no wake from this thread
        c.worker.submit(c.job(k), later=True)
    assert _until(lambda: len(c.ran) == 21)  # taken by the worker's own tick
    assert c.ran == list(range(21))
    mine = c.puts.get(threading.current_thread().name, 0)
    assert mine <= 2, c.puts  # 21 before the tick: one put per window
    assert c.puts.get("gradwatch-worker", 0) >= 19  # the tick handed them over
    # no window: after a tick that finds none the thread sleeps until a job wakes it
    assert _until(lambda: not c.worker._ticking, 4 * BATCH_SECS + 2.0)
    c.worker.close()
    assert c.errors == []


def test_join_and_other_jobs_hand_over_the_waiting_windows_in_order() -> None:
    c = _Counted()
    c.worker.submit(c.job(0), later=True)
    assert _until(lambda: c.ran == [0], 2.0)
    for k in range(1, 5):
        c.worker.submit(c.job(k), later=True)
    c.worker.submit(c.job(5))  # not a window (a per-step alert, a close): after them
    c.worker.submit(c.job(6), later=True)
    t = time.monotonic()
    assert c.worker.join(timeout=5.0)
    assert c.ran == [0, 1, 2, 3, 4, 5, 6]  # all of them, in the order submitted
    assert time.monotonic() - t < 5.0
    c.worker.submit(c.job(7), later=True)
    c.worker.close()  # hands over what waits, then ends the thread
    assert c.ran[-1] == 7
    assert c.errors == []


def test_stop_later_runs_the_waiting_windows_first() -> None:
    c = _Counted()
    c.worker.submit(c.job(0), later=True)
    assert _until(lambda: c.ran == [0], 2.0)
    c.worker.submit(c.job(1), later=True)
    thread = c.worker._thread
    assert thread is not None
    c.worker.stop_later()
    thread.join(5.0)
    assert not thread.is_alive() and c.ran == [0, 1]


def test_alerts_of_a_fast_loop_reach_the_user_during_the_loop() -> None:
    """Windows of a few milliseconds (every=2 on a tiny model) are processed a tick at a
    time: an alert still comes as a warning from a later step of the loop, no flush, and
    names the window it was found in."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    w = gradwatch.watch(m, optimizer=opt, tensorboard=False, every=2,
                        thresholds={"patience": 1})
    x, y = torch.randn(4, 8), torch.zeros(4, dtype=torch.long)
    steps, start = 0, time.monotonic()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")

        def dead() -> list[Any]:
            return [r for r in rec if issubclass(r.category, gradwatch.DeadActivationWarning)]

        while not dead() and time.monotonic() - start < 3 * BATCH_SECS + 5:
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if steps == 100:  # windows come every few ms: the worker is ticking by now
                with torch.no_grad():
                    m[0].bias.fill_(-100.0)  # every unit of ReLU '1' dead from here
            time.sleep(0.001)
        found = dead()
        latest = w.latest
        w.close()
    assert found, f"no warning in {steps} steps"
    assert "'1'" in str(found[0].message)
    first = w.alerts[0]  # the window after the units died
    assert (first.kind, first.layer, first.step) == ("dead", "1", 102)
    assert latest is not None and latest.step == steps - steps % 2
