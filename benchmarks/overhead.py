"""Training-step overhead of gradwatch and of peer monitors, side by side (CPU).

Every (variant, workload) runs in its own process with one thread and fixed seeds; the
variants are interleaved in shuffled rounds so that machine drift cancels. For each
workload the ratio to the bare step *of the same round* is taken, and the median ratio over
the rounds is reported with its spread (min-max). A separate phase of each first-round
process counts host reads per step at the dispatcher (``_common.HostReads``).

    python benchmarks/overhead.py                 # full run, writes results.json + RESULTS.md
    python benchmarks/overhead.py --rounds 2 --variants bare,gradwatch --workloads mlp

Writes ``benchmarks/results.json`` (key ``overhead``) and ``benchmarks/RESULTS.md``.
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
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

VARIANTS = (
    "bare", "gradwatch", "gradwatch_full", "floor", "naive", "add_histogram",
    "wandb_all_1", "wandb_all_100", "lightning_grad_norm", "delve",
)
# (timed steps, warm-up steps) per workload: 1-5 s of steps per process on one core. Timed
# steps are whole blocks of BLOCK steps (see STEP_STAT).
BLOCK = 20
DEFAULT_EVERY = 100  # watch()'s default window
STEPS = {"mlp": (60, 5), "cnn": (40, 5), "lstm": (20, 3), "transformer": (20, 2),
         "gpt2": (20, 2)}
# run only when asked for (--workloads): the module-count series (modules.py) has its own
# driver; these give the peers' rows on it
MORE_STEPS = {"deep10": (60, 5), "deep100": (60, 5), "deep1000": (40, 5)}
COUNT_STEPS = 3
# (variant, workload) pairs not run, and why: a note in RESULTS.md instead of a row cell
NOT_RUN = {
    ("delve", "gpt2"): "Delve's saturation needs the covariance of each layer's outputs: for the "
    "50,257-wide LM head (a 10 GB matrix) the process grew past 24 GB here and was killed",
}
PEER_MODULES = {
    "wandb_all_1": "wandb", "wandb_all_100": "wandb", "lightning_grad_norm": "lightning",
    "delve": "delve",
}

# -- variants (each returns hooks called around the step, and a closer) ---------------------


class Hooks:
    def __init__(self) -> None:
        self.after_backward: Callable[[int], None] = lambda i: None
        self.after_step: Callable[[int], None] = lambda i: None
        self.close: Callable[[], None] = lambda: None


def _watched(model: Any) -> list[tuple[str, Any]]:
    from gradwatch.selection import select

    return select(model, None, None)


def setup_gradwatch(model: Any, opt: Any, tmp: str, full: bool,
                    sample_every: int | None = None) -> Hooks:
    import gradwatch

    h = Hooks()
    if full:
        w = gradwatch.watch(model, optimizer=opt, logdir=tmp, every=1, sample_every=1,
                            on_alert="ignore")
        w._collector.sample = None  # count over every element of every tensor
    elif sample_every is not None:
        w = gradwatch.watch(model, optimizer=opt, logdir=tmp, sample_every=sample_every,
                            on_alert="ignore")
    else:
        w = gradwatch.watch(model, optimizer=opt, logdir=tmp, on_alert="ignore")
    h.close = w.close
    return h


def setup_floor(model: Any, opt: Any, tmp: str) -> Hooks:
    """The floor of what gradwatch promises on every step, by hand (``_common.Floor``): one
    ``_foreach_norm`` over the parameter gradients, one fp32 sum of each output of every
    module that can turn finite values non-finite."""
    from _common import Floor

    f = Floor(model, opt, sampled=False)
    h = Hooks()
    h.close = f.close
    return h


def setup_naive(model: Any, opt: Any, tmp: str) -> Hooks:
    """What a hand-written monitor often looks like: per-module forward hooks and
    per-parameter gradient hooks, each calling .item() and SummaryWriter.add_scalar."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(tmp)
    step = [0]
    handles = []
    for name, m in _watched(model):
        def hook(mod: Any, args: Any, out: Any, name: str = name) -> None:
            t = out if not isinstance(out, tuple) else out[0]
            writer.add_scalar(f"act_norm/{name}", t.detach().norm().item(), step[0])
        handles.append(m.register_forward_hook(hook))
    for name, p in model.named_parameters():
        def ghook(g: Any, name: str = name) -> None:
            writer.add_scalar(f"grad_norm/{name}", g.norm().item(), step[0])
        handles.append(p.register_hook(ghook))
    h = Hooks()

    def after_step(i: int) -> None:
        step[0] = i

    h.after_step = after_step

    def close() -> None:
        for x in handles:
            x.remove()
        writer.close()
    h.close = close
    return h


def setup_histogram(model: Any, opt: Any, tmp: str) -> Hooks:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(tmp)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    h = Hooks()

    def after_backward(i: int) -> None:
        for n, p in named:
            if p.grad is not None:
                writer.add_histogram(f"grad/{n}", p.grad, i)

    h.after_backward = after_backward
    h.close = writer.close
    return h


