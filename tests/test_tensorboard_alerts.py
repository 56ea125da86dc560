"""Alerts in TensorBoard, read back with TensorBoard's own reader: a markdown table under the
text tag ``gradwatch/alerts`` (a column per ``Alert`` field, one event per step holding every
alert of that step) and a running alert count per kind as scalars."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_alerts import dead_net, nan_net, sgd, train_step  # noqa: E402

import gradwatch
from gradwatch.alerts import KINDS
from gradwatch.sinks.tensorboard import alerts_markdown


def load(logdir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def texts(acc: EventAccumulator, tag: str) -> dict[int, str]:
    return {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)}


def counts(acc: EventAccumulator, kind: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(f"gradwatch/alert_count/{kind}")}


def test_window_alerts_as_markdown_and_counts(tmp_path: Path) -> None:
    m = dead_net()
    opt = sgd(m)
    with gradwatch.watch(m, optimizer=opt, logdir=tmp_path, every=2, on_alert="ignore",
                         thresholds={"patience": 1, "rate_limit": 2}) as w:
        for _ in range(8):
            train_step(m, opt)
    assert [a.step for a in w.alerts] == [2, 6]  # rate-limited: windows 1 and 3
    acc = load(tmp_path)
    assert "gradwatch/alerts" in acc.Tags()["tensors"]
    t = texts(acc, "gradwatch/alerts")
    assert set(t) == {2, 6}
    lines = t[2].splitlines()
    assert lines[0] == ("| step | layer | kind | stat | value | threshold | message | cause "
                        "| hint |")
    assert lines[2].startswith("| 2 | `1` | dead | act_zero_frac | 1 | 0.99 | gradwatch: dead ")
    assert t[6].splitlines()[2].startswith("| 6 | `1` | dead | act_zero_frac | 1 | 0.99 | ")
    assert "held back" in w.alerts[1].message
    c = counts(acc, "dead")
    assert c == {2: 1.0, 4: 1.0, 6: 2.0, 8: 2.0}
    for kind in KINDS:
        if kind != "dead":
            assert set(counts(acc, kind).values()) == {0.0}


def test_per_step_nonfinite_alert_reaches_tensorboard(tmp_path: Path) -> None:
    m = nan_net(at=3)
    opt = sgd(m)
    with gradwatch.watch(m, optimizer=opt, logdir=tmp_path, every=100,
                         on_alert="ignore") as w:
        for _ in range(6):
            train_step(m, opt)
    assert [(a.layer, a.step) for a in w.alerts] == [("2", 4)]
    acc = load(tmp_path)
    t = texts(acc, "gradwatch/alerts")
    assert list(t) == [4]
    assert "| 4 | `2` | nonfinite | nonfinite |" in t[4]
    c = counts(acc, "nonfinite")
    assert c[4] == 1.0 and c[max(c)] == 1.0  # the held-back window report is not counted


def test_markdown_escapes_table_characters() -> None:
    a = gradwatch.Alert(3, "a|b`c", "dead", "act_zero_frac", 1.0, 0.99, "m")
    row = alerts_markdown([a]).splitlines()[2]
    assert row == "| 3 | `a/bc` | dead | act_zero_frac | 1 | 0.99 | m | unknown |  |"


def test_alerts_written_at_one_step_in_two_writes_are_one_event_with_both(tmp_path: Path):
    """TensorBoard keeps one event per step and tag: a second write at a step rewrites the
    step's table with every alert of that step."""
    from torch.utils.tensorboard import SummaryWriter

    from gradwatch.reader import read_logdir
    from gradwatch.sinks.tensorboard import TensorBoardSink
    from gradwatch.snapshot import Snapshot

    sink = TensorBoardSink(SummaryWriter(str(tmp_path)), owns=True)
    first = gradwatch.Alert(4, "a", "nonfinite", "nonfinite", 1.0, 0.0, "m1", "input")
    more = [gradwatch.Alert(4, n, "exploding", "grad_rms", 2e3, 1e3, "m", "init_scale")
            for n in ("b", "c")]
    sink.write_alerts([first], 4)  # a per-step alert, then the window at the same step
    sink.write(Snapshot(4, {"a": {"grad_rms": 1.0}}), more)
    sink.write(Snapshot(6, {"a": {"grad_rms": 1.0}}), [])
    sink.close()
    t = texts(load(tmp_path), "gradwatch/alerts")
    assert list(t) == [4] and [r.split(" | ")[1] for r in t[4].splitlines()[2:]] == [
        "`a`", "`b`", "`c`"]
    (run,) = read_logdir(tmp_path)
    assert [(a.step, a.layer, a.message) for a in run.alerts] == [
        (4, "a", "m1"), (4, "b", "m"), (4, "c", "m")]
    assert sum(run.alert_counts.values()) == 3
