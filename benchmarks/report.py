"""Merge one benchmark's results into results.json and render RESULTS.md from it."""

from __future__ import annotations

import json
import os
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))

LABELS = {
    "bare": "bare step",
    "gradwatch": "gradwatch default",
    "gradwatch_full": "gradwatch, every stat, every element, every step, flush every step",
    "floor": "floor (per-step promise by hand: gradient norms, NaN sums)",
    "naive": "naive (.item() + add_scalar in hooks)",
    "add_histogram": "SummaryWriter.add_histogram of every gradient",
    "wandb_all_1": "wandb.watch(log='all', log_freq=1), offline",
    "wandb_all_100": "wandb.watch(log='all', log_freq=100), offline",
    "lightning_grad_norm": "Lightning grad_norm(model, 2)",
    "delve": "Delve SaturationTracker",
}


NOTES = [
    "Workloads (`benchmarks/_common.py`): MLP 8 x Linear(512) + Tanh, batch 128; CNN "
    "4 x Conv3x3+BatchNorm+ReLU(inplace) 32/64/64/128 channels, batch 32 of 3x32x32, with a "
    "2x2 max-pool after the first three blocks (without it one step takes ~0.5 s on one core) "
    "and a linear head; LSTM 2 layers, hidden 256, sequence 50, batch 32; Transformer encoder "
    "4 layers, d=256, 4 heads, sequence 64, batch 16; GPT-2 a Hugging Face "
    "`GPT2LMHeadModel` built from `GPT2Config(n_layer=12, n_embd=256, n_head=4, "
    "n_positions=64)` (no download; 88 watched modules, its 50,257-token vocabulary), batch 4 "
    "of 64 random tokens, next-token cross-entropy. SGD with momentum, fixed seeds.",
    "gradwatch default: `watch(model, optimizer=opt, logdir=...)` as a user writes it "
    "(every=100, sample_every='auto', TensorBoard on), timed in its steady state: after its "
    "first window (100 steps, every one sampled), one sampled step in 10, each 20-step block "
    "holding two. No flush falls inside the timed steps of that row (one per 100 steps; "
    "`benchmarks/flush.py` measures it: 0.2-0.3 ms of the training thread). The every-stat "
    "row pays the first call of the fused kernel's compilation in its warm-up, and its "
    "+RSS includes the compiler (inductor) loaded for it.",
    "wandb log_freq=100: its histogram step (one in 100) may fall outside the timed steps.",
    "The floor (`_common.Floor`): what gradwatch promises on every step, written by hand: "
    "one `torch._foreach_norm` over every parameter gradient per step, and a forward hook on "
    "every module that sums in fp32, into a buffer allocated once, each output of a module "
    "that can turn finite values non-finite (elementwise activations, dropout, pooling and "
    "flatten get the empty hook; in-place activations and a container handing on its last "
    "child's output skip the sum).",
    "wandb rows: `wandb.init(mode='offline')`, `wandb.watch(model, log='all', log_freq=N)` "
    "and one `run.log({'step': i})` per step (wandb commits the histograms on log). "
    "Lightning: `lightning.pytorch.utilities.grad_norm(model, 2)` after backward. Delve: "
    "`SaturationTracker(..., stats=['lsat'])` with its hooks on every step "
    "(`add_saturations` is an end-of-epoch call, not timed).",
    "`reads/step` lists the workloads in column order. The GPT-2 model reads one value on "
    "the host per step by itself (its bare row): every gradwatch row adds none to it.",
    "Load caveat: the machine's 2 cores were shared with other jobs during the run. Wall "
    "time swung 2-3x between processes, so ratios use process CPU time; they still move by a "
    "few percent from round to round (see the ranges), which is the size of the targets.",
]


# what the floor row of overhead.py measured before it became ``_common.Floor`` (results
# written without ``"floor": "promise"``)
OLD_FLOOR_LABEL = "floor, earlier definition (norm + max-abs per activation and gradient)"
OLD_FLOOR_NOTE = (
    "The floor row of this run (an earlier definition): one L2 norm (`vector_norm`) and one "
    "max-abs (`aminmax`) of each watched module's output and of the gradient at that output, "
    "in the hooks, plus per-parameter gradient norms and max-abs at the step. The floor as "
    "defined now is measured by `modules.py` (next section).")