def setup_wandb(model: Any, opt: Any, tmp: str, freq: int) -> Hooks:
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    os.environ.setdefault("WANDB_DIR", tmp)
    import wandb

    run = wandb.init(mode="offline", dir=tmp, project="gradwatch-bench",
                     settings=wandb.Settings(silent=True, console="off"))
    wandb.watch(model, log="all", log_freq=freq)
    h = Hooks()
    h.after_step = lambda i: run.log({"step": i})

    def close() -> None:
        wandb.unwatch(model)
        run.finish()
    h.close = close
    return h


def setup_lightning(model: Any, opt: Any, tmp: str) -> Hooks:
    from lightning.pytorch.utilities import grad_norm

    h = Hooks()
    keep: list[Any] = []

    def after_backward(i: int) -> None:
        keep[:] = [grad_norm(model, norm_type=2)]  # what LightningModule.log_dict gets

    h.after_backward = after_backward
    return h


def setup_delve(model: Any, opt: Any, tmp: str) -> Hooks:
    from delve import SaturationTracker

    tracker = SaturationTracker(os.path.join(tmp, "delve"), save_to="csv", modules=model,
                                device="cpu", stats=["lsat"])
    h = Hooks()
    h.close = tracker.close
    return h


SETUP: dict[str, Callable[[Any, Any, str], Hooks]] = {
    "bare": lambda m, o, t: Hooks(),
    "gradwatch": lambda m, o, t: setup_gradwatch(m, o, t, full=False),
    "gradwatch_full": lambda m, o, t: setup_gradwatch(m, o, t, full=True),
    "floor": setup_floor,
    "naive": setup_naive,
    "add_histogram": setup_histogram,
    "wandb_all_1": lambda m, o, t: setup_wandb(m, o, t, 1),
    "wandb_all_100": lambda m, o, t: setup_wandb(m, o, t, 100),
    "lightning_grad_norm": setup_lightning,
    "delve": setup_delve,
}


# -- one process: one variant on one workload -----------------------------------------------


def setup(variant: str, model: Any, opt: Any, tmp: str) -> Hooks:
    if variant.startswith("gradwatch_se"):  # gradwatch_se<k>: the default with sample_every=k
        return setup_gradwatch(model, opt, tmp, False, int(variant[len("gradwatch_se"):]))
    return SETUP[variant](model, opt, tmp)


def worker(variant: str, workload: str, count: bool) -> dict[str, Any]:
    import torch
    from _common import WORKLOADS, HostReads, OpCounter, peak_rss_mb, rss_mb

    torch.set_num_threads(1)
    torch.manual_seed(0)
    random.seed(0)
    if variant in PEER_MODULES:
        __import__(PEER_MODULES[variant])
    if variant.startswith("gradwatch"):
        import gradwatch  # noqa: F401
    if variant == "naive" or variant == "add_histogram":
        import torch.utils.tensorboard  # noqa: F401
    model, x, y, lossf = WORKLOADS[workload]()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    rss0 = rss_mb()
    tmp = tempfile.mkdtemp(prefix="gwbench-")
    hooks = setup(variant, model, opt, tmp)

    def step(i: int) -> None:
        opt.zero_grad(set_to_none=True)
        loss = lossf(model(x), y)
        loss.backward()
        hooks.after_backward(i)
        opt.step()
        hooks.after_step(i)

    n, warm = {**STEPS, **MORE_STEPS}[workload]
    if variant == "gradwatch":
        # the default (sample_every="auto") reads one step in 2 of its first 100 steps, then
        # one in 10: time the steady state after them
        warm += DEFAULT_EVERY
    for i in range(warm):
        step(i)
    times = []
    cpu = []
    for i in range(warm, warm + n):
        t0 = time.perf_counter()
        c0 = time.process_time()
        step(i)
        cpu.append(time.process_time() - c0)
        times.append(time.perf_counter() - t0)
    reads = ops = None
    if count:
        # gradwatch's steps differ (one in 10 sampled by default): count a whole cycle
        k = 10 if variant.startswith("gradwatch") else COUNT_STEPS
        counter, op_counter = HostReads(), OpCounter()
        with counter, op_counter:
            for i in range(warm + n, warm + n + k):
                step(i)
        reads, ops = counter.count / k, op_counter.count / k
    peak = peak_rss_mb()
    hooks.close()
    return {
        "variant": variant, "workload": workload,
        "median_s": statistics.median(times), "mean_s": statistics.fmean(times),
        "p25_s": statistics.quantiles(times, n=4)[0], "min_s": min(times),
        "cpu_median_s": statistics.median(cpu), "cpu_mean_s": statistics.fmean(cpu),
        "cpu_block_s": statistics.median(
            statistics.fmean(cpu[i:i + BLOCK]) for i in range(0, len(cpu), BLOCK)),
        "reads_per_step": reads, "ops_per_step": ops, "rss_setup_mb": rss0, "peak_rss_mb": peak,
        "peak_above_setup_mb": peak - rss0,
    }


# -- driver --------------------------------------------------------------------------------


