"""The zoo under default thresholds: every broken setup flagged with the right kind at the
right layer, every healthy one silent over 160 steps, for two seeds each; and the cause
each alert gives (right, wrong or unknown), non-finite cases included.

The confusion tables are printed whether or not pytest captures output.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter

import pytest
import torch

from gradwatch.alerts import KINDS  # noqa: E402
from tests.support import zoo

EVERY = 10
LABELS = ("healthy", *KINDS)
VERDICTS = (*LABELS, "wrong layer")
#: Causes given by the non-finite origin detector (issue 12), not by the diagnosis here.
NONFINITE_CAUSES = ("forward_op", "backward_op", "parameters", "input")


def run_all(setups: tuple[zoo.Setup, ...]) -> dict[str, list[zoo.Result]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out: dict[str, list[zoo.Result]] = {}
        for s in setups:
            out[s.name] = [zoo.run(s, seed, every=EVERY) for seed in zoo.SEEDS]
        return out
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def results() -> dict[str, list[zoo.Result]]:
    return run_all(zoo.ZOO)


@pytest.fixture(scope="module")
def nonfinite() -> dict[str, list[zoo.Result]]:
    with warnings.catch_warnings():  # the NaN loss of some of them is what they are about
        warnings.simplefilter("ignore", UserWarning)
        return run_all(zoo.NONFINITE_ZOO)


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


# -- causes ------------------------------------------------------------------------------------
def cause_verdict(r: zoo.Result) -> str:
    """right / wrong / unknown for the cause of the alert matching the label; "missed"
    when no alert matches (the tests above say why)."""
    hit = r.hit
    if hit is None:
        return "missed"
    if hit.cause == r.setup.cause:
        return "right"
    return "unknown" if hit.cause == "unknown" else "wrong"


def cause_table(results: dict[str, list[zoo.Result]]) -> tuple[str, Counter[tuple[str, str]]]:
    """Per broken setup and seed: the expected cause, the cause of the first matching
    alert and the verdict; then per case the count of right / wrong / unknown."""
    lines = [f"{'case':24s} {'seed':>4s} {'expected cause':15s} {'given':15s} verdict  "
             f"first matching alert"]
    per_case: Counter[tuple[str, str]] = Counter()
    for name, runs in results.items():
        for r in runs:
            if not r.setup.kinds:
                continue
            v = cause_verdict(r)
            per_case[(name, v)] += 1
            hit = r.hit
            given = hit.cause if hit is not None else "-"
            at = f"{hit.kind}@{hit.layer} step {hit.step}" if hit else "-"
            lines.append(f"{name:24s} {r.seed:4d} {r.setup.cause or '':15s} {given:15s} "
                         f"{v:8s} {at}")
    lines.append("")
    lines.append(f"{'case':24s} {'expected cause':15s} {'right':>6s} {'wrong':>6s} "
                 f"{'unknown':>8s} {'missed':>7s}")
    for name, runs in results.items():
        if not runs[0].setup.kinds:
            continue
        lines.append(f"{name:24s} {runs[0].setup.cause or '':15s} "
                     + "".join(f"{per_case[(name, v)]:>{w}d}"
                               for v, w in (("right", 7), ("wrong", 7), ("unknown", 9),
                                            ("missed", 8))))
    return "\n".join(lines), per_case


def diagnosed(results: dict[str, list[zoo.Result]]) -> list[zoo.Result]:
    """The runs of the cases whose cause the diagnosis gives (not a non-finite origin)."""
    return [r for runs in results.values() for r in runs
            if r.setup.kinds and r.setup.cause not in NONFINITE_CAUSES]


@pytest.mark.slow
def test_cause_table(results: dict[str, list[zoo.Result]],
                     nonfinite: dict[str, list[zoo.Result]],
                     capsys: pytest.CaptureFixture[str]) -> None:
    table, _ = cause_table({**results, **nonfinite})
    with capsys.disabled():
        print(f"\n\ngradwatch zoo causes, every={EVERY}, seeds {zoo.SEEDS}\n{table}\n")
    runs = diagnosed(results)
    assert len(runs) == 2 * 7  # init too large (2 cases), too small, recurrent gain,
    # learning rate too high, dead from a shifted bias, killed by a learning-rate spike
    origins = [r for runs_ in nonfinite.values() for r in runs_] + results["nan_midway"]
    assert len(origins) == 2 * 8  # the non-finite origins, with the causes of API.md
    every = runs + origins
    assert [cause_verdict(r) for r in every] == ["right"] * len(every), table


@pytest.mark.slow
def test_no_alert_gives_a_wrong_cause(results: dict[str, list[zoo.Result]]) -> None:
    """Every alert of the diagnosed cases, not only the first matching one: its cause is
    the labelled one or unknown (non-finite alerts get theirs from the origin detector)."""
    for r in diagnosed(results):
        for a in r.alerts:
            if a.kind != "nonfinite":
                assert a.cause in (r.setup.cause, "unknown"), (r.setup.name, r.seed, a)
                assert a.hint or a.cause == "unknown", a
            if a.cause != "unknown":
                assert a.hint, a


@pytest.mark.slow
def test_hints_carry_the_measured_numbers(results: dict[str, list[zoo.Result]]) -> None:
    for r in results["sigmoid_normal_init"]:
        assert r.hit is not None
        # the Linear before the sigmoid, its init std against the Glorot std for 64 -> 64
        before = str(int(r.hit.layer) - 1)
        assert f"weights of '{before}' had std " in r.hit.hint
        assert "the Glorot std 0.125 for 64 -> 64 before a Sigmoid" in r.hit.hint
        assert "flat beyond about ±4.6" in r.hit.hint and "xavier_uniform_" in r.hit.hint
    for r in results["tanh_rnn_gain3"]:
        assert r.hit is not None and "'rnn.weight_hh_l0' had gain 3 " in r.hit.hint
    for r in results["relu_negative_bias"]:
        assert r.hit is not None and "the bias of '4' had mean -20 at watch()" in r.hit.hint
    for r in results["relu_lr_spike"]:
        assert r.hit is not None and "learning-rate spike" in r.hit.hint


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nan_midway", *(s.name for s in zoo.NONFINITE_ZOO)])
def test_nonfinite_origin_and_cause(results: dict[str, list[zoo.Result]],
                                    nonfinite: dict[str, list[zoo.Result]], name: str) -> None:
    for r in {**results, **nonfinite}[name]:
        found = [(a.kind, a.layer, a.step, a.cause) for a in r.alerts]
        assert r.hit is not None and r.alerts[0] is r.hit, found
        assert r.hit.cause == r.setup.cause, found
