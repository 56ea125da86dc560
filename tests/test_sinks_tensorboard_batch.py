"""The TensorBoard sink writes a window's scalars as one event; TensorBoard reads each back."""

from __future__ import annotations

import math

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

import gradwatch
from gradwatch.sinks.tensorboard import TensorBoardSink, scalar_tag
from gradwatch.snapshot import Snapshot


def test_batched_scalars_read_back(tmp_path):
    snap = Snapshot(7, {"a": {"grad_norm": 1.5, "act_mean": math.nan}, "b.c": {"act_std": 2.0}})
    sink = TensorBoardSink(SummaryWriter(str(tmp_path)), owns=True)
    sink.write(snap, [])
    sink.close()
    ea = EventAccumulator(str(tmp_path))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert scalar_tag("grad_norm", "a") in tags and scalar_tag("act_std", "b.c") in tags
    assert scalar_tag("act_mean", "a") not in tags  # NaN: not collected, not written
    (ev,) = ea.Scalars(scalar_tag("act_std", "b.c"))
    assert (ev.step, ev.value) == (7, 2.0)
    assert [e.value for e in ea.Scalars("gradwatch/amp_skipped")] == [0.0]


class _Recorder:
    """A writer that is not a SummaryWriter: it gets plain add_scalar calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, v: float, step: int) -> None:
        self.calls.append((tag, v, step))

    def add_custom_scalars(self, layout: object) -> None:
        pass

    def add_text(self, *a: object) -> None:
        pass

    def flush(self) -> None:
        pass


def test_other_writers_get_add_scalar():
    rec = _Recorder()
    TensorBoardSink(rec, owns=False).write(Snapshot(3, {"l": {"grad_norm": 0.25}}), [])
    assert (scalar_tag("grad_norm", "l"), 0.25, 3) in rec.calls


def test_watcher_values_match_snapshot(tmp_path):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w = gradwatch.watch(m, optimizer=opt, logdir=tmp_path, every=2)
    for _ in range(4):
        opt.zero_grad()
        m(torch.randn(8, 4)).sum().backward()
        opt.step()
    w.close()
    ea = EventAccumulator(str(tmp_path))
    ea.Reload()
    got = [(e.step, e.value) for e in ea.Scalars(scalar_tag("grad_norm", "0"))]
    assert [s for s, _ in got] == [2, 4]
    assert math.isclose(got[-1][1], w.latest.stats["0"]["grad_norm"], rel_tol=1e-6)
