"""Non-finite values side by side: where gradwatch and ``torch.autograd.detect_anomaly`` place
them, and what each costs per step (CPU).

Each case is a small real training loop (SGD, fixed seeds) in which a NaN or Inf appears
at a known step, ``FAULT_STEP`` (steps counted from 1, as gradwatch counts them; a light step
of the default sampling). For each case:

* **gradwatch** (``watch(model, optimizer=opt, logdir=...)``, the defaults): its first
  ``nonfinite`` alert, its ``layer``, ``cause`` and step, and how many ``nonfinite`` alerts
  followed; read from ``watcher.alerts``, never written in here;
* **detect_anomaly** (``torch.autograd.detect_anomaly(check_nan=True)`` around the loop):
  the backward function named in its error, the user source line of the forward op from
  the traceback it warns with, and the step it raised on (it checks the backward only);
* the **cost**: each one's step time as a ratio to the bare loop of the same case, on the
  steps past gradwatch's first window and before the fault, process CPU time, each (case,
  variant) in its own process with one thread, interleaved in shuffled rounds (the method of
  ``overhead.py``), median over rounds with the min-max spread.

The **reference** column is the origin found the slow way (``_nonfinite.Reference``: host
checks of every module's inputs, parameters, outputs and gradients, by the definitions of
``Alert.cause`` in the API), in a separate untimed run; where a case was built to have a
known origin, the reference is checked against it.

    python benchmarks/anomaly.py          # writes results.json (key "anomaly"), RESULTS.md
                                          # and docs/nonfinite.md
    python benchmarks/anomaly.py --rounds 1 --cases custom_leaf --no-write
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from _nonfinite import CASES, FAULT_STEP, Reference, train  # noqa: E402

STEPS = FAULT_STEP + 10  # a few steps after the fault: what happens next counts too
TIMED = (105, FAULT_STEP)  # steps [a, b) timed: past the first window, before the fault
VARIANTS = ("bare", "gradwatch", "detect_anomaly")  # timed; "reference" runs once, untimed
CASES_FILE = "_nonfinite.py"

# -- one process: one variant of one case ----------------------------------------------------


def _anomaly_answer(err: BaseException | None, caught: list[warnings.WarningMessage]
                    ) -> dict[str, Any]:
    """What detect_anomaly names: the backward function in its error and the innermost
    line of the cases' code in the traceback of the forward call it warns with."""
    if err is None:
        return {"function": None, "line": None}
    m = re.search(r"Function '(\w+)'", str(err))
    line = None
    for w in caught:
        text = str(w.message)
        if "Traceback of forward call" not in text:
            continue
        frames = re.findall(r'File "([^"]+)", line (\d+), in \w+\n\s*(.+)', text)
        mine = [f for f in frames if os.path.basename(f[0]) == CASES_FILE]
        if mine:
            _, n, code = mine[-1]
            line = f"{CASES_FILE}:{n} `{code.strip()}`"
    return {"function": m.group(1) if m else str(err)[:120], "line": line}


def worker(variant: str, name: str) -> dict[str, Any]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    random.seed(0)
    case = CASES[name]
    s = case.build()
    opt = torch.optim.SGD(s.model.parameters(), lr=s.lr, momentum=0.9)
    cpu: list[float] = []
    out: dict[str, Any] = {"variant": variant, "case": name}
    if variant == "bare":
        train(s, opt, STEPS, cpu)
    elif variant == "reference":  # untimed: it reads the host at every module
        ref = Reference(s.model)
        train(s, opt, STEPS, cpu, after=ref.step_done)
        ref.remove()
        out["reference"] = ref.found
        return out
    elif variant == "gradwatch":
        import gradwatch

        logdir = tempfile.mkdtemp(prefix="gwanomaly-")
        with gradwatch.watch(s.model, optimizer=opt, logdir=logdir, on_alert="ignore") as w:
            train(s, opt, STEPS, cpu)
        nf = [a for a in w.alerts if a.kind == "nonfinite"]
        first = nf[0] if nf else None
        out["gradwatch"] = {
            "layer": first.layer if first else None, "cause": first.cause if first else None,
            "step": first.step if first else None, "nonfinite_alerts": len(nf),
            "message": first.message if first else None,
            "other_alerts": collections.Counter(a.kind for a in w.alerts
                                                if a.kind != "nonfinite"),
        }
    else:
        err = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with torch.autograd.detect_anomaly(check_nan=True):
                    train(s, opt, STEPS, cpu)
            except RuntimeError as e:
                err = e
        out["detect_anomaly"] = {**_anomaly_answer(err, caught),
                                 "step": len(cpu) + 1 if err is not None else None}
    a, b = TIMED
    out["timed_s"] = statistics.fmean(cpu[a - 1:b - 1]) if len(cpu) >= b - 1 else None
    return out


