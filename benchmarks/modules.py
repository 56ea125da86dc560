"""gradwatch against the floor of what it promises, per workload and per step kind.

For every workload of ``make bench`` (the MLP, CNN, LSTM, Transformer and GPT-2-style models
of ``overhead.py``, and deep and narrow models of 10, 100 and 1,000 watched modules at a fixed
total size, ``_common.DEEP``: N x (Linear(w, w) + Tanh), N * w^2 constant, batch 32,
orthogonal weights), in the same run, interleaved:

* **floor** / **floor_sampled**: the floor written by hand (``_common.Floor``): the per-step
  promise (one ``_foreach_norm`` over every parameter gradient, one fp32 sum of each output
  of every module that can turn finite values non-finite, an empty hook on the others) and
  the floor of a sampled step (in addition one pass over each watched output, each output
  gradient and the parameters);
* gradwatch's **light** steps and **sampled** steps, each forced on every step through the
  public API (``_common.watch_as``); the **default** (``watch()`` as a user writes it) in
  its steady state and during its first window; **every10**: ``watch(every=10)``, the
  steady state of a user who wants denser curves;
* ratios: light / floor, sampled / floor_sampled, default / floor, every10 / floor,
  floor / bare, first window / bare (each the median over rounds of the ratio within a
  round, with the min-max range); µs per watched module per step ((variant - bare) /
  modules) and aten ops dispatched per watched module per step, counted with a
  ``TorchDispatchMode`` (``_common.OpCounter``; on a GPU each is a launch; the C kernels of
  ``gradwatch.cpukernels`` are calls, not aten ops: not counted).

Method as ``overhead.py``: each (variant, workload) in its own process with one thread and
fixed seeds, variants interleaved in shuffled rounds, process CPU time over whole blocks of
``BLOCK`` steps (a multiple of the sampling period, so each block pays its sampled steps in
full), median over the blocks; host reads counted at the dispatcher. Each variant's steady
state starts from a collected heap (``gc.collect()``), so that a full collection brought on
by setting up counts in the first window, not in the steady state.

    python benchmarks/modules.py                 # writes results.json (key "modules") + RESULTS.md
    python benchmarks/modules.py --rounds 1 --workloads deep1000 --no-write
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

VARIANTS = ("bare", "floor", "floor_sampled", "light", "sampled", "default", "every10")
WORKLOADS = ("mlp", "cnn", "lstm", "transformer", "gpt2", "deep10", "deep100", "deep1000")
BLOCK = 20  # steps per timed block (a multiple of the sampling period of "auto", 10)
# (warm-up, timed steps in the steady state, timed steps inside the default's first window)
# per workload: whole blocks, 1-5 s of timed steps per process on one core
STEPS = {"mlp": (5, 40, 40), "cnn": (5, 40, 40), "lstm": (3, 20, 20),
         "transformer": (2, 20, 20), "gpt2": (2, 20, 20), "deep10": (5, 40, 40),
         "deep100": (5, 40, 40), "deep1000": (5, 40, 40)}
DEFAULT_EVERY = 100  # watch()'s default window; "auto" samples every step of the first one
COUNT = 10  # steps under the op counter (a whole sampling period)
# the ratios reported: (name, variant, the variant it is divided by)
RATIOS = (("light / floor", "light", "floor"),
          ("sampled / own floor", "sampled", "floor_sampled"),
          ("default / floor", "default", "floor"),
          ("every=10 / floor", "every10", "floor"),
          ("floor / bare", "floor", "bare"),
          ("first window / bare", "default_first", "bare"))


def worker(variant: str, workload: str) -> dict[str, Any]:
    import torch
    from _common import WORKLOADS as BUILD
    from _common import Floor, HostReads, OpCounter, block_means, watch_as, watched_modules

    torch.set_num_threads(1)
    torch.manual_seed(0)
    random.seed(0)
    model, x, y, lossf = BUILD[workload]()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    watcher: Any = None
    if variant in ("floor", "floor_sampled"):
        watcher = Floor(model, opt, sampled=variant == "floor_sampled")
    elif variant != "bare":
        watcher = watch_as(variant, model, opt, tempfile.mkdtemp(prefix="gwmod-"))
    warm, timed, first_steps = STEPS[workload]

    def step() -> float:
        c0 = time.process_time()
        opt.zero_grad(set_to_none=True)
        lossf(model(x), y).backward()
        opt.step()
        return time.process_time() - c0

    done = 0

    def run(n: int) -> list[float]:
        nonlocal done
        done += n
        return [step() for _ in range(n)]

    run(warm)
    first = None
    if variant == "default":
        first = statistics.median(block_means(run(first_steps), BLOCK))
        run(DEFAULT_EVERY + warm - done)  # the rest of the first window, then warm up again
    elif variant == "every10":
        run(DEFAULT_EVERY + warm - done)  # past the densely sampled first 100 steps
    # the steady state starts from a collected heap in every variant: the one full
    # collection that watch()'s own setup objects bring on (about 0.1 s per 1,000 modules)
    # belongs to the start, which the first window measures
    gc.collect()
    steady = block_means(run(timed), BLOCK)
    reads, ops = HostReads(), OpCounter()
    with reads, ops:
        run(COUNT)
    by_op = {k: v / COUNT for k, v in ops.by_op.most_common()}
    if watcher is not None:
        watcher.close()
    return {
        "variant": variant, "workload": workload, "modules": watched_modules(model),
        "cpu_block_s": statistics.median(steady), "blocks_s": steady, "first_block_s": first,
        "ops_per_step": ops.count / COUNT, "ops_by_name": by_op,
        "reads_per_step": reads.count / COUNT,
    }


# -- driver --------------------------------------------------------------------------------


def _spread(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def summarize(runs: list[dict[str, Any]], workloads: list[str]) -> dict[str, Any]:
    """Per model: the bare step, and per step kind its ratio, µs and aten ops per module."""
    out: dict[str, Any] = {}
    for wl in workloads:
        rounds: dict[int, dict[str, dict[str, Any]]] = {}
        for r in runs:
            if r["workload"] == wl and "cpu_block_s" in r:
                rounds.setdefault(r["round"], {})[r["variant"]] = r
        bare_runs = [rd["bare"] for rd in rounds.values() if "bare" in rd]
        if not bare_runs:
            out[wl] = {"error": "no bare run"}
            continue
        mods = bare_runs[0]["modules"]
        bare_ops = bare_runs[0]["ops_per_step"]
        res: dict[str, Any] = {
            "modules": mods, "bare_ms": 1e3 * statistics.median(r["cpu_block_s"]
                                                                for r in bare_runs),
            "bare_ops_per_step": bare_ops,
        }
        for v in VARIANTS[1:]:
            pairs = [(rd[v], rd["bare"]) for rd in rounds.values() if v in rd and "bare" in rd]
            if not pairs:
                errs = [r["error"] for r in runs
                        if r["workload"] == wl and r["variant"] == v and "error" in r]
                res[v] = {"error": errs[0] if errs else "not run"}
                continue
            ratio = [a["cpu_block_s"] / b["cpu_block_s"] for a, b in pairs]
            us = [1e6 * (a["cpu_block_s"] - b["cpu_block_s"]) / mods for a, b in pairs]
            ops = pairs[0][0]["ops_per_step"]
            res[v] = {
                "ratio": _spread(ratio), "us_per_module": _spread(us),
                "step_ms": 1e3 * statistics.median(a["cpu_block_s"] for a, _ in pairs),
                "ops_per_step": ops, "ops_per_module": (ops - bare_ops) / mods,
                "reads_per_step": pairs[0][0]["reads_per_step"], "rounds": len(pairs),
                "reads_added": pairs[0][0]["reads_per_step"] - pairs[0][1]["reads_per_step"],
            }
            if v == "default":
                res[v]["first_ratio"] = _spread(
                    [a["first_block_s"] / b["cpu_block_s"] for a, b in pairs])
        res["vs_floor"] = {}
        for name, num, den in RATIOS:
            key = "first_block_s" if num == "default_first" else "cpu_block_s"
            num = "default" if num == "default_first" else num
            res["vs_floor"][name] = _spread(
                [rd[num][key] / rd[den]["cpu_block_s"] for rd in rounds.values()
                 if num in rd and den in rd and rd[num].get(key)])
        out[wl] = res
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", nargs=2, metavar=("VARIANT", "WORKLOAD"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--out", default=os.path.join(HERE, "results.json"))
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--parallel", type=int, default=1,
                    help="processes at a time (each measures its own CPU time; more than one "
                    "only where cores are free, or the machine is shared anyway)")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1])))
        return
    from concurrent.futures import ThreadPoolExecutor

    from _common import machine, run_worker

    variants = [v for v in a.variants.split(",") if v]
    if "bare" not in variants:
        variants.insert(0, "bare")
    workloads = [w for w in a.workloads.split(",") if w]
    rng = random.Random(a.seed)
    runs: list[dict[str, Any]] = []
    t_start = time.time()
    for rd in range(a.rounds):
        jobs = [(v, w) for v in variants for w in workloads]
        rng.shuffle(jobs)
        with ThreadPoolExecutor(max(1, a.parallel)) as pool:
            done = list(pool.map(lambda j: run_worker(__file__, list(j), a.timeout), jobs))
        for (v, w), r in zip(jobs, done):
            r.update(variant=v, workload=w, round=rd)
            runs.append(r)
            msg = (f"{1e3 * r['cpu_block_s']:8.2f} ms, {r['ops_per_step']:7.0f} ops/step"
                   if "cpu_block_s" in r else "ERROR " + r["error"][:120])
            print(f"round {rd} {w:9s} {v:8s} {msg}", flush=True)
    summary = summarize(runs, workloads)
    result = {
        "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rounds": a.rounds, "wall_s": round(time.time() - t_start, 1),
        "load_avg": os.getloadavg(), "summary": summary, "runs": runs,
    }
    print(json.dumps(summary, indent=1))
    if a.no_write:
        return
    from report import update

    update(a.out, "modules", result)


if __name__ == "__main__":
    main()
