"""Jupyter: a real IPython shell re-runs the cell that calls ``watch()`` and displays the
watcher as HTML (``_repr_html_``)."""

from __future__ import annotations

import math
import warnings
from html import escape
from typing import Any, Iterator

import pytest

import gradwatch
from gradwatch.sinks.notebook import html_report
from gradwatch.snapshot import Snapshot
from tests.support.events import scalars
from tests.support.hookstate import hook_state

IPython = pytest.importorskip("IPython")
from IPython.core.interactiveshell import InteractiveShell  # noqa: E402

EVIL = "<img src=x onerror=alert(1)>"

SETUP = f"""
import torch, torch.nn as nn
import gradwatch
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
model.add_module({EVIL!r}, nn.Tanh())
nn.init.constant_(model[0].bias, -100.0)  # every ReLU unit dead: an alert
opt = torch.optim.SGD(model.parameters(), lr=0.1)
"""
TRAIN = """
for _ in range(10):
    loss = model(torch.randn(4, 4)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
"""


@pytest.fixture
def shell() -> Iterator[Any]:
    sh = InteractiveShell.instance()
    try:
        yield sh
    finally:
        sh.run_cell("gradwatch.unwatch(model)")
        InteractiveShell.clear_instance()


def run(shell: Any, cell: str) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = shell.run_cell(cell)
    assert result.success, result.error_in_exec or result.error_before_exec
    return caught


def test_rerunning_the_watch_cell_replaces_the_watcher(shell, tmp_path):
    run(shell, SETUP)
    ns = shell.user_ns
    before = hook_state(ns["model"], (ns["opt"],))
    cell = f"w = gradwatch.watch(model, logdir={str(tmp_path / 'a')!r}, every=5, on_alert='ignore')"
    assert not [c for c in run(shell, cell) if issubclass(c.category, UserWarning)]
    once = hook_state(ns["model"], (ns["opt"],))
    run(shell, TRAIN)
    first = ns["w"]
    cell = cell.replace("'a'", "'b'").replace(str(tmp_path / "a"), str(tmp_path / "b"))
    caught = run(shell, cell)  # the same cell, run again
    assert [str(c.message) for c in caught if c.category is UserWarning
            and "already watched" in str(c.message)]
    assert "closed" in repr(first) and ns["w"] is not first
    assert first.latest is not None and first.latest.step == 10
    assert hook_state(ns["model"], (ns["opt"],)) == once != before  # no hook piled up
    assert sorted(scalars(tmp_path / "a")["gradwatch/grad_norm/0"]) == [5, 10]
    run(shell, TRAIN)
    run(shell, "gradwatch.unwatch(model)")
    assert hook_state(ns["model"], (ns["opt"],)) == before
    assert sorted(scalars(tmp_path / "b")["gradwatch/grad_norm/0"]) == [5, 10]


def test_watcher_displays_as_html(shell):
    run(shell, SETUP)
    run(shell, "w = gradwatch.watch(model, tensorboard=False, every=5, on_alert='ignore')")
    run(shell, TRAIN)
    w = shell.user_ns["w"]
    data, _ = shell.display_formatter.format(w)
    html = data["text/html"]
    assert html == w._repr_html_()
    assert "step 10" in html and EVIL not in html and "&lt;img src=x" in html
    rows = {r.split("</code>")[0]: r for r in html.split("<tr><td><code>")[1:]}
    assert set(rows) == {"0", "1", "2", "&lt;img src=x onerror=alert(1)&gt;"}
    # the dead ReLU's zero fraction is the marked cell, with its value
    assert rows["1"].count('class="alerted"') == 1
    marked = rows["1"].split('class="alerted"')[1]
    assert 'title="dead"' in marked and ">1!</td>" in marked
    assert 'class="alerted"' not in rows["0"] + rows["2"]
    dead = next(a for a in w.alerts if a.kind == "dead")
    assert f"<td>{dead.cause}</td><td>{escape(dead.hint)}</td>" in html
    assert escape(dead.message) in html
    assert w.report().count("1!") == 1  # the text report marks the same cell


def test_html_escapes_every_name_and_text():
    snap = Snapshot(7, {"<b>x</b>": {"grad_rms": 1e-9, "act_mean": math.nan}})
    alert = gradwatch.Alert(7, "<b>x</b>", "vanishing", "grad_rms", 1e-9, 1e-7,
                            "msg <script>", cause="init_scale",
                            hint="use <code>nn.init.xavier_uniform_</code> & retry")
    html = html_report(snap, [alert], {"<b>x</b>": "My<Layer>"}, title="t <i>")
    for raw in ("<b>x</b>", "<script>", "<code>nn", "My<Layer>", "t <i>"):
        assert raw not in html
    assert "&lt;b&gt;x&lt;/b&gt;" in html and "My&lt;Layer&gt;" in html
    assert "use &lt;code&gt;nn.init.xavier_uniform_&lt;/code&gt; &amp; retry" in html
    assert 'title="vanishing">1e-09!</td>' in html and ">nan</td>" in html
    assert html_report(None, [], {}).endswith("nothing flushed yet</p></div>")


def test_plain_module_still_trains_after_display(shell):
    """Displaying reads the watcher only: training goes on with the same watcher."""
    run(shell, SETUP)
    run(shell, "w = gradwatch.watch(model, tensorboard=False, every=5, on_alert='ignore')")
    run(shell, TRAIN)
    w = shell.user_ns["w"]
    shell.display_formatter.format(w)
    run(shell, TRAIN)
    assert w.latest is not None and w.latest.step == 20


def test_report_says_why_nothing_is_there_when_no_step_ends():
    """Forward and backward passes with no optimizer step and no ``watcher.step()``: the
    report and the notebook view say why nothing was flushed, not just that nothing was."""
    import torch
    import torch.nn as nn

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    w = gradwatch.watch(model, tensorboard=False, every=5)
    try:
        assert w.report() == "gradwatch: nothing flushed yet"  # nothing ran: nothing to say
        for _ in range(3):
            model(torch.randn(2, 4)).sum().backward()
        assert w.latest is None
        text = w.report()
        assert text.startswith("gradwatch: nothing flushed yet: gradwatch: 3 training forward "
                               "pass(es) of the watched model and no training step")
        assert "watcher.step() was not called" in text
        html = w._repr_html_()
        assert ": nothing flushed yet: gradwatch: 3 training forward pass(es)" in html
    finally:
        with pytest.warns(UserWarning, match="3 training forward pass"):
            w.close()  # what was collected is written as one step, with the same advice
    assert w.latest is not None and w.latest.step == 1
