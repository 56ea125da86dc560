"""Where gradwatch's time goes on a many-module model, per watched module per step, by part.

On ``deep1000`` (500 x (Linear(64, 64) + Tanh), batch 32: 1,000 watched modules; any
workload of ``_common.WORKLOADS`` with ``--workload``), for light and for sampled steps
(``_common.watch_as``), in one process with one thread:

A. **Timing variants** in alternating blocks (process CPU time; per round, each variant's
   block minus the bare block of the same round; median over rounds): the bare step; an
   empty forward hook on every watched module (the hook call itself); gradwatch; gradwatch
   with one part switched off (``SWITCHES``): that part's cost by subtraction.
B. **Attribution**: gradwatch's entry points wrapped with timers (``PARTS``, the thread's
   CPU time), each part's time exclusive of the parts nested in it (median over steps of
   each part's time in the step). The empty-hook cost of A is the hook call outside them.
C. **Ops**: the aten ops each part dispatches (counted with a ``TorchDispatchMode``, each op
   attributed to the part running when it is dispatched) and their time (torch.profiler,
   one range per part: the top-level ops in it); what is left of a part's time is Python.
D. **Cross-check**: cProfile's functions of gradwatch, and the torch calls made from them,
   by own time.

The floors (``_common.Floor``, light and sampled) are timed in the same blocks as A, so each
row can be read against what the promise costs at least.

The flush is measured apart: one public ``flush()`` every 10 steps, its training-thread part
(``StepEngine.launch_flush``) and the whole call (which waits for the background thread),
per module per step at the default ``every=100``.

``PARTS`` and ``SWITCHES`` name gradwatch internals: when the hot path changes, adapt those
two tables (a name that no longer exists is reported and skipped).

    python benchmarks/breakdown.py                   # writes results.json (key "breakdown")
    python benchmarks/breakdown.py --rounds 3 --no-write
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import importlib
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# (part, "module:Class.attribute") of the gradwatch code that runs in a training step. A
# part's time excludes the parts called inside it (e.g. the fold inside the step end).
PARTS: tuple[tuple[str, str], ...] = (
    ("forward hook", "gradwatch.hooks:ForwardHook.__call__"),
    ("non-finite trace", "gradwatch.trace:StepTrace.call"),
    ("forward hook", "gradwatch.hooks:ForwardDoneHook.__call__"),
    ("output-gradient hook", "gradwatch.hooks:OutGradHook.__call__"),
    ("batched statistics", "gradwatch.hooks:Collector.flush_batches"),
    ("batched statistics", "gradwatch.hooks:Collector.flush_outputs"),
    ("parameter statistics", "gradwatch.engine:StepEngine._params"),
    ("fold", "gradwatch.buffers:WindowBuffers.fold"),
    ("commit", "gradwatch.buffers:WindowBuffers.commit_step"),
    ("non-finite flags", "gradwatch.buffers:WindowBuffers.step_flags"),
    ("non-finite flags", "gradwatch.monitor:StepMonitor.start_take"),
    ("non-finite flags", "gradwatch.monitor:StepMonitor.take_trace"),
    ("non-finite flags", "gradwatch.monitor:StepMonitor.send"),
    ("non-finite flags", "gradwatch.monitor:StepMonitor.poll"),
    ("step end, rest", "gradwatch.stepping:_GlobalStepHook.__call__"),
    ("flush, training thread", "gradwatch.engine:StepEngine.launch_flush"),
)
ORDER = ("hook call", "forward hook", "non-finite trace", "output-gradient hook",
         "batched statistics", "parameter statistics", "fold", "commit", "non-finite flags",
         "step end, rest")


def _switch_off(*parts: str) -> Callable[[Any], None]:
    def switch(w: Any) -> None:
        for p in parts:
            # the parts as the fault guard switches them off after an internal failure
            if p == "params":  # the parameter reads
                w._parts.guard.off.update({"grad", "weight", "before", "update"})
            else:  # "trace", "act" (forward statistics), "out_grad" (output gradients)
                w._parts.guard.off.add(p)
    return switch


# the parts whose cost is taken by subtraction (each switched off alone, then all)
SWITCHES: dict[str, Callable[[Any], None]] = {
    "non-finite trace": _switch_off("trace"),
    "forward statistics": _switch_off("act"),
    "output-gradient hooks": _switch_off("out_grad"),
    "parameter statistics": _switch_off("params"),
    "all four": _switch_off("trace", "act", "out_grad", "params"),
}
EVERY = 100  # the default window, for the flush per step


class Attribution:
    """Wraps ``PARTS`` with timers; exclusive time per part per step (ns)."""

    def __init__(self) -> None:
        self.stack: list[list[Any]] = []  # [part, start, time of nested parts]
        self.step: collections.Counter[str] = collections.Counter()
        self.steps: list[collections.Counter[str]] = []
        self.calls: collections.Counter[str] = collections.Counter()
        self.saved: list[tuple[Any, str, Any]] = []
        self.missing: list[str] = []
        self.ranges = False  # also open a profiler range per part (for C's op times)

    def current(self) -> str:
        return self.stack[-1][0] if self.stack else "model"

    def install(self) -> None:
        # CPU time of the thread, not wall time: on a shared machine a wall clock also counts
        # the time other processes hold the core (the parts then summed to 2-3x the step)
        clock = time.thread_time_ns
        for part, where in PARTS:
            mod_name, path = where.split(":")
            cls_name, attr = path.split(".")
            try:
                cls = getattr(importlib.import_module(mod_name), cls_name)
                orig = cls.__dict__[attr]
            except (ImportError, AttributeError, KeyError):
                self.missing.append(where)
                continue

            def wrapped(*a: Any, _orig: Any = orig, _part: str = part, **k: Any) -> Any:
                frame = [_part, clock(), 0]
                self.stack.append(frame)
                try:
                    if self.ranges:
                        with torch.profiler.record_function(_part):
                            return _orig(*a, **k)
                    return _orig(*a, **k)
                finally:
                    dt = clock() - frame[1]
                    self.stack.pop()
                    self.step[_part] += dt - frame[2]
                    self.calls[_part] += 1
                    if self.stack:
                        self.stack[-1][2] += dt

            self.saved.append((cls, attr, orig))
            setattr(cls, attr, wrapped)

    def uninstall(self) -> None:
        for cls, attr, orig in reversed(self.saved):
            setattr(cls, attr, orig)
        self.saved.clear()

    def end_step(self) -> None:
        self.steps.append(self.step)
        self.step = collections.Counter()

    def reset(self) -> None:
        self.steps.clear()
        self.step = collections.Counter()
        self.calls.clear()


class PartOps(TorchDispatchMode):
    """aten ops dispatched per (part, op), counted as ``_common.OpCounter`` counts them."""

    def __init__(self, attribution: Attribution) -> None:
        super().__init__()
        self.att = attribution
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        name = func.name()
        if not name.startswith("profiler::"):
            self.counts[(self.att.current(), name)] += 1
        return func(*args, **(kwargs or {}))


def op_times(att: Attribution, step: Callable[[], Any], steps: int
             ) -> dict[tuple[str, str], tuple[int, float]]:
    """(part, op) -> (calls, total µs) of the top-level ops run inside each part's range,
    as torch.profiler times them (the op and what it calls, excluding Python)."""
    from torch.profiler import ProfilerActivity, profile

    att.ranges = True
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
                att.end_step()
    finally:
        att.ranges = False
    parts = {p for p, _ in PARTS}
    out: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.name not in parts:
            continue
        for c in e.cpu_children:
            if c.name.startswith("aten::"):
                acc = out[(e.name, c.name)]
                acc[0] += 1
                acc[1] += c.cpu_time_total
    return {k: (int(v[0]), float(v[1])) for k, v in out.items()}


# -- the measurements -----------------------------------------------------------------------


class Bench:
    def __init__(self, workload: str) -> None:
        from _common import WORKLOADS, watched_modules

        torch.manual_seed(0)
        self.model, self.x, self.y, self.lossf = WORKLOADS[workload]()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.modules = watched_modules(self.model)
        self.tmp = tempfile.mkdtemp(prefix="gwbreak-")

    def step(self) -> float:
        c0 = time.process_time()
        self.opt.zero_grad(set_to_none=True)
        self.lossf(self.model(self.x), self.y).backward()
        self.opt.step()
        return time.process_time() - c0

    def watch(self, kind: str) -> Any:
        from _common import watch_as

        return watch_as(kind, self.model, self.opt, self.tmp)

    def block(self, variant: str, steps: int) -> float:
        """Mean CPU time of ``steps`` steps of one variant, attached and removed around."""
        from gradwatch.selection import select, unwrap

        handles, w = [], None
        if variant in ("floor", "floor sampled"):
            from _common import Floor

            w = Floor(self.model, self.opt, sampled=variant == "floor sampled")
        elif variant == "empty hook":
            handles = [m.register_forward_hook(lambda m, a, o: None)
                       for _, m in select(unwrap(self.model), None, None)]
        elif variant != "bare":
            kind, _, switch = variant.partition(" - ")
            w = self.watch(kind)
            if switch:
                SWITCHES[switch](w)
        for _ in range(2):  # the first step after attaching is a sampled one
            self.step()
        t = statistics.fmean(self.step() for _ in range(steps))
        for h in handles:
            h.remove()
        if w is not None:
            w.close()
        return t


def timing_variants(b: Bench, rounds: int, steps: int) -> dict[str, Any]:
    variants = ["bare", "empty hook", "floor", "floor sampled"]
    for kind in ("light", "sampled"):
        variants.append(kind)
        variants += [f"{kind} - {s}" for s in SWITCHES
                     if not (kind == "light" and s == "output-gradient hooks")]
    diffs: dict[str, list[float]] = collections.defaultdict(list)
    bare: list[float] = []
    for rd in range(rounds):
        order = variants[1:]
        if rd % 2:
            order.reverse()
        t_bare = b.block("bare", steps)
        bare.append(t_bare)
        for v in order:
            diffs[v].append(1e6 * (b.block(v, steps) - t_bare) / b.modules)
        print(f"round {rd}: bare {1e3 * t_bare:.1f} ms; "
              + ", ".join(f"{v} {diffs[v][-1]:+.1f}" for v in order) + " µs/module", flush=True)
    med = {v: statistics.median(d) for v, d in diffs.items()}
    out: dict[str, Any] = {"bare_ms": 1e3 * statistics.median(bare), "us_per_module": med,
                           "spread": {v: [min(d), max(d)] for v, d in diffs.items()}}
    by_sub: dict[str, dict[str, float]] = {}
    for kind in ("light", "sampled"):
        parts = {"hook call": med["empty hook"]}
        for s in SWITCHES:
            if f"{kind} - {s}" in med and s != "all four":
                parts[s] = med[kind] - med[f"{kind} - {s}"]
        parts["hook frames and step end (all four off) minus the hook call"] = (
            med[f"{kind} - all four"] - med["empty hook"])
        parts["total"] = med[kind]
        by_sub[kind] = parts
    out["by_subtraction"] = by_sub
    return out


def attribution(b: Bench, kind: str, steps: int, op_steps: int) -> dict[str, Any]:
    att = Attribution()
    att.install()
    try:
        w = b.watch(kind)
        for _ in range(3):
            b.step()
        att.reset()
        total = []
        for _ in range(steps):
            total.append(b.step())
            att.end_step()
        per_step = {p: statistics.median(s[p] for s in att.steps) for p in
                    {p for s in att.steps for p in s}}
        calls = {p: n / steps for p, n in att.calls.items()}
        ops = PartOps(att)
        with ops:
            for _ in range(op_steps):
                b.step()
                att.end_step()
        timed_ops = op_times(att, b.step, op_steps)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(op_steps):
            b.step()
        prof.disable()
        # the flush: the public call every 10 steps (its window holds 10 steps)
        att.reset()
        flush_cpu = []
        for _ in range(5):
            for _ in range(10):
                b.step()
            att.step.clear()
            c0 = time.process_time()
            w.flush()  # waits for the background thread: its CPU time is counted here too
            flush_cpu.append(time.process_time() - c0)
            att.end_step()
        flush_train = statistics.median(s["flush, training thread"] for s in att.steps)
        w.close()
    finally:
        att.uninstall()
    M = b.modules
    op_rows = []
    for (part, name), (n, us) in timed_ops.items():
        op_rows.append({"part": part, "op": name, "per_step": n / op_steps,
                        "us_per_call": us / n, "us_per_module": us / op_steps / M})
    op_rows.sort(key=lambda r: -r["us_per_module"])
    parts = {}
    for p in per_step:
        us = per_step[p] / 1e3 / M
        op_us = sum(r["us_per_module"] for r in op_rows if r["part"] == p)
        parts[p] = {"us_per_module": us, "calls_per_step": calls.get(p, 0.0),
                    "ops_per_module": sum(n for (q, _), n in ops.counts.items() if q == p)
                    / op_steps / M,
                    "op_us_per_module": op_us, "python_us_per_module": us - op_us}
    model_ops = sum(n for (q, _), n in ops.counts.items() if q == "model") / op_steps
    return {
        "parts": parts, "ops": op_rows,
        "ops_dispatched": {f"{q}: {name}": n / op_steps
                           for (q, name), n in ops.counts.most_common() if q != "model"},
        "model_ops_per_step": model_ops,
        "step_ms_instrumented": 1e3 * statistics.median(total),
        "flush_training_ms": flush_train / 1e6,
        "flush_cpu_ms": 1e3 * statistics.median(flush_cpu),
        "flush_us_per_module_step": flush_train / 1e3 / M / EVERY,
        "flush_cpu_us_per_module_step": 1e6 * statistics.median(flush_cpu) / M / EVERY,
        "profile": top_functions(prof, op_steps, M),
        "missing": att.missing,
    }


def top_functions(prof: cProfile.Profile, steps: int, M: int, n: int = 14) -> list[dict]:
    """cProfile: gradwatch's functions, and torch calls made from them, by own time."""
    st = pstats.Stats(prof)
    rows = []
    for (fname, line, func), (_, nc, tt, _, callers) in st.stats.items():  # type: ignore[attr-defined]
        if "gradwatch" in fname:
            rows.append((f"{os.path.basename(fname)}:{line} {func}", nc, tt))
        elif fname == "~":  # a builtin: the part of its time spent for gradwatch callers
            mine = [v for c, v in callers.items() if "gradwatch" in c[0]]
            if mine:
                rows.append((func, sum(v[1] for v in mine), sum(v[2] for v in mine)))
    rows.sort(key=lambda r: -r[2])
    return [{"function": f, "calls_per_module": nc / steps / M,
             "us_per_module": 1e6 * tt / steps / M} for f, nc, tt in rows[:n]]


