import math
import os

import pytest

from gradwatch.reader import LogdirError, parse_alerts_markdown, read_logdir
from gradwatch.sinks.tensorboard import alerts_markdown
from tests.support.flowlog import HOSTILE, LAYERS, PARAM_LAYERS, train


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return train(str(tmp_path_factory.mktemp("logs")))


def test_reads_layers_stats_and_alerts_of_a_real_run(written):
    runs = read_logdir(written.logdir)
    assert [r.name for r in runs] == [written.run]
    run = runs[0]
    assert run.layers == LAYERS  # forward order survives the event file
    assert run.steps() == list(range(written.every, written.steps + 1, written.every))
    assert set(run.series["grad_rms"]) == set(PARAM_LAYERS)
    assert run.series["act_zero_frac"][HOSTILE][-1] == (written.steps, 1.0)
    assert written.alerts, "the dead ReLU must raise an alert"
    assert [(a.step, a.layer, a.kind, a.stat) for a in run.alerts] == [
        (a.step, a.layer, a.kind, a.stat) for a in written.alerts]
    assert run.alert_counts["dead"] == sum(a.kind == "dead" for a in written.alerts)
    latest = run.latest()
    assert latest[HOSTILE]["act_zero_frac"] == (written.steps, 1.0)
    assert "grad_rms" not in latest["act"]  # a Tanh has no parameters: absent, not zero
    assert run.alerted()[(HOSTILE, "act_zero_frac")] == written.alerts[0].step


def test_matrix_has_nan_where_nothing_was_written(written):
    layers, steps, values = read_logdir(written.logdir)[0].matrix("grad_rms")
    assert layers == PARAM_LAYERS
    assert len(values) == 3 and all(len(r) == len(steps) for r in values)
    assert all(math.isfinite(v) for r in values for v in r)


def test_markdown_round_trip():
    from gradwatch import Alert

    alerts = [Alert(5, "a.b", "vanishing", "grad_rms", 1e-9, 1e-7, "m"),
              Alert(7, "x", "exploding", "grad_rms", math.inf, 100.0, "m")]
    back = parse_alerts_markdown(alerts_markdown(alerts))
    assert [(b.step, b.layer, b.kind, b.value) for b in back] == [
        (5, "a.b", "vanishing", pytest.approx(1e-9)), (7, "x", "exploding", math.inf)]


def test_missing_empty_and_foreign_logdirs_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(LogdirError, match="nope.*does not exist"):
        read_logdir(missing)
    with pytest.raises(LogdirError, match="no TensorBoard event files"):
        read_logdir(tmp_path)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(os.path.join(tmp_path, "other")) as w:
        w.add_scalar("loss", 1.0, 0)
    with pytest.raises(LogdirError, match="no gradwatch data"):
        read_logdir(tmp_path)


def test_markdown_round_trip_keeps_cause_and_hint_with_markup_in_them():
    from gradwatch import Alert

    hint = "weights of 'a|b*c_' have std [1.00] <b>\\ try nn.init.xavier_uniform_"
    (back,) = parse_alerts_markdown(alerts_markdown(
        [Alert(3, "a", "saturated", "act_sat_frac", 0.6, 0.4, "m", "init_scale", hint)]))
    assert (back.cause, back.hint) == ("init_scale", hint)
    # a log written before alerts carried a cause and a hint
    (old,) = parse_alerts_markdown("| 3 | `a` | dead | act_zero_frac | 1 | 0.99 |")
    assert (old.layer, old.cause, old.hint) == ("a", "unknown", "")