def label(v: str) -> str:
    if v.startswith("gradwatch_se"):
        return f"gradwatch default but sample_every={v[len('gradwatch_se'):]}"
    return LABELS.get(v, v)


def update(path: str, key: str, result: dict[str, Any]) -> None:
    data: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError:
                data = {}
    data[key] = result
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(os.path.dirname(path), "RESULTS.md"), "w") as f:
        f.write(render(data))


def _f(x: Any, fmt: str = "{:.2f}") -> str:
    return "–" if x is None else fmt.format(x)


def render(data: dict[str, Any]) -> str:
    lines = ["# gradwatch benchmark results", "",
             "Written by `make bench`: `benchmarks/overhead.py`, `modules.py`, "
             "`interleaved.py --table`, `breakdown.py`, `anomaly.py`, `flush.py` and "
             "`compiled.py`, each into its own section; the numbers below are from the last "
             "run of each, see `results.json` for every round.", ""]
    ov = data.get("overhead")
    if ov:
        m = ov["machine"]
        lines += [
            f"Machine: {m['cpu']}, {m['cores']} cores (shared with other work while this ran: "
            f"load average {', '.join(f'{x:.1f}' for x in ov['load_avg'])} at the end), "
            f"Python {m['python']}, torch {m['torch']}; {ov['date']}; one thread per process.",
            "",
            "## Step overhead (CPU)",
            "",
            f"Median over {ov['rounds']} interleaved rounds of (variant step / bare step of the "
            "same round); each step time is the CPU time (all threads of the process, so "
            "background writers count) averaged over blocks of 20 consecutive steps, median "
            "over the blocks: work done on one step in k (a sampled step) is paid in full. "
            "CPU time, because wall time on this shared machine swung 2-3x between processes "
            "(wall-time figures are in results.json). "
            "`range` is min-max over rounds. `reads/step`: host reads per step counted at the "
            "dispatcher. `+RSS`: peak RSS above what the bare run reaches (MB, after imports "
            "and model setup).",
            "",
        ]
        wls = list(ov["summary"])
        head = "| variant | " + " | ".join(f"{w} ratio (range)" for w in wls)
        head += " | reads/step | +RSS MB |"
        lines += [head, "|" + " --- |" * (len(wls) + 3)]
        variants = list(LABELS)
        extra = sorted({v for w in wls for v in ov["summary"][w]} - set(variants))
        variants[2:2] = extra  # e.g. gradwatch_se<k>, next to the gradwatch rows
        for v in variants:
            cells = []
            reads: list[float] = []
            mem: list[float] = []
            seen = False
            for w in wls:
                r = ov["summary"][w].get(v)
                if r is None:
                    cells.append("–")
                    continue
                seen = True
                if "error" in r or "skipped" in r:
                    cells.append("failed" if "error" in r else "not run")
                    continue
                cells.append(f"{_f(r['ratio'])}x ({_f(r['ratio_min'])}–{_f(r['ratio_max'])})"
                             if v != "bare" else f"{r['step_ms']:.1f} ms")
                if r.get("reads_per_step") is not None:
                    reads.append(r["reads_per_step"])
                if r.get("extra_rss_mb") is not None:
                    mem.append(r["extra_rss_mb"])
            if not seen and v not in ov.get("skipped", {}):
                continue
            if v in ov.get("skipped", {}):
                cells = ["skipped"] * len(wls)
            rd = "/".join(_f(x, "{:.0f}") for x in reads) if reads else "–"
            mm = _f(max(mem), "{:+.1f}") if mem and v != "bare" else "–"
            name = OLD_FLOOR_LABEL if v == "floor" and ov.get("floor") != "promise" else label(v)
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {rd} | {mm} |")
        lines.append("")
        if "gradwatch" in variants:
            vf = [f"{w}: {_f(ov['summary'][w].get('gradwatch', {}).get('vs_floor'), '{:.3f}')}x"
                  for w in wls]
            lines += ["gradwatch default / floor (median of same-round ratios): "
                      + ", ".join(vf) + ".", ""]
        errs = [(w, v, r["error"]) for w in wls for v, r in ov["summary"][w].items()
                if "error" in r]
        for v, why in ov.get("skipped", {}).items():
            lines.append(f"- {label(v)}: skipped, {why}.")
        for w, v, e in errs:
            lines.append(f"- {label(v)} on {w}: failed: `{e}`.")
        for w in wls:
            for v, r in ov["summary"][w].items():
                if "skipped" in r:
                    lines.append(f"- {label(v)} on {w}: not run: {r['skipped']}.")
        notes = NOTES + list(ov.get("notes", []))
        if ov.get("floor") != "promise":
            notes = [OLD_FLOOR_NOTE if n.startswith("The floor (") else n for n in notes]
        lines += [f"- {n}" for n in notes]
        lines.append("")
    if data.get("modules"):
        lines += render_modules(data["modules"])
    if data.get("interleaved"):
        lines += render_interleaved(data["interleaved"])
    bd = data.get("breakdown")
    if bd and bd.get("table"):
        lines += ["## Breakdown: where the time goes per watched module (CPU)", "",
                  f"`python benchmarks/breakdown.py` ({bd['rounds']} rounds, {bd['date']}, "
                  f"load average {', '.join(f'{x:.1f}' for x in bd['load_avg'])}).", "",
                  bd["table"], ""]
    if data.get("anomaly"):
        lines += ["## Non-finite values: gradwatch and detect_anomaly side by side", "",
                  "`python benchmarks/anomaly.py`; what the columns mean: "
                  "[docs/nonfinite.md](../docs/nonfinite.md).", "",
                  render_anomaly(data["anomaly"])]
    fl = data.get("flush")
    if fl:
        lines += ["## Flush and hook cost (CPU)", "",
                  "Training-thread time of one flush (launch the host copy, reset, hand over to "
                  "the background thread), and hook cost per watched layer per step, for "
                  "chains of N Linear(32, 32) layers, batch 8 (median of repeats; the window "
                  "never ends there, so every step is a sampled step of a first window).", "",
                  "| watched layers | flush, training thread (ms) | step overhead (ms) | "
                  "per layer per step (µs) |", "| --- | --- | --- | --- |"]
        for r in fl["rows"]:
            lines.append(f"| {r['layers']} | {r['flush_ms']:.2f} | {r['overhead_ms']:.2f} | "
                         f"{r['per_layer_us']:.1f} |")
        lines += ["", fl.get("note", ""), ""]
    co = data.get("compiled")
    if co:
        from compiled import HEADER, render_row

        lines += ["## torch.compile and the hooks (CPU)", "",
                  f"`python benchmarks/compiled.py` ({co['date']}, load average "
                  f"{', '.join(f'{x:.1f}' for x in co['load_avg'])}): light steps of the deep "
                  "and narrow models, eager and compiled with each backend, process CPU time "
                  "(median of blocks of 20 steps after the compile); the first step is the "
                  "compile.", "", HEADER]
        lines += [render_row(r) for r in co["rows"]]
        lines.append("")
    gpu = data.get("gpu")
    lines += ["## GPU", ""]
    if gpu:
        lines += [gpu]
    else:
        lines += ["`benchmarks/gpu_check.py` has not been run: no accelerator was available "
                  "when these figures were taken. It needs a CUDA device and prints its "
                  "ratios; run it by hand where one is present."]
    lines.append("")
    return "\n".join(lines)


