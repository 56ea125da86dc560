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
    # the alert counts follow the stats in the same event (its Summary's bytes extended)
    from gradwatch.sinks.tensorboard import KINDS, alert_count_tag

    for kind in KINDS:
        assert [(e.step, e.value) for e in ea.Scalars(alert_count_tag(kind))] == [(7, 0.0)]


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


def _layers(n: int) -> tuple[list, list]:
    from gradwatch.selection import LayerInfo
    from gradwatch.snapshot import applicable

    infos = [LayerInfo(f"l{i}", "Tanh" if i % 2 else "Linear", i % 2 == 0, i % 2 == 0,
                       (-1.0, 1.0) if i % 2 else None, False) for i in range(n)]
    return infos, [applicable(li, True) for li in infos]


def test_a_built_snapshot_is_summarised_from_its_array_byte_for_byte():
    """``Snapshot.build`` keeps its host array: the sink reads the values from it in one
    read, and writes the bytes the per-layer dicts give (NaN cut, inf kept)."""
    import numpy as np

    from gradwatch.buffers import FINAL_KEYS
    from gradwatch.sinks.tensorboard import _WindowTemplate

    infos, applies = _layers(9)
    rng = np.random.default_rng(0)
    values = rng.standard_normal((9, len(FINAL_KEYS))).astype(np.float32)
    values[2, 3] = np.nan
    values[4, :] = np.nan  # a layer never called this window
    values[5, 0] = np.inf  # an overflowed sum
    order = [3, 1, 0, 2, 5]  # called in this order; 4, 6, 7, 8 never
    snap = Snapshot.build(10, values, infos, order, applies, 1)
    assert list(snap.stats)[:5] == ["l3", "l1", "l0", "l2", "l5"]
    fast = _WindowTemplate().summary(snap.stats, 1.0, snap)
    by_dicts = _WindowTemplate().summary(snap.stats, 1.0)
    assert fast == by_dicts
    # what the proto library makes of the same values: the same bytes
    from tensorboard.compat.proto.summary_pb2 import Summary

    want = Summary(value=[Summary.Value(tag=scalar_tag(k, layer), simple_value=v)
                          for layer, by in snap.stats.items() for k, v in by.items()
                          if not math.isnan(v)]
                   + [Summary.Value(tag="gradwatch/amp_skipped", simple_value=1.0)])
    assert fast == want.SerializeToString()
    # a template reused over windows of another order, then of the first one again
    t = _WindowTemplate()
    for o in (order, order[::-1], order):
        s = Snapshot.build(10, values, infos, o, applies, 1)
        assert t.summary(s.stats, 1.0, s) == _WindowTemplate().summary(s.stats, 1.0)


def test_snapshot_layout_is_made_again_when_the_layers_change():
    import numpy as np

    from gradwatch.buffers import FINAL_KEYS
    from gradwatch.selection import LayerInfo

    infos, applies = _layers(4)
    values = np.arange(4 * len(FINAL_KEYS), dtype=np.float32).reshape(4, -1)
    a = Snapshot.build(1, values, infos, [0, 1, 2, 3], applies)
    b = Snapshot.build(2, values, infos, [0, 1, 2, 3], applies, layout=a.layout)
    assert b.layout is a.layout and b.stats == a.stats
    c = Snapshot.build(3, values, infos, [1, 0, 2, 3], applies, layout=b.layout)
    assert c.layout is not b.layout and list(c.stats) == ["l1", "l0", "l2", "l3"]
    # a lazy module materialised: its LayerInfo replaced in the shared list
    infos[1] = LayerInfo("l1", "Linear", True, True, None, False)
    d = Snapshot.build(4, values, infos, [1, 0, 2, 3], applies, layout=c.layout)
    assert d.layout is not c.layout and "l1" not in d.act_stuck and "l3" in d.act_stuck
    assert d.act_stuck["l3"] == float(values[3, FINAL_KEYS.index("_act_stuck_frac")])


def test_a_built_snapshot_pickles_and_copies():
    """``watcher.latest`` stays a plain value: pickled or deep-copied with its layout (a
    layer of one stat has a getter made in place, which pickle cannot take as it is)."""
    import copy
    import pickle

    import numpy as np

    from gradwatch.buffers import FINAL_KEYS

    infos, applies = _layers(3)
    applies[2] = ("act_mean",)
    values = np.arange(3 * len(FINAL_KEYS), dtype=np.float32).reshape(3, -1)
    snap = Snapshot.build(5, values, infos, [2, 0, 1], applies)
    for other in (pickle.loads(pickle.dumps(snap)), copy.deepcopy(snap)):
        assert other == snap and other.act_stuck == snap.act_stuck
        again = Snapshot.build(6, values, infos, [2, 0, 1], applies, layout=other.layout)
        assert again.stats == snap.stats
