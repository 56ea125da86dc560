"""Measure the zoo: the evidence behind every limit of ``gradwatch.diagnosis.CauseLimits``.

    python benchmarks/measure_causes.py [setup ...]

Per setup and seed (every=10, every window kept):

* ``grow``: the largest growth of a signal's scale along a path (the product of the
  per-layer excess over the Glorot/He range, from the last normalization layer);
  ``shrink``: the smallest product of the excess over a whole path (weights too small);
  both from the init audit at ``watch()`` placed in the forward order;
* ``rgain``: the largest recurrent gain (largest singular value of a gate block);
* ``u_first``: the median ``update_ratio`` over the layers in the first window;
  ``u_max``: its largest value in a later window (for broken setups: the last window
  before the first alert);
* ``jump``: the largest ratio of a window's median ``update_ratio`` to the median of the
  windows before it (the first window left out of that median);
* ``shift``: the largest -mean/std of the pre-activations of a ReLU-like layer that is not
  dead in that window; ``dead_shift``: the smallest for a dead one (of a broken setup: at
  the labelled layer), leaving out pre-activations that are all 0;
* ``first_alert``: the step of the run's first alert.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import zoo  # noqa: E402


def measure(setup: zoo.Setup, seed: int) -> dict[str, float]:
    r = zoo.run(setup, seed, every=10, keep_snapshots=True)
    assert r.watcher is not None
    d = r.watcher._rules.diagnosis
    paths = d._paths
    scales = list(paths.scales.values())
    out: dict[str, float] = {
        "grow": max((s.growth for s in scales), default=math.nan),
        "shrink": min((paths.path_product(s) for s in scales), default=math.nan),
        "rgain": max((g.gain for g in d.audit.gains.values()), default=math.nan),
        "u_first": math.nan, "u_max": math.nan, "jump": math.nan, "shift": math.nan,
        "dead_shift": math.nan, "first_alert": r.alerts[0].step if r.alerts else math.nan,
    }
    medians = []
    for snap in r.snapshots:
        if r.alerts and snap.step >= r.alerts[0].step:
            break
        ur = [s["update_ratio"] for s in snap.stats.values()
              if math.isfinite(s.get("update_ratio", math.nan))]
        medians.append(statistics.median(ur) if ur else math.nan)
    if medians:
        out["u_first"] = medians[0]
        later = [u for u in medians[1:] if math.isfinite(u)]
        out["u_max"] = max(later, default=math.nan)
        jumps = [medians[k] / statistics.median(medians[1:k]) for k in range(2, len(medians))
                 if all(math.isfinite(u) and u > 0 for u in medians[1:k + 1])]
        out["jump"] = max(jumps, default=math.nan)
    order = paths.order
    for snap in r.snapshots:
        for i, name in enumerate(order[1:], 1):
            info = d.info[name]
            st = snap.stats.get(name, {})
            pre = snap.stats.get(order[i - 1], {})
            mean, std = pre.get("act_mean", math.nan), pre.get("act_std", math.nan)
            if not info.relu_like or not (math.isfinite(mean) and math.isfinite(std)) \
                    or (mean == 0 and std == 0):  # fed nothing but zeros: not a shift
                continue
            z = -mean / std if std > 0 else math.copysign(math.inf, -mean)
            if st.get("act_zero_frac", 0.0) >= 0.99:
                if setup.kinds and name not in setup.layers:
                    continue
                out["dead_shift"] = z if math.isnan(out["dead_shift"]) else \
                    min(out["dead_shift"], z)
            else:
                out["shift"] = z if math.isnan(out["shift"]) else max(out["shift"], z)
    return out


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    cols = ["grow", "shrink", "rgain", "u_first", "u_max", "jump", "shift", "dead_shift",
            "first_alert"]
    print(f"{'setup':24s} seed " + " ".join(f"{c[:10]:>10s}" for c in cols))
    for s in zoo.ZOO:
        if names and s.name not in names:
            continue
        for seed in zoo.SEEDS:
            m = measure(s, seed)
            print(f"{s.name[:24]:24s} {seed:4d} " + " ".join(f"{m[c]:10.3g}" for c in cols),
                  flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