def available(variant: str) -> str | None:
    """None if the variant can run here, else why not."""
    mod = PEER_MODULES.get(variant)
    if mod is None:
        return None
    import importlib.util

    if importlib.util.find_spec(mod) is None:
        return f"`{mod}` not installed (pip install -r benchmarks/requirements-peers.txt)"
    return None


def run_one(variant: str, workload: str, count: bool, timeout: float) -> dict[str, Any]:
    from _common import run_worker

    return run_worker(__file__, [variant, workload] + (["--count"] if count else []), timeout)


# The step time of one process: CPU time (all threads of the process, so the background
# writer counts) averaged over blocks of BLOCK consecutive steps, median over the blocks.
# A block mean, not a per-step median: a monitor that does its work on one step in k (a
# sampled step, a histogram every k steps) must pay for it here, and with BLOCK a multiple
# of k it does, in full. On a machine shared with other work wall time swings by 2-3x from
# one process to the next (measured here); CPU time does not count the time other
# processes hold the core. Wall-time medians and quartiles are in results.json too.
STEP_STAT = "cpu_block_s"


def summarize(runs: list[dict[str, Any]], variants: list[str],
              workloads: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for wl in workloads:
        rounds: dict[int, dict[str, dict[str, Any]]] = {}
        for r in runs:
            if r["workload"] == wl and STEP_STAT in r:
                rounds.setdefault(r["round"], {})[r["variant"]] = r
        res: dict[str, Any] = {}
        for v in variants:
            ratios = [rd[v][STEP_STAT] / rd["bare"][STEP_STAT]
                      for rd in rounds.values() if v in rd and "bare" in rd]
            vs_floor = [rd[v][STEP_STAT] / rd["floor"][STEP_STAT]
                        for rd in rounds.values() if v in rd and "floor" in rd]
            if (v, wl) in NOT_RUN:
                res[v] = {"skipped": NOT_RUN[(v, wl)]}
                continue
            mine = [r for r in runs if r["workload"] == wl and r["variant"] == v]
            errs = [r["error"] for r in mine if "error" in r]
            ok = [r for r in mine if STEP_STAT in r]
            if not ok:
                res[v] = {"error": errs[0] if errs else "not run"}
                continue
            reads = [r["reads_per_step"] for r in ok if r.get("reads_per_step") is not None]
            ops = [r["ops_per_step"] for r in ok if r.get("ops_per_step") is not None]
            bare_mem = [r["peak_above_setup_mb"] for r in runs
                        if r["workload"] == wl and r["variant"] == "bare" and STEP_STAT in r]
            mem = statistics.median(r["peak_above_setup_mb"] for r in ok)
            res[v] = {
                "step_ms": 1e3 * statistics.median(r[STEP_STAT] for r in ok),
                "ratio": statistics.median(ratios) if ratios else None,
                "ratio_min": min(ratios) if ratios else None,
                "ratio_max": max(ratios) if ratios else None,
                "vs_floor": statistics.median(vs_floor) if vs_floor else None,
                "rounds": len(ratios),
                "reads_per_step": reads[0] if reads else None,
                "ops_per_step": ops[0] if ops else None,
                "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in ok),
                "extra_rss_mb": mem - statistics.median(bare_mem) if bare_mem else None,
            }
        out[wl] = res
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", nargs=2, metavar=("VARIANT", "WORKLOAD"))
    ap.add_argument("--count", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--workloads", default=",".join(STEPS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--out", default=os.path.join(HERE, "results.json"))
    ap.add_argument("--no-write", action="store_true", help="print only")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1], a.count)))
        return

    variants = [v for v in a.variants.split(",") if v]
    for v in ("bare", "floor"):
        if v not in variants:
            variants.insert(0, v)
    workloads = [w for w in a.workloads.split(",") if w]
    skipped = {v: why for v in variants if (why := available(v)) is not None}
    runnable = [v for v in variants if v not in skipped]
    rng = random.Random(a.seed)
    runs: list[dict[str, Any]] = []
    t_start = time.time()
    for rd in range(a.rounds):
        jobs = [(v, w) for v in runnable for w in workloads if (v, w) not in NOT_RUN]
        rng.shuffle(jobs)
        for v, w in jobs:
            r = run_one(v, w, count=(rd == 0), timeout=a.timeout)
            r.update(variant=v, workload=w, round=rd)
            runs.append(r)
            msg = (f"{1e3 * r[STEP_STAT]:8.2f} ms" if STEP_STAT in r
                   else "ERROR " + r["error"][:120])
            print(f"round {rd} {w:12s} {v:20s} {msg}", flush=True)
    summary = summarize(runs, variants, workloads)
    from _common import machine

    result = {
        "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "floor": "promise",  # the floor of _common.Floor (report.py labels older runs apart)
        "rounds": a.rounds, "steps": STEPS, "wall_s": round(time.time() - t_start, 1),
        "load_avg": os.getloadavg(), "skipped": skipped, "summary": summary, "runs": runs,
    }
    print(json.dumps(summary, indent=1))
    if a.no_write:
        return
    from report import update

    update(a.out, "overhead", result)


if __name__ == "__main__":
    main()
