"""The zoo under default thresholds: every broken setup flagged with the right kind at the
right layer, every healthy one silent over 160 steps, for two seeds each.

The confusion table is printed whether or not pytest captures output.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import zoo  # noqa: E402

from gradwatch.alerts import KINDS  # noqa: E402

EVERY = 10
LABELS = ("healthy", *KINDS)
VERDICTS = (*LABELS, "wrong layer")


@pytest.fixture(scope="module")
def results() -> dict[str, list[zoo.Result]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out: dict[str, list[zoo.Result]] = {}
        for s in zoo.ZOO:
            out[s.name] = [zoo.run(s, seed, every=EVERY) for seed in zoo.SEEDS]
        return out
    finally:
        torch.set_num_threads(threads)


def confusion(results: dict[str, list[zoo.Result]]) -> tuple[str, Counter[tuple[str, str]]]:
    """Per-setup table and the label x verdict matrix. Verdict: the kind of the alert that
    matches the label (right kind, right layer), else the first alert's kind ("wrong layer"
    when that is the labelled kind elsewhere), else healthy."""
    lines = [f"{'setup':26s} {'label':20s} {'seed':>4s} {'verdict':10s} "
             f"{'first matching alert':40s} other alerts"]
    matrix: Counter[tuple[str, str]] = Counter()
    for name, runs in results.items():
        for r in runs:
            s = r.setup
            hit = r.hit
            # verdict: the alert matching the label if there is one, else the first alert
            verdict = hit.kind if hit is not None else r.predicted
            if s.kinds and hit is None and verdict in s.kinds:
                verdict = "wrong layer"
            truth = "healthy" if not s.kinds else (verdict if verdict in s.kinds
                                                   else s.kinds[0])
            matrix[(truth, verdict)] += 1
            first = f"{hit.kind}@{hit.layer} step {hit.step}" if hit else "-"
            others = Counter(f"{a.kind}@{a.layer}" for a in r.alerts if a is not hit)
            lines.append(f"{name:26s} {s.label:20s} {r.seed:4d} "
                         f"{('OK ' if r.ok else 'BAD ') + verdict:10s} {first:40s} "
                         f"{dict(others) if others else ''}")
    lines.append("")
    lines.append("confusion (rows: label, columns: verdict; runs)")
    lines.append(f"{'':12s}" + "".join(f"{c:>12s}" for c in VERDICTS))
    for t in LABELS:
        lines.append(f"{t:12s}" + "".join(f"{matrix[(t, c)]:12d}" for c in VERDICTS))
    return "\n".join(lines), matrix


@pytest.mark.slow
@pytest.mark.parametrize("name", [s.name for s in zoo.ZOO if not s.kinds])
def test_healthy_setup_raises_no_alert(results: dict[str, list[zoo.Result]],
                                       name: str) -> None:
    for r in results[name]:
        assert r.setup.steps >= 150
        assert r.alerts == [], f"{name} seed {r.seed}: {[a.message for a in r.alerts]}"
        assert r.final_loss == r.final_loss  # trained to a finite loss


@pytest.mark.slow
@pytest.mark.parametrize("name", [s.name for s in zoo.ZOO if s.kinds])
def test_broken_setup_flagged_at_the_right_layer(results: dict[str, list[zoo.Result]],
                                                 name: str) -> None:
    for r in results[name]:
        found = [(a.kind, a.layer, a.step) for a in r.alerts]
        assert r.hit is not None, f"{name} seed {r.seed}: expected {r.setup.label} at " \
                                  f"{r.setup.layers}, got {found}"
        # the first alert of the run already says what is wrong
        assert r.alerts[0].kind in r.setup.kinds, found


@pytest.mark.slow
def test_nan_midway_names_the_module_within_one_step(
        results: dict[str, list[zoo.Result]]) -> None:
    for r in results["nan_midway"]:
        nonfinite = [a for a in r.alerts if a.kind == "nonfinite"]
        # step = training steps completed: the broken call is step NAN_STEP + 1
        assert [(a.layer, a.step) for a in nonfinite][:1] == [("4", zoo.NAN_STEP + 1)]
        # the layers it spread to (downstream, and upstream once the weights are NaN) are
        # not reported as separate origins
        assert {a.layer for a in nonfinite} == {"4"}


@pytest.mark.slow
def test_rnn_loss_stays_finite_while_flagged(results: dict[str, list[zoo.Result]]) -> None:
    for r in results["tanh_rnn_gain3"]:
        assert r.final_loss < 10.0
        assert r.hit is not None and r.hit.value > 10.0


@pytest.mark.slow
def test_confusion_table(results: dict[str, list[zoo.Result]],
                         capsys: pytest.CaptureFixture[str]) -> None:
    t0 = time.perf_counter()
    table, matrix = confusion(results)
    with capsys.disabled():
        print(f"\n\ngradwatch zoo, default thresholds, every={EVERY}, seeds {zoo.SEEDS}\n"
              f"{table}\n")
    n_runs = sum(len(v) for v in results.values())
    assert sum(matrix.values()) == n_runs
    correct = sum(v for (t, c), v in matrix.items() if t == c)
    assert correct == n_runs, table
    assert time.perf_counter() - t0 < 5
