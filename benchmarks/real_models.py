"""The real-architecture suite as a table: each case of ``tests/support/real_models.py``
trained under gradwatch, and what gradwatch said (its first alert) against what is right.

    python benchmarks/real_models.py            # every case, the markdown table
    python benchmarks/real_models.py gpt2 vit   # the cases whose name starts so

docs/real-models.md holds its output.
"""

from __future__ import annotations

import sys
import time

import torch

from tests.support.real_models import CASES, train

HEADER = ("| case | first alert | layer | cause | step | expected | verdict |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")


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
        if case.part_b:
            verdict += f" (waits for: {case.part_b})"
        print(f"| {case.name} | {said} | {case.expected} | {verdict} |", flush=True)
        print(f"  [{time.perf_counter() - t0:.1f} s]", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
