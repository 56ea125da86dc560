"""The zoo under sampling: ``every=10, sample_every=5`` reads the full stat set on two steps
of each window (the others are light steps: NaN/Inf checks and parameter-gradient norms
only), and every setup still gets the same verdict as with every step read
(``test_zoo.py``): each broken setup flagged with the right kind at the right layer, each
healthy one silent. The causes are never wrong (the update ratios are read on the sampled
steps only, so a learning-rate cause may read as unknown). The tables are printed whether or
not pytest captures output.
"""

from __future__ import annotations

import pytest
import torch
from test_zoo import cause_table, cause_verdict, confusion, diagnosed  # noqa: E402

from tests.support import zoo

EVERY = 10
SAMPLE_EVERY = 5


@pytest.fixture(scope="module")
def sampled() -> dict[str, list[zoo.Result]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {s.name: [zoo.run(s, seed, every=EVERY, sample_every=SAMPLE_EVERY,
                                 keep_snapshots=True) for seed in zoo.SEEDS]
                for s in zoo.ZOO}
    finally:
        torch.set_num_threads(threads)


def test_zoo_verdicts_unchanged_under_sampling(sampled: dict[str, list[zoo.Result]],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    table, matrix = confusion(sampled)
    with capsys.disabled():
        print(f"\n\ngradwatch zoo, default thresholds, every={EVERY}, "
              f"sample_every={SAMPLE_EVERY}, seeds {zoo.SEEDS}\n{table}\n")
    n_runs = sum(len(v) for v in sampled.values())
    assert n_runs == len(zoo.ZOO) * len(zoo.SEEDS)
    for name, runs in sampled.items():
        for r in runs:
            found = [(a.kind, a.layer, a.step) for a in r.alerts]
            if not r.setup.kinds:
                assert found == [], f"{name} seed {r.seed}: {found}"
                assert r.final_loss == r.final_loss
            else:
                assert r.hit is not None, f"{name} seed {r.seed}: expected {r.setup.label} " \
                                          f"at {r.setup.layers}, got {found}"
                assert r.alerts[0].kind in r.setup.kinds, (name, r.seed, found)
            # every window was flushed, two sampled steps each: the snapshots are complete
            assert [s.step for s in r.snapshots] == list(
                range(EVERY, r.setup.steps + 1, EVERY))
    correct = sum(v for (t, c), v in matrix.items() if t == c)
    assert correct == n_runs, table


def test_nan_at_a_light_step_is_named_within_that_step(
        sampled: dict[str, list[zoo.Result]]) -> None:
    # NAN_STEP (57) is window step 7: a light step with sample_every=5
    assert zoo.NAN_STEP % EVERY % SAMPLE_EVERY != 0
    for r in sampled["nan_midway"]:
        nonfinite = [(a.layer, a.step) for a in r.alerts if a.kind == "nonfinite"]
        assert nonfinite == [("4", zoo.NAN_STEP + 1)], nonfinite
        # the window holding the NaN step reports it in its non-finite count
        snap = next(s for s in r.snapshots if s.step > zoo.NAN_STEP)
        assert snap.stats["4"]["nonfinite"] > 0


def test_causes_under_sampling_are_never_wrong(sampled: dict[str, list[zoo.Result]],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    table, _ = cause_table(sampled)
    with capsys.disabled():
        print(f"\n\ngradwatch zoo causes, every={EVERY}, sample_every={SAMPLE_EVERY}\n"
              f"{table}\n")
    verdicts = [cause_verdict(r) for r in diagnosed(sampled)]
    assert "wrong" not in verdicts and "missed" not in verdicts, table
    assert verdicts.count("right") >= len(verdicts) - 2, table
