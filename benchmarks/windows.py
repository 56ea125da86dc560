"""What a window costs each thread in a loop that keeps running, with the windows handed to
the background thread a tick at a time (``gradwatch.worker``: a window that follows the one
before within ``BATCH_SECS`` waits for the worker's next tick) or one by one (every window
wakes it, as before that change; ``Worker.submit(later=False)`` forced).

Two watchers of ``watch(every=...)`` on two copies of the workload in one process, one
thread, past their dense first 100 steps; runs of ``--steps`` steps of each in turn
(rounds, in a shuffled order), long enough for the ticks to gather windows as in a training
loop (``interleaved.py`` cuts runs of 20 steps, two ``every=10`` windows). Per run:
the training thread's CPU per step, and per window the CPU of gradwatch's writer thread
(rules, snapshot, the window's event) and of TensorBoard's writer thread, read from their
own clocks at the start of each run of that watcher (what a thread did between two runs
counts in the next), and the training thread's part of the flush (``launch_flush``).
Medians over rounds.

    python benchmarks/windows.py --workload deep10 --every 10 --steps 400 --rounds 12
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from _common import WORKLOADS  # noqa: E402
from interleaved import step, worker_clock  # noqa: E402

MODES = ("one by one", "a tick at a time")


def build(workload: str, every: int, logdir: str, one_by_one: bool,
          flushes: list[float]) -> tuple[Any, ...]:
    """A run as ``interleaved.step`` takes it; ``flushes`` gets the training thread's CPU
    seconds of each of its flushes."""
    import gradwatch

    torch.manual_seed(0)
    model, x, y, lossf = WORKLOADS[workload]()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    w = gradwatch.watch(model, optimizer=opt, logdir=logdir, every=every)
    if one_by_one:
        worker = w._publish.worker
        submit = worker.submit
        worker.submit = lambda job, later=False: submit(job, False)
    engine = w._engine
    launch = engine.launch_flush

    def timed(force: bool = False) -> None:
        t = time.thread_time()
        launch(force)
        flushes.append(time.thread_time() - t)

    engine.launch_flush = timed
    return model, x, y, lossf, opt, w


def threads(run: tuple[Any, ...]) -> tuple[float, float]:
    """CPU seconds so far of gradwatch's writer thread and of TensorBoard's."""
    w = run[5]
    total = worker_clock((w,))
    t = w._publish.worker._thread
    mine = (time.clock_gettime(time.pthread_getcpuclockid(t.ident))
            if t is not None and t.ident is not None and t.is_alive() else 0.0)
    return mine, total - mine


def measure(workload: str, every: int, steps: int, rounds: int, seed: int) -> dict[str, Any]:
    import tempfile

    torch.set_num_threads(1)
    random.seed(seed)
    logdir = tempfile.mkdtemp(prefix="gradwatch-windows-")
    flushes: dict[str, list[float]] = {m: [] for m in MODES}
    runs = {m: build(workload, every, os.path.join(logdir, str(k)), m == MODES[0],
                     flushes[m]) for k, m in enumerate(MODES)}
    for run in runs.values():
        for _ in range(110 + every - 110 % every):  # past the dense start, on a window's end
            step(run)
    gc.collect()
    gc.freeze()
    seen = {m: threads(r) for m, r in runs.items()}
    per: dict[str, dict[str, list[float]]] = {
        m: {"train": [], "writer": [], "tensorboard": [], "flush": []} for m in MODES}
    order = list(MODES)
    try:
        for _ in range(rounds):
            random.shuffle(order)
            for m in order:
                run = runs[m]
                flushes[m].clear()
                t = time.thread_time()
                for _ in range(steps):
                    step(run)
                spent = time.thread_time() - t
                now = threads(run)
                windows = steps / every
                per[m]["train"].append(1e3 * spent / steps)
                per[m]["writer"].append(1e3 * (now[0] - seen[m][0]) / windows)
                per[m]["tensorboard"].append(1e3 * (now[1] - seen[m][1]) / windows)
                per[m]["flush"].append(1e6 * statistics.median(flushes[m]))
                seen[m] = now
    finally:
        gc.unfreeze()
        for run in runs.values():
            run[5].close()
    return {m: {k: statistics.median(v) for k, v in d.items()} for m, d in per.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="deep10", choices=sorted(WORKLOADS))
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--steps", type=int, default=400, help="steps of each run")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    res = measure(a.workload, a.every, a.steps, a.rounds, a.seed)
    print(f"{a.workload}, every={a.every}, {a.rounds} rounds of {a.steps} steps of each, one "
          "thread (medians over rounds)")
    print(f"{'windows handed over':22s}{'train ms/step':>15s}{'flush µs':>10s}"
          f"{'writer ms/window':>18s}{'TensorBoard ms/window':>23s}{'background/step':>17s}")
    for m in MODES:
        r = res[m]
        bg = (r["writer"] + r["tensorboard"]) / a.every / r["train"]
        print(f"{m:22s}{r['train']:15.3f}{r['flush']:10.1f}{r['writer']:18.3f}"
              f"{r['tensorboard']:23.3f}{bg:17.4f}")


if __name__ == "__main__":
    main()
