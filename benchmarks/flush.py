"""Flush cost on the training thread, and hook cost per watched layer per step (CPU).

For models of 10, 100 and 1000 watched layers (a chain of Linear(32, 32), batch 8):

* flush: the training-thread part of a flush (launch the window's host copy, reset it,
  hand over to the background thread, which divides the means), timed around
  ``StepEngine.launch_flush``; the background part (snapshot, rules, TensorBoard) is timed
  separately by joining the worker, and is not on the training thread;
* hooks: (watched step - bare step) / layers, both timed in the same process, alternating
  blocks; lower-quartile process CPU time per step (robust to other load on the machine).

    python benchmarks/flush.py [--layers 10,100,1000]

Writes ``benchmarks/results.json`` (key ``flush``) and re-renders ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _q1(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=4)[0] if len(xs) > 1 else xs[0]


def measure(n_layers: int, blocks: int, steps: int, flushes: int) -> dict[str, Any]:
    import torch
    import torch.nn as nn

    import gradwatch

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(n_layers)])
    for m in model:  # keep values in range over a deep chain
        nn.init.orthogonal_(m.weight)
    x = torch.randn(8, 32)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    tmp = tempfile.mkdtemp(prefix="gwflush-")

    def step() -> float:  # process CPU time: robust to other load on the machine
        t0 = time.process_time()
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()
        return time.process_time() - t0

    bare: list[float] = []
    watched: list[float] = []
    flush_ms: list[float] = []
    background_ms: list[float] = []
    for b in range(blocks):
        for _ in range(2):
            step()
        bare.append(_q1([step() for _ in range(steps)]))
        # every: larger than the block, so no flush falls inside the timed steps
        w = gradwatch.watch(model, optimizer=opt, logdir=os.path.join(tmp, str(b)),
                            every=10**9, on_alert="ignore")
        for _ in range(2):
            step()
        watched.append(_q1([step() for _ in range(steps)]))
        for _ in range(flushes if b == 0 else max(1, flushes // blocks)):
            step()
            t0 = time.perf_counter()
            w._engine.launch_flush()
            t1 = time.perf_counter()
            w._publish.worker.join()
            t2 = time.perf_counter()
            flush_ms.append(1e3 * (t1 - t0))
            background_ms.append(1e3 * (t2 - t1))
        w.close()
    b_s, w_s = statistics.median(bare), statistics.median(watched)
    return {
        "layers": n_layers,
        "bare_ms": 1e3 * b_s,
        "watched_ms": 1e3 * w_s,
        "overhead_ms": 1e3 * (w_s - b_s),
        "per_layer_us": 1e6 * (w_s - b_s) / n_layers,
        "flush_ms": statistics.median(flush_ms),
        "flush_max_ms": max(flush_ms),
        "background_ms": statistics.median(background_ms),
        "flushes": len(flush_ms),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="10,100,1000")
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--flushes", type=int, default=6)
    ap.add_argument("--out", default=os.path.join(HERE, "results.json"))
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    rows = []
    for n in (int(v) for v in a.layers.split(",")):
        r = measure(n, a.blocks, a.steps, a.flushes)
        rows.append(r)
        print(f"{n:5d} layers: flush {r['flush_ms']:.2f} ms (max {r['flush_max_ms']:.2f}), "
              f"background {r['background_ms']:.1f} ms, hooks {r['overhead_ms']:.2f} ms/step "
              f"= {r['per_layer_us']:.1f} us/layer (bare {r['bare_ms']:.2f} ms)", flush=True)
    per = [r["per_layer_us"] for r in rows]
    note = (f"Per-layer hook cost {min(per):.0f}–{max(per):.0f} µs across "
            f"{rows[0]['layers']}–{rows[-1]['layers']} layers: the step overhead grows "
            "linearly in the number of watched layers. The background part of a flush "
            f"(snapshot, rules, TensorBoard) took {rows[-1]['background_ms']:.0f} ms at "
            f"{rows[-1]['layers']} layers, off the training thread.")
    print(note)
    if a.no_write:
        return
    from _common import machine
    from report import update

    update(a.out, "flush", {"machine": machine(), "rows": rows, "note": note,
                            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})


if __name__ == "__main__":
    main()
