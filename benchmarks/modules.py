"""Cost per watched module as the module count grows: light steps, sampled steps, the default.

Deep and narrow models of 10, 100 and 1,000 watched modules at a fixed total size
(``_common.DEEP``: N x (Linear(w, w) + Tanh), N * w^2 constant, batch 32), and the MLP and CNN
of ``overhead.py`` for reference. For each model:

* **light** steps (the non-finite checks and parameter-gradient norms only) and **sampled**
  steps (the full stat set), each forced on every step through the public API
  (``_common.watch_as``), and the **default** (``watch()`` as a user writes it) in its steady
  state and during its first window (every step of which is sampled);
* µs per watched module per step: (variant step - bare step of the same round) / modules;
* aten ops dispatched per watched module per step: (variant - bare) / modules, counted with
  a ``TorchDispatchMode`` (``_common.OpCounter``); on a GPU each is a launch;
* the ratio to the bare step of the same round, median over rounds with the min-max spread.

Method as ``overhead.py``: each (variant, model) in its own process with one thread and
fixed seeds, variants interleaved in shuffled rounds, process CPU time over whole blocks of
20 steps past the first window, host reads counted at the dispatcher.

    python benchmarks/modules.py                 # writes results.json (key "modules") + RESULTS.md
    python benchmarks/modules.py --rounds 1 --workloads deep1000 --no-write
"""

from __future__ import annotations

import argparse
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

VARIANTS = ("bare", "light", "sampled", "default")
WORKLOADS = ("deep10", "deep100", "deep1000", "mlp", "cnn")
BLOCK = 20  # steps per timed block (a multiple of the default's sampling period, 10)
TIMED = 60  # timed steps: 3 blocks
WARM = 5  # untimed steps first (allocator, first-call costs)
DEFAULT_EVERY = 100  # watch()'s default window, all of it sampled
FIRST = 80  # timed steps inside the default's first window: WARM .. WARM + FIRST
COUNT = {"bare": 3, "light": 3, "sampled": 3, "default": 10}  # steps under the op counter


def worker(variant: str, workload: str) -> dict[str, Any]:
    import torch
    from _common import WORKLOADS as BUILD
    from _common import HostReads, OpCounter, block_means, watch_as, watched_modules

    torch.set_num_threads(1)
    torch.manual_seed(0)
    random.seed(0)
    model, x, y, lossf = BUILD[workload]()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    watcher = None
    if variant != "bare":
        watcher = watch_as(variant, model, opt, tempfile.mkdtemp(prefix="gwmod-"))

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

    run(WARM)
    first = None
    if variant == "default":
        first = statistics.median(block_means(run(FIRST), BLOCK))
        run(DEFAULT_EVERY + WARM - done)  # the rest of the first window, then warm up again
    steady = block_means(run(TIMED), BLOCK)
    reads, ops = HostReads(), OpCounter()
    with reads, ops:
        run(COUNT[variant])
    by_op = {k: v / COUNT[variant] for k, v in ops.by_op.most_common()}
    if watcher is not None:
        watcher.close()
    return {
        "variant": variant, "workload": workload, "modules": watched_modules(model),
        "cpu_block_s": statistics.median(steady), "blocks_s": steady, "first_block_s": first,
        "ops_per_step": ops.count / COUNT[variant], "ops_by_name": by_op,
        "reads_per_step": reads.count / COUNT[variant],
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
            }
            if v == "default":
                res[v]["first_ratio"] = _spread(
                    [a["first_block_s"] / b["cpu_block_s"] for a, b in pairs])
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
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1])))
        return
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
        for v, w in jobs:
            r = run_worker(__file__, [v, w], a.timeout)
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
