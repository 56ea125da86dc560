"""Every alert, everywhere: several layers alerting on one step are all logged, read back by
``gradwatch report`` and served by the dashboard of a real TensorBoard process (with and
without ``--samples_per_plugin text=0``), with the count of ``watcher.alerts``; logs of the
previous version are still read; the reader, the plugin and ``gradwatch report`` load no
torch."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.utils.tensorboard import SummaryWriter

import gradwatch
from gradwatch.cli import main
from gradwatch.reader import read_logdir
from gradwatch.schema import ALERT_FIELDS, alerts_markdown, parse_alerts_markdown
from tests.support.tbserver import get_json, tensorboard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def deep_relu(depth: int = 8, std: float = 0.6) -> nn.Sequential:
    """ReLU layers whose weights grow the signal ~2x each: they explode together."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(32, 32)
        nn.init.normal_(lin.weight, 0.0, std)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(32, 1))


def train(logdir: str, steps: int = 30) -> list[gradwatch.Alert]:
    torch.manual_seed(0)
    m = deep_relu()
    opt = torch.optim.SGD(m.parameters(), lr=0.0)  # the weights stay: every window alerts
    with gradwatch.watch(m, optimizer=opt, logdir=logdir, every=2, on_alert="ignore",
                         thresholds={"patience": 1, "rate_limit": 1}) as w:
        for _ in range(steps):
            loss = m(torch.randn(16, 32)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return list(w.alerts)


def key(a: object) -> tuple[object, ...]:
    return tuple(getattr(a, f) if f not in ("value", "threshold") else gradwatch.alerts.fmt(
        getattr(a, f)) for f in ALERT_FIELDS)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    logdir = str(tmp_path_factory.mktemp("deep"))
    alerts = train(os.path.join(logdir, "deep_relu"))
    return logdir, alerts


def test_several_layers_alerting_on_one_step_are_all_read_back(written, capsys):
    logdir, alerts = written
    per_step = collections.Counter(a.step for a in alerts)
    assert max(per_step.values()) >= 8 and len(per_step) > 10  # many on one step, many steps
    (run,) = read_logdir(logdir)
    assert [key(a) for a in run.alerts] == [key(a) for a in alerts]  # every field, in order
    assert sum(run.alert_counts.values()) == len(alerts)
    assert main(["report", logdir, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["alerts"] == len(alerts) == len(data["runs"][0]["alerts"])


@pytest.mark.parametrize("all_texts", [True, False], ids=["text=0", "tensorboard-default"])
def test_dashboard_serves_every_alert_of_a_real_tensorboard(written, tmp_path, all_texts):
    logdir, alerts = written
    with tensorboard(logdir, str(tmp_path), all_texts=all_texts) as url:
        data = get_json(url + "/data/plugin/gradwatch/data?stat=grad_rms")
    (run,) = data["runs"]
    assert run["alert_total"] == len(alerts) and run["missing"] == 0
    got = [(a["step"], a["layer"], a["kind"], a["message"]) for a in run["alerts"]]
    assert got == [(a.step, a.layer, a.kind, a.message) for a in alerts]


def test_dashboard_says_how_many_it_cannot_show(written, tmp_path):
    """Without the flag and without a local logdir to read (``--logdir_spec``) TensorBoard's
    sample is all the plugin has: it says exactly how many alerts are missing, and why."""
    logdir, alerts = written
    with tensorboard(logdir, str(tmp_path), all_texts=False, spec=True) as url:
        data = get_json(url + "/data/plugin/gradwatch/data?stat=grad_rms")
    (run,) = data["runs"]
    shown = [(a["step"], a["layer"], a["message"]) for a in run["alerts"]]
    assert set(shown) <= {(a.step, a.layer, a.message) for a in alerts}
    assert len({s for s, _, _ in shown}) <= 10 < len({a.step for a in alerts})  # a sample
    assert run["alert_total"] == len(alerts)
    assert run["missing"] == len(alerts) - len(shown) > 0
    assert "--samples_per_plugin text=0" in run["missing_why"]


def test_logs_of_the_previous_version_are_read(tmp_path):
    """The previous writer: one 8-column table per write (several writes at one step kept
    only the last), 6 columns before alerts had a cause."""
    path = tmp_path / "old"
    with SummaryWriter(str(path)) as w:
        w.add_scalar("gradwatch/grad_rms/a", 1.0, 2)
        w.add_text("gradwatch/alerts",
                   "| step | layer | kind | stat | value | threshold | cause | hint |\n"
                   "|---:|---|---|---|---:|---:|---|---|\n"
                   "| 2 | `a` | exploding | grad_rms | 2e+03 | 1e+03 | learning_rate | "
                   "lower it \\| now |\n", 2)
        w.add_text("gradwatch/alerts", "| 4 | `a` | dead | act_zero_frac | 1 | 0.99 |", 4)
    (run,) = read_logdir(tmp_path)
    assert [(a.step, a.layer, a.kind, a.value, a.cause, a.hint, a.message)
            for a in run.alerts] == [(2, "a", "exploding", 2000.0, "learning_rate",
                                      "lower it | now", ""),
                                     (4, "a", "dead", 1.0, "unknown", "", "")]


def test_the_alert_table_has_a_column_per_field_and_round_trips():
    a = gradwatch.Alert(3, "h.0|x", "saturated", "act_sat_frac", 0.4234, 0.4,
                        "layer 'h.0': act_sat_frac=0.423 >= 0.4 (*35%* of units)",
                        "init_scale", "try `nn.init.xavier_uniform_` <b>")
    text = alerts_markdown([a])
    assert text.splitlines()[0] == "| " + " | ".join(ALERT_FIELDS) + " |"
    (back,) = parse_alerts_markdown(text)
    assert (back.layer, back.value, back.message, back.hint) == (
        "h.0/x", 0.423, a.message, a.hint)


@pytest.mark.parametrize("code", [
    "import gradwatch.reader, gradwatch.tb_plugin, gradwatch.schema, gradwatch.textreport",
    "from gradwatch.cli import main; main(['report', {logdir!r}, '--json'])",
    "import gradwatch; gradwatch.Alert; gradwatch.GradwatchWarning",
])
def test_reading_a_log_imports_no_torch(written, code):
    logdir, _ = written
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", code.format(logdir=logdir)
                        + "\nimport sys; assert 'torch' not in sys.modules, 'torch imported'"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr


def test_lazy_public_names_resolve_and_are_listed():
    import gradwatch as g

    names = ["watch", "unwatch", "Watcher", "Thresholds", "Snapshot", "Alert",
             "GradientAlertError", "NonFiniteWarning"]
    assert set(names) <= set(dir(g)) and set(g.__all__) <= set(dir(g))
    from gradwatch import Snapshot, Thresholds, watch
    from gradwatch.rules import Thresholds as T
    from gradwatch.watcher import watch as w

    assert Thresholds is T and watch is w and Snapshot.__name__ == "Snapshot"
    with pytest.raises(AttributeError, match="no attribute 'bogus'"):
        g.bogus  # noqa: B018


def test_watcher_alerts_follow_the_steps_whatever_order_the_producers_put_them_in():
    """A window's alerts reach the inbox when the background thread has evaluated it, after
    the per-step alerts of the steps that followed (on a loaded machine, several steps
    later): ``watcher.alerts`` still lists them in the order of their steps, the order of the
    log, with the alerts of one step in the order they were put in."""
    from gradwatch.inbox import AlertInbox

    def alert(step: int, layer: str, kind: str) -> gradwatch.Alert:
        return gradwatch.Alert(step=step, layer=layer, kind=kind, stat="grad_rms",
                               value=1.0, threshold=0.5, message="")

    inbox = AlertInbox("ignore", limit=5, writer=lambda: True)
    inbox.put([alert(4, "0", "exploding")])  # the window of steps 4-5, evaluated at once
    inbox.put([alert(8, "0", "exploding"), alert(8, "2", "exploding")])  # per-step, step 8
    inbox.deliver()
    inbox.put([alert(6, "0", "exploding"), alert(6, "2", "vanishing")])  # window 6-7, late
    assert [(a.step, a.layer, a.kind) for a in inbox.all()] == [
        (4, "0", "exploding"), (6, "0", "exploding"), (6, "2", "vanishing"),
        (8, "0", "exploding"), (8, "2", "exploding")]
    inbox.deliver()
    inbox.put([alert(9, "4", "dead")])  # past the limit of 5: the oldest step goes
    assert [a.step for a in inbox.all()] == [6, 6, 8, 8, 9]
