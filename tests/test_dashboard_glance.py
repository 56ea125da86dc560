"""The dashboard at a glance, in a real TensorBoard (started as a user may start it, without
``--samples_per_plugin``) and the system Chromium: every alert of a run whose layers explode
together, a colour scale per run (or shared), a calm ``nonfinite`` view of a healthy run,
step labels that do not collide, one-line legends, each hint once per cause and folded, runs
that fold."""

from __future__ import annotations

import collections
import os

import pytest

from tests.support import flowlog
from tests.support.chromium import page
from tests.support.dashpage import Dashboard
from tests.support.tbserver import tensorboard
from tests.test_every_alert import train

TOP = "rgb(253, 231, 37)"  # viridis(1): the largest value of a scale
NONE = "rgb(244, 244, 244)"  # a count of 0


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("glance")
    alerts = train(str(logdir / "deep_relu"))
    healthy = flowlog.train(str(logdir), run="healthy", steps=60, every=10,
                            include=["inp", "act", "deep", "out"])
    assert healthy.alerts == []
    return str(logdir), alerts


@pytest.fixture(scope="module")
def dash(logs, tmp_path_factory):
    logdir, _ = logs
    with tensorboard(logdir, str(tmp_path_factory.mktemp("tb")), all_texts=False) as url, \
            page(1280, 1000) as pg:
        d = Dashboard(pg)
        d.open(url)
        yield d
        assert not pg.dialogs


def by_name(seen):
    return {r["run"]: r for r in seen["runs"]}


@pytest.mark.slow
def test_every_alert_listed_without_the_samples_flag(logs, dash):
    _, alerts = logs
    runs = by_name(dash.snapshot())
    deep = runs["deep_relu"]
    assert len(deep["alerts"]) == len(alerts) > 100 and deep["missing"] is None
    assert [(int(a[0]), a[1], a[2]) for a in deep["alerts"]] == [
        (a.step, a.layer, a.kind) for a in alerts]
    per_step = collections.Counter(a.step for a in alerts)
    assert max(per_step.values()) >= 8  # several layers on one step, all listed
    assert set(deep["flagged"]) == {a.layer for a in alerts}
    assert runs["healthy"]["alerts"] == []


@pytest.mark.slow
def test_hints_once_per_cause_folded_and_long_lists_folded(logs, dash):
    _, alerts = logs
    deep = by_name(dash.snapshot())["deep_relu"]
    causes = list(dict.fromkeys((a.kind, a.cause) for a in alerts))
    assert [(w["kind"], w["cause"]) for w in deep["why"]] == causes
    assert not any(w["open"] for w in deep["why"])  # folded under their first sentence
    hint = next(a.hint for a in alerts if a.hint)
    assert [w["hint"] for w in deep["why"]].count(hint) == 1
    text = dash.frame.evaluate(
        "() => document.querySelector(\".gw-run[data-run='deep_relu']\").textContent")
    assert text.count(hint) == 1  # the hint is on the page once, not once per alert
    assert dash.frame.evaluate("""() => document.querySelector(
        ".gw-run[data-run='deep_relu'] .gw-alert-list").open""") is False
    height = dash.frame.evaluate("() => document.documentElement.scrollHeight")
    assert height < 1200, height  # two runs, 135 alerts: one screen


@pytest.mark.slow
def test_colour_scale_per_run_or_shared(dash):
    seen = dash.set_stat("grad_rms")
    runs = by_name(seen)
    assert seen["scale"] == "run" and seen["barLegend"] == []
    assert len(runs["healthy"]["legend"]) == 1 and len(runs["deep_relu"]["legend"]) == 1
    assert runs["healthy"]["legend"] != runs["deep_relu"]["legend"]  # each its own range
    assert TOP in runs["healthy"]["colours"] and TOP in runs["deep_relu"]["colours"]
    seen = dash.set_scale("shared")
    runs = by_name(seen)
    assert len(seen["barLegend"]) == 1 and runs["healthy"]["legend"] == []
    assert TOP not in runs["healthy"]["colours"]  # the exploding run holds the top
    assert TOP in runs["deep_relu"]["colours"]
    dash.set_scale("run")


@pytest.mark.slow
def test_nonfinite_of_a_healthy_run_is_calm(dash):
    runs = by_name(dash.set_stat("nonfinite"))
    healthy = runs["healthy"]
    assert healthy["colours"] == [NONE]
    (legend,) = healthy["legend"]
    assert "every value is 0 (none)" in legend and "1 … 1" not in legend
    dash.set_stat("grad_rms")


@pytest.mark.slow
def test_step_labels_do_not_collide_and_legends_fit(dash):
    seen = dash.set_stat("act_mean")
    for run in seen["runs"]:
        ticks = run["ticks"]
        assert ticks and all(a[2] <= b[1] for a, b in zip(ticks, ticks[1:]))  # no overlap
        assert len(ticks) == run["cells"][0]  # room for a label per column here
    heights = dash.frame.evaluate(
        "() => [...document.querySelectorAll('.gw-legend')].map((e) => e.offsetHeight)")
    assert heights and max(heights) <= 20  # one line each
    rule = dash.frame.evaluate("""async () => {
      const h = await import('/data/plugin/gradwatch/heatmap.js');
      const steps = Array.from({ length: 500 }, (_, i) => 10 * (i + 1));
      return [h.tickColumns(steps, 3), h.tickColumns(steps.slice(0, 8), 40)];
    }""")
    narrow, wide = rule
    assert narrow["every"] in (10, 20, 50) and narrow["cols"][-1] == 499
    gaps = [b - a for a, b in zip(narrow["cols"], narrow["cols"][1:])]
    assert min(gaps) * 3 >= 4 * 6.2  # labels of 4 digits never overlap
    assert wide == {"every": 1, "cols": list(range(8))}
    dash.set_stat("grad_rms")


@pytest.mark.slow
def test_runs_fold_and_stay_folded(dash, tmp_path):
    seen = dash.toggle_run("healthy")
    assert by_name(seen)["healthy"]["open"] is False
    assert by_name(seen)["deep_relu"]["open"] is True
    seen = dash.set_stat("act_std")  # redrawn: the fold is kept
    assert by_name(seen)["healthy"]["open"] is False
    seen = dash.toggle_run("healthy")
    assert by_name(seen)["healthy"]["open"] is True
    dash.set_stat("grad_rms")
    shot = os.path.join(tmp_path, "glance.png")
    dash.screenshot(shot)
    assert os.path.getsize(shot) > 10_000


@pytest.mark.slow
def test_the_dashboard_formats_numbers_as_every_other_view(dash):
    """One number format: the dashboard's fmt gives schema.fmt's text for the same value."""
    from gradwatch.schema import fmt

    values = [0.0, 1.0, -1.0, 0.547, 0.42, 0.99, 1e-7, 1.234e-9, -4.4019e-05, 0.000381,
              0.0001, 0.00099999, 999.5, 1234.5, 2.5e3, 7221.77, 1.1e6, 12345678.0, -0.0058,
              3.14159, 100.0, 0.001]
    got = dash.frame.evaluate("""async (vs) => {
      const c = await import('/data/plugin/gradwatch/colour.js');
      return vs.map((v) => c.fmt(v));
    }""", values)
    assert got == [fmt(v) for v in values]
