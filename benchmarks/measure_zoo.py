"""Measure the zoo: the statistics behind every default of ``gradwatch.Thresholds``.

    python benchmarks/measure_zoo.py [setup ...]

For each setup and seed, the per-window statistics the rules look at, reduced to the extreme
that matters: for healthy runs the value closest to a limit (the smallest grad_rms ratio to
the largest layer, the largest ratio to the median, the largest spike against the running
average, the largest zero/saturated fraction), for broken runs the same at the labelled
layers, and the largest per-step grad_rms. The first window is left out of the relative
columns (warm-up; ``w0_*`` show it alone). Alerts are collected, not raised, with patience
and rate limit 1, so every window is seen.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gradwatch.selection import describe  # noqa: E402
from tests.support import zoo  # noqa: E402


def measure(setup: zoo.Setup, seed: int, ema_decay: float = 0.9) -> dict[str, float]:
    r = zoo.run(setup, seed, every=10, keep_snapshots=True,
                thresholds={"rate_limit": 1, "patience": 1})
    trial_layers = {n: describe(n, m, list(m.parameters(recurse=False)))
                    for n, m in setup.build(seed).model.named_modules()}
    want = set(setup.layers) if setup.kinds else None
    out = {"min_rms": math.inf, "min_ratio_top": math.inf, "max_ratio_med": 0.0,
           "max_rms": 0.0, "max_spike": 0.0, "max_zero": 0.0, "max_sat": 0.0,
           "min_out_ratio": math.inf, "w0_ratio_top": math.inf, "w0_ratio_med": 0.0}
    ema: dict[str, float] = {}
    for k, snap in enumerate(r.snapshots):
        rms = {n: s["grad_rms"] for n, s in snap.stats.items()
               if math.isfinite(s.get("grad_rms", math.nan)) and s["grad_rms"] > 0}
        og = {n: s["out_grad_rms"] for n, s in snap.stats.items()
              if math.isfinite(s.get("out_grad_rms", math.nan)) and s["out_grad_rms"] > 0}
        top = max(rms.values(), default=math.nan)
        med = statistics.median(rms.values()) if rms else math.nan
        otop = max(og.values(), default=math.nan)
        for n, s in snap.stats.items():
            if want is not None and n not in want:
                continue
            info = trial_layers.get(n)
            if n in rms:
                v = rms[n]
                out["min_rms"] = min(out["min_rms"], v)
                out["max_rms"] = max(out["max_rms"], v)
                if k == 0:
                    out["w0_ratio_top"] = min(out["w0_ratio_top"], v / top)
                    if len(rms) >= 3:
                        out["w0_ratio_med"] = max(out["w0_ratio_med"], v / med)
                if k >= 1:
                    out["min_ratio_top"] = min(out["min_ratio_top"], v / top)
                    if len(rms) >= 3:
                        out["max_ratio_med"] = max(out["max_ratio_med"], v / med)
                    if n in ema:
                        out["max_spike"] = max(out["max_spike"], v / ema[n])
                ema[n] = v if n not in ema else ema_decay * ema[n] + (1 - ema_decay) * v
            if n in og and k >= 1:
                out["min_out_ratio"] = min(out["min_out_ratio"], og[n] / otop)
            if info is not None and info.relu_like:
                out["max_zero"] = max(out["max_zero"], s.get("act_zero_frac", 0.0))
            if info is not None and info.bounds is not None:
                out["max_sat"] = max(out["max_sat"], s.get("act_sat_frac", 0.0))
    out["final_loss"] = r.final_loss
    return out


def step_rms_max(setup: zoo.Setup, seed: int) -> float:
    """Largest per-step ``grad_rms`` of any layer (of the labelled layers for broken setups),
    in float64 without gradwatch: what the within-a-step ``extreme_rms`` rule sees."""
    t = setup.build(seed)
    want = set(setup.layers) if setup.kinds else None
    owned = [(n, [p for p in m._parameters.values() if p is not None])
             for n, m in t.model.named_modules() if want is None or n in want]
    top = 0.0
    for step in range(setup.steps):
        loss = t.loss(step)
        t.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for _, ps in owned:
            gs = [p.grad for p in ps if p.grad is not None]
            if gs:
                sq = sum(float(g.double().square().sum()) for g in gs)
                top = max(top, math.sqrt(sq / sum(g.numel() for g in gs)))
        t.optimizer.step()
    return top


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    cols = ["min_rms", "max_rms", "min_ratio_top", "max_ratio_med", "max_spike",
            "max_zero", "max_sat", "min_out_ratio", "w0_ratio_top", "w0_ratio_med",
            "step_rms_max", "final_loss"]
    print(f"{'setup':24s} seed " + " ".join(f"{c[:9]:>9s}" for c in cols))
    for s in zoo.ZOO:
        if names and s.name not in names:
            continue
        for seed in zoo.SEEDS:
            m = measure(s, seed)
            m["step_rms_max"] = step_rms_max(s, seed)
            print(f"{s.name[:24]:24s} {seed:4d} " + " ".join(f"{m[c]:9.3g}" for c in cols),
                  flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