# -- driver ---------------------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]], cases: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in cases:
        c = CASES[name]
        rounds: dict[int, dict[str, dict[str, Any]]] = collections.defaultdict(dict)
        for r in runs:
            if r["case"] == name and r.get("timed_s") is not None:
                rounds[r["round"]][r["variant"]] = r
        ref = next((r["reference"] for r in runs if r["case"] == name and "reference" in r),
                   None)
        row: dict[str, Any] = {
            "what": c.what, "reference": ref,
            "built_as": None if c.expected is None else {"layer": c.expected[0],
                                                         "cause": c.expected[1]},
        }
        # the reference check must find what the case was built to have
        row["reference_as_built"] = (None if c.expected is None or ref is None
                                     else (ref["layer"], ref["cause"]) == c.expected)
        for v in VARIANTS[1:]:
            ratios = [rd[v]["timed_s"] / rd["bare"]["timed_s"] for rd in rounds.values()
                      if v in rd and "bare" in rd]
            answer = next((r[v] for r in runs if r["case"] == name and v in r), None)
            if v == "gradwatch" and answer is not None and ref is not None:
                answer["right_layer"] = answer["layer"] == ref["layer"]
                answer["right_cause"] = answer["cause"] == ref["cause"]
            row[v] = {"answer": answer,
                      "ratio": statistics.median(ratios) if ratios else None,
                      "ratio_min": min(ratios) if ratios else None,
                      "ratio_max": max(ratios) if ratios else None}
        bare = [rd["bare"]["timed_s"] for rd in rounds.values() if "bare" in rd]
        row["bare_ms"] = 1e3 * statistics.median(bare) if bare else None
        errs = [f"{r['variant']}: {r['error']}" for r in runs
                if r["case"] == name and "error" in r]
        if errs:
            row["errors"] = errs
        out[name] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", nargs=2, metavar=("VARIANT", "CASE"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--out", default=os.path.join(HERE, "results.json"))
    ap.add_argument("--doc", default=os.path.join(HERE, os.pardir, "docs", "nonfinite.md"))
    ap.add_argument("--no-write", action="store_true", help="print only")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1])))
        return
    from _common import machine, run_worker

    cases = [c for c in a.cases.split(",") if c]
    for c in cases:
        if c not in CASES:
            raise SystemExit(f"--cases: unknown case {c!r}; the cases are {list(CASES)}")
    rng = random.Random(a.seed)
    runs: list[dict[str, Any]] = []
    t_start = time.time()
    for rd in range(a.rounds):
        jobs = [(v, c) for v in VARIANTS for c in cases]
        if rd == 0:
            jobs += [("reference", c) for c in cases]
        rng.shuffle(jobs)
        for v, c in jobs:
            r = run_worker(__file__, [v, c], a.timeout)
            r.update(variant=v, case=c, round=rd)
            runs.append(r)
            if "error" in r:
                msg = "ERROR " + r["error"][:120]
            elif v == "reference":
                msg = f"origin {r['reference']}"
            else:
                msg = f"{1e3 * r['timed_s']:7.3f} ms" if r.get("timed_s") else "no timed steps"
            print(f"round {rd} {c:17s} {v:15s} {msg}", flush=True)
    result = {
        "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rounds": a.rounds, "fault_step": FAULT_STEP, "timed_steps": list(TIMED),
        "wall_s": round(time.time() - t_start, 1), "load_avg": os.getloadavg(),
        "summary": summarize(runs, cases), "runs": runs,
    }
    from report import render_anomaly

    print(render_anomaly(result))
    if a.no_write:
        return
    from report import update

    update(a.out, "anomaly", result)
    page = nonfinite_page(result, kept_prose(a.doc))
    with open(a.doc, "w", encoding="utf-8") as f:
        f.write(page)


