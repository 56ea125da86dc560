"""Variants of one workload in one process, a training step of each in turn: where a step's
time goes (forward, backward, optimizer step), and the ratio of each variant to the first.

``modules.py`` runs each (variant, workload) in a process of its own; on a shared machine
two processes minutes apart can differ by several hundredths, more than a change of the
light step's fixed cost moves a ratio. Here every variant has a model of its own (same
seed, same batch) in one process and one thread, and each round runs one step of every
variant in a shuffled order, so that what slows the machine slows all of them alike; the
median of each phase over the rounds is reported. Variants: ``bare``, ``floor`` and
``floor_sampled`` (``_common.Floor``), ``light``, ``sampled``, ``default`` and ``every10``
(``_common.watch_as``; the last two measured past their dense first 100 steps, so their
medians are of light steps: their sampled steps, one in 10, are in ``modules.py``).

``--whole`` measures whole periods instead: blocks of 100 steps of each variant (one
default window: its flush and its 10 sampled steps; ten ``every=10`` windows), made of runs
of 20 consecutive steps of one variant, the variants' runs in a shuffled order. A block's
cost is the CPU time of the training thread in its steps plus the CPU time the variant's
background threads (its flush: gradwatch's writer with the rules and the event, and
TensorBoard's thread writing the records to the file) spent since the variant's run before,
read from their own clocks without waiting for them (a loop does not wait: a window still
being written counts in the variant's next run). The ratio of each block to the first
variant's block of the same round, median over rounds: the cost of the default and of
``every=10`` in steady state, everything included, side by side. (Runs, not single steps in
turn: a model that does not fit the cache beside the others' was slowed alike in every
variant, which shrinks every ratio -- deep100's floor step took 1.5x longer so; not whole
blocks in turn either: the machine's speed drifts over the seconds a block takes, which
moved a block's ratio by up to 0.07. What is left of the first: the first two steps of a
run find a cold cache, about 5 ms more per run of 20 steps of the 10-layer model (5% of the
run; 0.5% at 1,000 layers), paid by every variant alike, which shrinks an excess over the
floor by as much.)

``--hooks`` also times the optimizer-step hooks themselves: gradwatch's (torch's global
pre- and post-step hooks, ``gradwatch.stepping``) and the floor's pre-step hook, per step.

One bias, small and against the floor: a watcher's optimizer hooks are torch's global ones,
so they also see the other variants' optimizers (and return at once: 10-30 µs per step
here, added to the bare and floor steps; ``--hooks`` shows it in the floor's row).

    python benchmarks/interleaved.py --workload deep10 --variants floor,light,bare
    python benchmarks/interleaved.py --workload mlp --variants floor_sampled,sampled --steps 200
    python benchmarks/interleaved.py --workload deep100 --variants floor,default,every10 --whole 5
    python benchmarks/interleaved.py --table      # every workload, --whole, into RESULTS.md
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from _common import WORKLOADS, Floor, watch_as  # noqa: E402

VARIANTS = ("bare", "floor", "floor_sampled", "light", "sampled", "default", "every10")
#: The steps a ``default`` or ``every10`` watcher samples before its steady state.
DENSE_START = 110
PHASES = ("forward", "backward", "optimizer step", "step")
HOOKS = ("gradwatch pre-step", "gradwatch post-step", "floor pre-step")
_spent = dict.fromkeys(HOOKS, 0.0)  # seconds in each hook during the step being timed


def time_hooks() -> None:
    """Wrap the optimizer-step hooks with timers adding into ``_spent``."""
    import gradwatch.stepping as stepping

    def timed(fn: Any, name: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                key = name(args[0]) if callable(name) else name
                _spent[key] += time.perf_counter() - t
        return run

    hook = stepping._GlobalStepHook
    hook.__call__ = timed(hook.__call__, lambda h: HOOKS[1] if h._post else HOOKS[0])
    Floor._pre_step = timed(Floor._pre_step, HOOKS[2])


def build(variant: str, workload: str, logdir: str) -> tuple[Any, ...]:
    torch.manual_seed(0)
    model, x, y, lossf = WORKLOADS[workload]()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    keep: Any = None
    if variant.startswith("floor"):
        keep = Floor(model, opt, sampled=variant == "floor_sampled")
    elif variant != "bare":
        keep = watch_as(variant, model, opt, logdir)
    return model, x, y, lossf, opt, keep


def step(run: tuple[Any, ...]) -> tuple[float, ...]:
    """One training step as a user writes it; seconds of each phase and of the whole, then
    of each hook (``HOOKS``; 0 unless ``time_hooks`` ran)."""
    model, x, y, lossf, opt, _ = run
    clock = time.perf_counter
    for k in _spent:
        _spent[k] = 0.0
    a = clock()
    opt.zero_grad(set_to_none=True)
    loss = lossf(model(x), y)
    b = clock()
    loss.backward()
    c = clock()
    opt.step()
    d = clock()
    return (b - a, c - b, d - c, d - a, *_spent.values())


def ready(workload: str, variants: list[str], warmup: int, dense: int,
          seed: int) -> dict[str, tuple[Any, ...]]:
    """A run of each variant (one thread), past ``warmup`` steps, and past ``dense`` for
    ``default`` and ``every10`` (their densely sampled start); the heap collected, then
    frozen (``gc.freeze``, undone when the measure ends): the collector's full passes leave
    out what was made before the measure. This process holds a model per variant (four
    1,000-layer models), and a full pass over all of them took about 100 ms, landing in
    whichever variant's step set it off (about one in 100 steps at 1,000 layers): up to 0.02
    on a block's ratio, none of it any variant's own. What each variant allocates while it
    runs is still collected, in its steps, young passes and full ones."""
    torch.set_num_threads(1)
    random.seed(seed)
    logdir = tempfile.mkdtemp(prefix="gradwatch-interleaved-")
    runs = {v: build(v, workload, logdir) for v in variants}
    for v, run in runs.items():
        for _ in range(max(warmup, dense) if v in ("default", "every10") else warmup):
            step(run)
    gc.collect()
    gc.freeze()
    return runs


def measure(workload: str, variants: list[str], steps: int, warmup: int,
            seed: int) -> dict[str, list[float]]:
    """Median seconds per phase (``PHASES``) of each variant."""
    runs = ready(workload, variants, warmup, DENSE_START, seed)
    times: dict[str, list[tuple[float, ...]]] = {v: [] for v in variants}
    order = list(variants)
    try:
        for _ in range(steps):
            random.shuffle(order)
            for v in order:
                times[v].append(step(runs[v]))
    finally:
        gc.unfreeze()  # the runs can go when this returns
    return {v: [statistics.median(t[k] for t in ts) for k in range(len(PHASES) + len(HOOKS))]
            for v, ts in times.items()}


#: Steps of each variant in a ``--whole`` block: one default window, ten ``every=10`` ones;
#: run ``SEGMENT`` consecutive steps of a variant at a time.
BLOCK = 100
SEGMENT = 20


def worker_clock(run: tuple[Any, ...]) -> float:
    """CPU seconds the run's background threads have spent so far (0 without any):
    gradwatch's writer thread (rules, the window's event) and TensorBoard's own thread that
    writes the records to the file. Read as they are, waiting for nothing, as a training
    loop never waits for them: ``measure_whole`` counts each read's growth since the
    variant's read before, so what a thread does between two runs of its variant counts in
    the next one."""
    watcher = run[-1]
    worker = getattr(getattr(watcher, "_publish", None), "worker", None)
    if worker is None:
        return 0.0
    threads = [worker._thread]
    file_writer = getattr(getattr(getattr(watcher, "_sink", None), "writer", None),
                          "file_writer", None)
    async_writer = getattr(getattr(file_writer, "event_writer", None), "_async_writer", None)
    threads.append(getattr(async_writer, "_worker", None))
    return sum(time.clock_gettime(time.pthread_getcpuclockid(t.ident)) for t in threads
               if t is not None and t.ident is not None and t.is_alive())


def measure_whole(workload: str, variants: list[str], blocks: int, warmup: int,
                  seed: int) -> dict[str, list[float]]:
    """CPU seconds of each variant per ``BLOCK`` steps, one value per round: the training
    thread's time in every step (``time.thread_time``) plus its background threads'."""
    # past the dense start to a multiple of BLOCK: every block starts a window alike
    runs = ready(workload, variants, warmup, DENSE_START + BLOCK - DENSE_START % BLOCK, seed)
    totals: dict[str, list[float]] = {v: [] for v in variants}
    order = list(variants)
    clock = time.thread_time
    seen = {v: worker_clock(runs[v]) for v in variants}  # background CPU counted so far
    try:
        for _ in range(blocks):
            spent = dict.fromkeys(variants, 0.0)
            for _ in range(BLOCK // SEGMENT):
                random.shuffle(order)
                for v in order:  # a run of consecutive steps of one variant: cache warm
                    run = runs[v]
                    for _ in range(SEGMENT):
                        t = clock()
                        step(run)
                        spent[v] += clock() - t
                    now = worker_clock(run)
                    spent[v] += now - seen[v]
                    seen[v] = now
            for v in variants:
                totals[v].append(spent[v])
    finally:
        gc.unfreeze()  # the runs can go when this returns
    return totals


def main_whole(a: argparse.Namespace, variants: list[str]) -> None:
    totals = measure_whole(a.workload, variants, a.whole, a.warmup, a.seed)
    ref = totals[variants[0]]
    print(f"{a.workload}, {a.whole} blocks of {BLOCK} steps of each variant in runs of "
          f"{SEGMENT}, one thread (CPU ms per step, training thread and background writer; "
          f"ratio to {variants[0]}'s block: median, min-max)")
    print(f"{'variant':14s}{'ms/step':>10s}{'ratio':>8s}{'range':>14s}")
    for v in variants:
        r = sorted(t / f for t, f in zip(totals[v], ref))
        print(f"{v:14s}{1e3 * statistics.median(totals[v]) / BLOCK:10.3f}"
              f"{statistics.median(r):8.3f}{f'{r[0]:.3f}-{r[-1]:.3f}':>14s}")


#: ``--table``: the variants, and the blocks per workload: at most 3 where a step is slow;
#: 2-9x ``--whole`` on the chains, whose blocks take 1-6 s and whose ratios spread most
#: (a fixed cost per step or per window is the largest part of their short steps; deep10's
#: blocks, 2 s each, spread over +-0.08: 81 of them put its medians within about 0.005)
TABLE_VARIANTS = ("floor", "light", "default", "every10")
TABLE_BLOCKS = {"transformer": 3, "gpt2": 3}
TABLE_MORE = {"deep10": 9, "deep100": 3, "deep1000": 2}


def table(blocks: int, seed: int, out: str | None) -> dict[str, Any]:
    """``--whole`` for every workload: per workload and variant the median ratio to the
    floor over blocks, its range and the CPU ms per step; written as the ``interleaved``
    section of ``results.json``/``RESULTS.md`` unless ``out`` is None."""
    from _common import machine

    t0 = time.time()
    summary: dict[str, Any] = {}
    for w in WORKLOADS:
        n = min(blocks, TABLE_BLOCKS[w]) if w in TABLE_BLOCKS else blocks * TABLE_MORE.get(w, 1)
        totals = measure_whole(w, list(TABLE_VARIANTS), n, 20, seed)
        ref = totals[TABLE_VARIANTS[0]]
        row: dict[str, Any] = {"blocks": n}
        for v in TABLE_VARIANTS:
            r = sorted(t / f for t, f in zip(totals[v], ref))
            row[v] = {"ms_per_step": 1e3 * statistics.median(totals[v]) / BLOCK,
                      "median": statistics.median(r), "min": r[0], "max": r[-1]}
        summary[w] = row
        print(w, {v: round(q["median"], 3) for v, q in row.items() if v != "blocks"},
              flush=True)
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "block": BLOCK, "segment": SEGMENT, "wall_s": round(time.time() - t0, 1),
              "load_avg": os.getloadavg(), "summary": summary}
    if out is not None:
        from report import update

        update(out, "interleaved", result)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="deep10", choices=sorted(WORKLOADS))
    ap.add_argument("--variants", default="floor,light,bare",
                    help=f"comma-separated, the first is the reference: {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=300, help="steps of each variant, measured")
    ap.add_argument("--warmup", type=int, default=20,
                    help=f"steps of each variant first (at least {DENSE_START} for default "
                         "and every10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--table", action="store_true",
                    help=f"--whole (5 blocks unless given) for every workload with "
                         f"{','.join(TABLE_VARIANTS)}, written into results.json and "
                         "RESULTS.md")
    ap.add_argument("--no-write", action="store_true", help="--table: print only")
    ap.add_argument("--hooks", action="store_true", help="also time the optimizer-step hooks")
    ap.add_argument("--whole", type=int, default=0, metavar="BLOCKS",
                    help=f"measure BLOCKS blocks of {BLOCK} whole steps of each variant, "
                         "background writer included (instead of per-phase medians)")
    a = ap.parse_args()
    if a.table:
        table(a.whole or 5, a.seed, None if a.no_write else os.path.join(HERE, "results.json"))
        return
    variants = a.variants.split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"--variants: {bad} not in {VARIANTS}")
    if a.whole:
        main_whole(a, variants)
        return
    if a.hooks:
        time_hooks()
    med = measure(a.workload, variants, a.steps, a.warmup, a.seed)
    n = len(PHASES)
    ref = med[variants[0]][n - 1]
    print(f"{a.workload}, {a.steps} steps of each variant in turn, one thread "
          f"(median µs per phase; ratio of the step to {variants[0]}'s)")
    print(f"{'variant':14s}" + "".join(f"{p:>16s}" for p in PHASES) + f"{'ratio':>8s}")
    for v in variants:
        print(f"{v:14s}" + "".join(f"{1e6 * t:16.0f}" for t in med[v][:n])
              + f"{med[v][n - 1] / ref:8.3f}")
    if a.hooks:
        print("\nmedian µs per step in the optimizer-step hooks")
        print(f"{'variant':14s}" + "".join(f"{h:>22s}" for h in HOOKS))
        for v in variants:
            print(f"{v:14s}" + "".join(f"{1e6 * t:22.0f}" for t in med[v][n:]))


if __name__ == "__main__":
    main()
