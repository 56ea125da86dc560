"""What ``torch.compile`` makes of gradwatch's hooks on a CPU: the step and the compile time.

For models where Python is the bottleneck (many small modules), compiling the watched model
is the obvious candidate: dynamo traces the forward hooks into the graph (0 graph breaks),
so their per-module Python runs once, at compile time. This measures whether that pays on
this machine: the deep and narrow models of ``modules.py`` (``_common.DEEP``), light steps
(``_common.watch_as("light")``: the non-finite checks and the parameter-gradient norms on
every step), eager and compiled with each backend, each in a process of its own.

Per row: the bare step and the gradwatch step (process CPU time, median of blocks of 20
steps after the compile), their ratio, and the CPU time of the first step (the compile).

    python benchmarks/compiled.py       # writes results.json (key "compiled") + RESULTS.md
    python benchmarks/compiled.py --workloads deep10 --backends eager --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

BACKENDS = ("eager", "aot_eager", "inductor")
WORKLOADS = ("deep10", "deep100")
BLOCK = 20
TIMED = 60
WARM = 5


def worker(backend: str, workload: str, watched: bool) -> dict[str, Any]:
    import torch
    from _common import WORKLOADS as BUILD
    from _common import block_means, watch_as

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, x, y, lossf = BUILD[workload]()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    watcher = watch_as("light", model, opt, tempfile.mkdtemp(prefix="gwcomp-")) if watched \
        else None
    run_model = model if backend == "eager" else torch.compile(model, backend=backend)

    def step() -> float:
        c0 = time.process_time()
        opt.zero_grad(set_to_none=True)
        lossf(run_model(x), y).backward()
        opt.step()
        return time.process_time() - c0

    first = step()
    for _ in range(WARM):
        step()
    blocks = block_means([step() for _ in range(TIMED)], BLOCK)
    if watcher is not None:
        watcher.close()
    return {"first_step_s": first, "cpu_block_s": statistics.median(blocks), "blocks_s": blocks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", nargs=3, metavar=("BACKEND", "WORKLOAD", "WATCHED"))
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--out", default=os.path.join(HERE, "results.json"))
    ap.add_argument("--no-write", action="store_true", help="print only")
    a = ap.parse_args()
    if a.worker:
        b, w, watched = a.worker
        print(json.dumps(worker(b, w, watched == "1")))
        return
    from _common import machine, run_worker

    rows: list[dict[str, Any]] = []
    t0 = time.time()
    for w in a.workloads.split(","):
        for b in a.backends.split(","):
            row: dict[str, Any] = {"workload": w, "backend": b}
            for watched in ("0", "1"):
                r = run_worker(__file__, [b, w, watched], a.timeout)
                row["gradwatch" if watched == "1" else "bare"] = r
            rows.append(row)
            print(render_row(row), flush=True)
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "wall_s": round(time.time() - t0, 1), "load_avg": os.getloadavg(), "rows": rows}
    if a.no_write:
        return
    from report import update

    update(a.out, "compiled", result)


def render_row(row: dict[str, Any]) -> str:
    bare, gw = row["bare"], row["gradwatch"]
    if "error" in bare or "error" in gw:
        why = bare.get("error") or gw.get("error")
        return f"| {row['workload']} | {row['backend']} | not run: {why} | | | | |"
    ratio = gw["cpu_block_s"] / bare["cpu_block_s"]
    return (f"| {row['workload']} | {row['backend']} | {1e3 * bare['cpu_block_s']:.2f} ms | "
            f"{1e3 * gw['cpu_block_s']:.2f} ms | {ratio:.2f}x | "
            f"{bare['first_step_s']:.1f} s | {gw['first_step_s']:.1f} s |")


HEADER = ("| model | backend | bare step | gradwatch light step | ratio | first step (compile), "
          "bare | first step, gradwatch |\n| --- | --- | --- | --- | --- | --- | --- |")


if __name__ == "__main__":
    main()
