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


def test_whole_blocks_count_the_steps_and_the_background_threads(tmp_path) -> None:
    """``--whole``: one block's ratio is the ratio of its CPU times; a watcher's flushes
    count through its background threads' clocks (gradwatch's writer and TensorBoard's)."""
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--workload", "deep10", "--variants", "floor,every10",
         "--whole", "1", "--warmup", "2"],
        capture_output=True, text=True, timeout=300, check=True).stdout
    rows = {r[0]: r[1:] for r in (line.split() for line in out.splitlines())
            if r[:1] and r[0] in ("floor", "every10")}
    ms = {v: float(r[0]) for v, r in rows.items()}
    assert float(rows["floor"][1]) == 1.0 and ms["floor"] > 0
    assert abs(float(rows["every10"][1]) - ms["every10"] / ms["floor"]) < 2e-3

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from interleaved import build, step, worker_clock
    finally:
        sys.path.remove(str(SCRIPT.parent))
    run = build("every10", "deep10", str(tmp_path))
    for _ in range(15):  # a flush at step 10: the threads exist
        step(run)
    watcher = run[-1]
    threads = [watcher._publish.worker._thread,
               watcher._sink.writer.file_writer.event_writer._async_writer._worker]
    assert all(t.is_alive() for t in threads)
    before = worker_clock(run)
    for _ in range(20):  # two more flushes
        step(run)
    assert worker_clock(run) > before
    watcher.close()