def nonfinite_page(result: dict[str, Any], prose: str) -> str:
    """docs/nonfinite.md: the side-by-side table with what it means and how to re-run it,
    then ``prose``, the page's hand-written part (``kept_prose``)."""
    from report import render_anomaly

    return "\n".join([
        "# Non-finite values: where gradwatch and `detect_anomaly` place them", "",
        "Written by `python benchmarks/anomaly.py` (part of `make bench`); every cell of the "
        "table comes from running the case: gradwatch's and detect_anomaly's answers, the "
        "origin (from a slow reference check, below) and the costs.", "",
        "Each case is a small real training loop (SGD with momentum, fixed seeds, batch 64) in "
        f"which the fault starts at step {result['fault_step']} (counted from 1, as gradwatch "
        "counts steps; a light step under the default sampling). gradwatch runs with its "
        "defaults (`gradwatch.watch(model, optimizer=opt, logdir=...)`); `detect_anomaly` is "
        "`torch.autograd.detect_anomaly(check_nan=True)` around the whole loop: it raises at "
        "the first backward function that returns a NaN and warns with the traceback of the "
        "forward call that made that function. It checks the backward only: a NaN born in "
        "the forward pass is named where the backward of the loss first meets it.", "",
        render_anomaly(result),
        "How to read it:", "",
        "- *origin*: where the fault is born, by the definitions of `Alert.cause` in the API: the "
        "innermost module whose output went non-finite from finite inputs and parameters "
        "(`forward_op`), whose input or parameter gradient went non-finite from a finite "
        "output gradient (`backward_op`), whose parameters are non-finite (`parameters`), or "
        "the first module given a non-finite batch (`input`).",
        "- *gradwatch*: its first `nonfinite` alert (`layer`, `cause`, step) and, after the "
        "`+`, how many more `nonfinite` alerts the rest of the run raised (the consequences: "
        "downstream layers, poisoned parameters, later steps).",
        "- *cost*: step time over the bare loop of the same case, on steps "
        f"{result['timed_steps'][0]}-{result['timed_steps'][1] - 1} (after gradwatch's first "
        "window, before the fault), process CPU time, one thread, each (case, variant) in its "
        f"own process, median of {result['rounds']} interleaved rounds (min-max). These "
        "models are small (see the bare step), so the ratio is mostly each tool's fixed and "
        "per-module cost.",
        "- The origin is found the slow way in a separate, untimed run "
        "(`benchmarks/_nonfinite.py`, `Reference`): host checks of every module's inputs, "
        "own parameters and outputs in the forward pass and of the gradients at every "
        "module's output and input in the backward pass, by the definitions above (an Inf "
        "counts as a NaN there: no case uses an Inf on purpose). Where a case was built to "
        "have a known origin, the reference must agree with it, or the cell says so.",
        "- `torch.linalg.vector_norm` has a zero gradient at a zero vector in torch 2.x "
        "(measured): the zero-norm case writes the norm as `sqrt(sum(x^2))`, the form that "
        "does produce 0 * inf.",
        "- fp16 autocast runs on CPU in this torch (checked), so the overflow case uses "
        "float16, not bfloat16 (whose range is fp32's and would not overflow there).", "",
        prose,
    ])


#: Where the hand-written part of docs/nonfinite.md starts: kept as it is when the page is
#: written again (the table above it is this script's).
MARK = "## How gradwatch finds the origin"


def kept_prose(path: str) -> str:
    """The hand-written part of the page at ``path`` (from ``MARK`` on), or ""."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return ""
    at = text.find(MARK)
    return text[at:] if at >= 0 else ""


if __name__ == "__main__":
    main()