def _ratio(r: dict[str, Any] | None) -> str:
    if not r or r.get("median") is None:
        return "–"
    return f"{r['median']:.2f}x ({r['min']:.2f}–{r['max']:.2f})"


def _when(r: dict[str, Any]) -> str:
    """When a section's script ran, and how loaded the machine was at its end."""
    return f"{r['date']}, load average {', '.join(f'{x:.1f}' for x in r['load_avg'])}"


def render_modules(mo: dict[str, Any]) -> list[str]:
    """The floor table and the module-count series of ``modules.py``."""
    lines = [
        "## gradwatch against the floor, per workload (CPU)", "",
        f"`python benchmarks/modules.py` ({mo['rounds']} interleaved rounds, {_when(mo)}). "
        "The *floor* "
        "(`_common.Floor`, written by hand, measured in the same run): one "
        "`torch._foreach_norm` over every parameter gradient per step, and a forward hook on "
        "every module that sums in fp32, into a buffer allocated once, each output of a module "
        "that can turn finite values non-finite (elementwise activations, dropout, pooling, "
        "flatten: the empty hook; in-place activations and a container handing on its last "
        "child's output: no sum). A sampled step's *own floor*: in addition one fp32 sum over "
        "each watched output and each output gradient and one `_foreach_norm` over the "
        "parameters. *light*: every step a light one (`every` and `sample_every` 10**6); "
        "*sampled*: every step sampled (`sample_every=1`, `every` 10**6, so no flush in "
        "either); *default*: `watch()` as a user writes it, past its first 100 steps "
        "(steady) and during them (first window); *every=10*: `watch(every=10)` past its "
        "first 100 steps. Each cell: the median over rounds of the ratio within a round "
        "(min–max); process CPU time over blocks of 20 steps.", "",
        "| workload | watched modules | bare step | floor / bare | light / floor | "
        "sampled / own floor | default / floor | every=10 / floor | first window / bare |",
        "|" + " --- |" * 9,
    ]
    if not any("vs_floor" in r for r in mo["summary"].values()):
        lines += ["This run predates the floor variants (the previous round's code): their "
                  "cells are empty until `modules.py` is run again.", ""]
    names = ("floor / bare", "light / floor", "sampled / own floor", "default / floor",
             "every=10 / floor", "first window / bare")
    for wl, r in mo["summary"].items():
        if "error" in r:
            lines.append(f"| {wl} | failed: {r['error']} |" + " |" * 7)
            continue
        vf = r.get("vs_floor", {})
        cells = [wl, str(r["modules"]), f"{r['bare_ms']:.1f} ms"]
        cells += [_ratio(vf.get(n)) for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per step kind: ratio to the bare step of the same round (min–max), µs per watched "
        "module per step ((step - bare step) / modules, median over rounds) and aten ops "
        "dispatched per watched module per step ((ops - bare ops) / modules, a "
        "`TorchDispatchMode` count; on a GPU each is a launch; on CPU gradwatch's C kernels "
        "are calls, not aten ops, and are not counted). Deep and narrow models at a "
        "fixed total size (N x (Linear(w, w) + Tanh), N·w² = 500·64², batch 32, orthogonal "
        "weights: `deep10` w=640, `deep100` w=202, `deep1000` w=64).", "",
        "| model | floor: ratio | µs/module | ops/module | light: ratio | µs/module | "
        "ops/module | sampled: ratio | µs/module | ops/module | own floor: ratio | "
        "ops/module | default, steady | µs/module | ops/module |",
        "|" + " --- |" * 15,
    ]
    for wl, r in mo["summary"].items():
        if "error" in r:
            continue
        cells = [wl]
        for v in ("floor", "light", "sampled", "floor_sampled", "default"):
            q = r.get(v) or {"error": "not run"}
            n = 2 if v == "floor_sampled" else 3
            if "error" in q:
                cells += ["not run" if q["error"] == "not run" else "failed"] + ["–"] * (n - 1)
                continue
            cells += [_ratio(q["ratio"])]
            if n == 3:
                cells.append(f"{q['us_per_module']['median']:.1f}")
            cells.append(f"{q['ops_per_module']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    reads = {q.get("reads_added") for r in mo["summary"].values() if "error" not in r
             for v, q in r.items() if isinstance(q, dict) and "reads_added" in q
             and v not in ("floor", "floor_sampled")}
    shown = ", ".join(f"{x:g}" for x in sorted(x for x in reads if x is not None))
    lines += ["", f"Host reads per step that the gradwatch rows add to the bare step: {shown} "
              "(counted at the dispatcher; the GPT-2-style model reads one value per step "
              "by itself).", ""]
    return lines