def measure(workload: str, rounds: int, steps: int, op_steps: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    b = Bench(workload)
    for _ in range(3):
        b.step()
    result: dict[str, Any] = {"workload": workload, "modules": b.modules}
    result["timing"] = timing_variants(b, rounds, steps)
    for kind in ("light", "sampled"):
        result[kind] = attribution(b, kind, max(steps, 10), op_steps)
    return result


# -- printing --------------------------------------------------------------------------------


def table(r: dict[str, Any]) -> str:
    """The breakdown as markdown (stored with the results; RESULTS.md shows it)."""
    t = r["timing"]
    med = t["us_per_module"]
    lines = [
        f"Model `{r['workload']}`, {r['modules']} watched modules, bare step "
        f"{t['bare_ms']:.1f} ms. µs per watched module per step.", "",
        "| part | light: µs | ops | of which in ops: µs | sampled: µs | ops "
        "| of which in ops: µs |", "| --- | --- | --- | --- | --- | --- | --- |",
        f"| hook call itself (an empty forward hook) | {med['empty hook']:.1f} | 0 | – "
        f"| {med['empty hook']:.1f} | 0 | – |",
    ]
    floor = {k: med.get(f) for k, f in (("light", "floor"), ("sampled", "floor sampled"))}
    total = {k: med["empty hook"] for k in ("light", "sampled")}
    names = [p for p in ORDER if p != "hook call"]
    names += sorted({p for k in ("light", "sampled") for p in r[k]["parts"]} - set(names)
                    - {"flush, training thread"})
    for p in names:
        cells = []
        for k in ("light", "sampled"):
            q = r[k]["parts"].get(p)
            if q is None:
                cells += ["–", "–", "–"]
                continue
            total[k] += q["us_per_module"]
            cells += [f"{q['us_per_module']:.1f}", f"{q['ops_per_module']:.2f}",
                      f"{q['op_us_per_module']:.1f}"]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    lines.append(f"| sum of the parts | {total['light']:.1f} | | | {total['sampled']:.1f} | | |")
    lines.append(f"| measured (A): gradwatch step - bare step | {med['light']:.1f} | | "
                 f"| {med['sampled']:.1f} | | |")
    lines.append("| not attributed (the autograd engine calling tensor hooks, allocator, noise) "
                 f"| {med['light'] - total['light']:.1f} | | "
                 f"| {med['sampled'] - total['sampled']:.1f} | | |")
    if floor["light"] is not None and floor["sampled"] is not None:
        lines.append(f"| the floor (`_common.Floor`; sampled: its own floor) - bare step | "
                     f"{floor['light']:.1f} | | | {floor['sampled']:.1f} | | |")
        lines.append(f"| gradwatch - floor | {med['light'] - floor['light']:.1f} | | "
                     f"| {med['sampled'] - floor['sampled']:.1f} | | |")
    fl = {k: r[k]["flush_us_per_module_step"] for k in ("light", "sampled")}
    fc = {k: r[k]["flush_cpu_us_per_module_step"] for k in ("light", "sampled")}
    lines += [
        f"| flush at every={EVERY}, per step: training thread | {fl['light']:.3f} | | "
        f"| {fl['sampled']:.3f} | | |",
        f"| flush at every={EVERY}, per step: CPU of all threads (background rules and "
        f"TensorBoard) | {fc['light']:.2f} | | | {fc['sampled']:.2f} | | |", "",
        "Timing variants (A): a part switched off, its cost by subtraction (µs per module "
        "per step; min-max over rounds in results.json):", "",
        "| part | light | sampled |", "| --- | --- | --- |",
    ]
    sub = t["by_subtraction"]
    for p in dict.fromkeys(list(sub["light"]) + list(sub["sampled"])):
        a, b = sub["light"].get(p), sub["sampled"].get(p)
        lines.append(f"| {p} | {'–' if a is None else f'{a:.1f}'} | "
                     f"{'–' if b is None else f'{b:.1f}'} |")
    for k in ("light", "sampled"):
        lines += ["", f"Top aten ops of a {k} step (C: torch.profiler's time of each top-level "
                  "op, what it calls included; the profiler adds a little to each):", "",
                  "| part | op | calls per step | µs per call | µs per module per step |",
                  "| --- | --- | --- | --- | --- |"]
        for o in r[k]["ops"][:10]:
            lines.append(f"| {o['part']} | `{o['op']}` | {o['per_step']:.0f} | "
                         f"{o['us_per_call']:.1f} | {o['us_per_module']:.2f} |")
    for k in ("light", "sampled"):
        lines += ["", f"cProfile cross-check, {k} step (D: own time, inflated by the "
                  "profiler; builtins counted for their gradwatch callers):", "",
                  "| function | calls per module per step | µs per module per step |",
                  "| --- | --- | --- |"]
        for f in r[k]["profile"][:10]:
            lines.append(f"| `{f['function']}` | {f['calls_per_module']:.2f} | "
                         f"{f['us_per_module']:.1f} |")
    for k in ("light", "sampled"):
        q = r[k]
        lines += ["", f"- {k}: one flush: {q['flush_training_ms']:.2f} ms on the training "
                  f"thread, {q['flush_cpu_ms']:.1f} ms of CPU in all (`flush()` waits for the "
                  "background thread); the step with the timers of B took "
                  f"{q['step_ms_instrumented']:.1f} ms."]
        if q["missing"]:
            lines.append(f"- not found (adapt PARTS): {', '.join(q['missing'])}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="deep1000")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="steps per timed block")
    ap.add_argument("--op-steps", type=int, default=3, help="steps under the op counter")
    ap.add_argument("--out", default=os.path.join(HERE, "results.json"))
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    t0 = time.time()
    r = measure(a.workload, a.rounds, a.steps, a.op_steps)
    from _common import machine

    r.update(machine=machine(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             rounds=a.rounds, wall_s=round(time.time() - t0, 1), load_avg=os.getloadavg())
    r["table"] = table(r)
    print(r["table"])
    if a.no_write:
        print(json.dumps(r, indent=1)[:2000])
        return
    from report import update

    update(a.out, "breakdown", r)


if __name__ == "__main__":
    main()
