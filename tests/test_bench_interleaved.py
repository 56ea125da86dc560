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
    watcher._publish.worker.join()  # (the clock waits for nothing: a loop does not)
    assert worker_clock(run) > before
    watcher.close()


def test_the_heap_is_frozen_only_while_measuring() -> None:
    """The runs made before a measure are frozen out of the collector's full passes while
    it runs (a full pass over four 1,000-layer models took about 100 ms, landing in
    whichever variant set it off), and unfrozen when it returns, so they can be collected."""
    import gc

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import interleaved
    finally:
        sys.path.remove(str(SCRIPT.parent))
    before = gc.get_freeze_count()  # what this suite's own fixture froze (conftest.py)
    seen: list[int] = []
    real_step = interleaved.step

    def step(run):  # noqa: ANN001, ANN202 - the script's own signature
        seen.append(gc.get_freeze_count())
        return real_step(run)

    interleaved.step = step
    try:
        totals = interleaved.measure_whole("deep10", ["floor", "light"], 1, 2, 0)
    finally:
        interleaved.step = real_step
    assert set(totals) == {"floor", "light"} and all(len(t) == 1 for t in totals.values())
    assert len(seen) == 2 * 2 + 2 * interleaved.BLOCK  # the warm-up, then one block each
    assert seen[:4] == [before] * 4  # the warm-up: nothing more frozen
    assert min(seen[4:]) > before  # the measured steps: the runs frozen
    assert gc.get_freeze_count() == 0  # thawed when the measure returned


def test_windows_benchmark_counts_each_thread() -> None:
    """``benchmarks/windows.py``: both hand-over modes run, and each thread's CPU is read."""
    out = subprocess.run(
        [sys.executable, str(SCRIPT.parent / "windows.py"), "--workload", "deep10",
         "--steps", "40", "--rounds", "2"],
        capture_output=True, text=True, timeout=300, check=True).stdout
    rows = [line.rsplit(None, 5) for line in out.splitlines()
            if line.startswith(("one by one", "a tick at a time"))]
    assert [r[0] for r in rows] == ["one by one", "a tick at a time"]
    for _, train, flush, writer, tb, bg in rows:
        assert float(train) > 0 and float(flush) > 0 and float(writer) > 0
        assert float(tb) >= 0 and float(bg) > 0