def render_interleaved(il: dict[str, Any]) -> list[str]:
    """The whole-period table of ``interleaved.py --table``."""
    lines = [
        "## The same ratios in one process, whole periods (CPU)", "",
        f"`python benchmarks/interleaved.py --table` ({_when(il)}). Per workload one process "
        "and one thread holds a model of each variant (same seed, same batch). Blocks of "
        f"{il['block']} steps of each variant (one default window: its flush and its 10 "
        f"sampled steps; ten `every=10` windows) are run in turns of {il.get('segment', 10)} "
        "consecutive steps of one variant, the variants in a shuffled order. A block's cost is "
        "the CPU time of the training thread in its steps plus the CPU time of the variant's "
        "background threads (gradwatch's writer: the rules and the window's event; "
        "TensorBoard's thread writing the file), read from their own clocks without waiting "
        "for them (what they do between two turns of a variant counts in its next turn). "
        "Each cell: the "
        "median over blocks of the ratio to the floor's block (min–max), after the first 200 "
        "steps. What slows the machine slows every variant of a block alike, so these ratios "
        "move by less than those of separate processes above.", "",
        "| workload | blocks | floor ms/step | light / floor | default / floor | "
        "every=10 / floor |",
        "| --- | --- | --- | --- | --- | --- |"]
    for w, row in il["summary"].items():
        lines.append(f"| {w} | {row['blocks']} | {row['floor']['ms_per_step']:.2f} | "
                     + " | ".join(f"{row[v]['median']:.3f} ({row[v]['min']:.3f}–"
                                  f"{row[v]['max']:.3f})"
                                  for v in ("light", "default", "every10")) + " |")
    lines.append("")
    return lines


