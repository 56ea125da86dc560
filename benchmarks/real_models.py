"""The real-architecture suite as a table: each case of ``tests/support/real_models.py``
trained under gradwatch, and what gradwatch said (its first alert) against what is right.

    python benchmarks/real_models.py            # every case, the markdown table
    python benchmarks/real_models.py gpt2 vit   # the cases whose name starts so
    python benchmarks/real_models.py --margins  # the healthy runs' margins to the
                                                # vanishing limits (docs/thresholds.md)

docs/real-models.md holds its output.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time

import torch

# the repository's root, for the cases in tests/support (run as ``python benchmarks/...``)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.support.real_models import CASES, train  # noqa: E402

HEADER = ("| case | model | what is broken | first alert | layer | cause | step | expected "
          "| verdict |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def main(prefixes: list[str]) -> int:
    torch.set_num_threads(1)
    print(HEADER)
    wrong = 0
    for case in CASES:
        if prefixes and not any(case.name.startswith(p) for p in prefixes):
            continue
        t0 = time.perf_counter()
        out = train(case)
        problems = out.problems()
        wrong += bool(problems)
        a = out.first
        said = "no alert | | | " if a is None else \
            f"{a.kind} | `{a.layer}` | {a.cause} | {a.step}"
        verdict = "right" if not problems else "wrong: " + "; ".join(problems)
        print(f"| {case.name} | {case.family} | {case.fault or 'nothing (healthy)'} | {said} "
              f"| {case.expected} | {verdict} |", flush=True)
        print(f"  [{time.perf_counter() - t0:.1f} s]", file=sys.stderr, flush=True)
    return 0


def margins() -> int:
    """Per healthy case: under an adaptive optimizer the smallest ``update_ratio`` over the
    median layer's and the smallest ``grad_rms`` over the optimizer's eps; under SGD the
    smallest ``grad_rms`` over the window's largest (what the vanishing rule reads)."""
    torch.set_num_threads(1)
    print("| case | optimizer | smallest update_ratio / median | smallest grad_rms / eps "
          "| smallest grad_rms / largest |\n| --- | --- | --- | --- | --- |")
    for case in CASES:
        if case.kind is not None:
            continue
        out = train(case, keep=True)
        fam, eps = out.family
        ur, ge, gr = math.inf, math.inf, math.inf
        for k, snap in enumerate(out.snapshots):
            rms = {n: s["grad_rms"] for n, s in snap.stats.items()
                   if math.isfinite(s.get("grad_rms", math.nan)) and s["grad_rms"] > 0}
            ups = {n: s["update_ratio"] for n, s in snap.stats.items()
                   if n in rms and math.isfinite(s.get("update_ratio", math.nan))
                   and s["update_ratio"] > 0}
            if rms:
                gr = min(gr, min(rms.values()) / max(rms.values()))
                if fam == "adaptive":
                    ge = min(ge, min(rms.values()) / eps)
            if k >= 1 and len(ups) >= 3:  # after warm-up, as the rule
                ur = min(ur, min(ups.values()) / statistics.median(ups.values()))
        cells = [f"{ur:.3g}" if fam == "adaptive" else "-",
                 f"{ge:.3g}" if fam == "adaptive" else "-", f"{gr:.3g}"]
        print(f"| {case.name} | {fam} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--margins"]:
        sys.exit(margins())
    sys.exit(main(sys.argv[1:]))
