"""``benchmarks/interleaved.py`` as its closing notes use it: it runs, and what it prints adds
up (the phases make the step; each variant's hooks are timed where they run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "interleaved.py"


def test_phases_add_up_and_hooks_are_timed_where_they_run() -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--workload", "deep10", "--variants", "floor,light,bare",
         "--steps", "25", "--warmup", "2", "--hooks"],
        capture_output=True, text=True, timeout=300, check=True).stdout
    rows = [line.split() for line in out.splitlines() if line.split()[:1]
            and line.split()[0] in ("floor", "light", "bare")]
    phases = {r[0]: [float(v) for v in r[1:]] for r in rows[:3]}
    hooks = {r[0]: [float(v) for v in r[1:]] for r in rows[3:]}
    assert set(phases) == set(hooks) == {"floor", "light", "bare"}
    for name, (fwd, bwd, opt, step, ratio) in phases.items():
        assert min(fwd, bwd, opt) > 0
        # medians of parts need not add up exactly to the median of the whole
        assert 0.8 * (fwd + bwd + opt) < step < 1.25 * (fwd + bwd + opt), name
        assert abs(ratio - step / phases["floor"][3]) < 2e-3, name  # ratio to the first
    pre, post, floor_pre = hooks["light"]
    assert pre > floor_pre == 0 and post > 0  # gradwatch's hooks ran in the light variant
    assert hooks["floor"][2] > 0 and hooks["bare"][2] == 0  # the floor's hook, in its own