def render_anomaly(an: dict[str, Any]) -> str:
    """The side-by-side table of ``anomaly.py`` (also docs/nonfinite.md)."""

    def cost(q: dict[str, Any]) -> str:
        if q.get("ratio") is None:
            return "–"
        return f"{q['ratio']:.2f}x ({q['ratio_min']:.2f}–{q['ratio_max']:.2f})"

    lines = [
        f"Fault from step {an['fault_step']}; {an['rounds']} rounds, {an['date']}, "
        f"{an['machine']['cpu']}, torch {an['machine']['torch']}.", "",
        "| case | the fault | origin (reference check) | gradwatch: layer, cause, step "
        "(+ later nonfinite alerts) | detect_anomaly: backward function, forward line, step "
        "| bare step | gradwatch cost | detect_anomaly cost |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in an["summary"].items():
        ref = r.get("reference")
        rc = "–" if ref is None else (f"`{ref['layer']}` {ref['cause']}, step {ref['step']}"
                                      if ref["layer"] else f"{ref['cause']}, step {ref['step']}")
        if r.get("reference_as_built") is False:
            rc += f" (built as `{r['built_as']['layer']}` {r['built_as']['cause']}!)"
        g = r["gradwatch"]["answer"]
        if g is None:
            gc = "– (did not run)"
        elif g["layer"] is None:
            gc = "no nonfinite alert"
        else:
            mark = ""
            if "right_layer" in g:
                mark = (f": layer {'✓' if g['right_layer'] else '✗'}, "
                        f"cause {'✓' if g['right_cause'] else '✗'}")
            gc = (f"`{g['layer']}` {g['cause']}, step {g['step']} "
                  f"(+{g['nonfinite_alerts'] - 1}){mark}")
        d = r["detect_anomaly"]["answer"]
        if d is None:
            dc = "– (did not run)"
        elif d["function"] is None:
            dc = "did not raise"
        else:
            dc = f"`{d['function']}`, {d['line'] or 'no line'}, step {d['step']}"
        bare = "–" if r.get("bare_ms") is None else f"{r['bare_ms']:.2f} ms"
        lines.append(f"| {name} | {r['what']} | {rc} | {gc} | {dc} | {bare} | "
                     f"{cost(r['gradwatch'])} | {cost(r['detect_anomaly'])} |")
        for e in r.get("errors", []):
            lines.append(f"| | failed: `{e}` | | | | | | |")
    return "\n".join(lines) + "\n"
