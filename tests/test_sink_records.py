"""A window's scalar event holds exactly the records that one ``Summary.Value`` per stat
makes: same tags, same order, same fp32 values, NaNs left out, whatever the layer set does
between windows."""

from __future__ import annotations

import math

from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter

from gradwatch.schema import AMP_SKIPPED_TAG, KINDS, alert_count_tag, scalar_tag
from gradwatch.sinks.tensorboard import TensorBoardSink
from gradwatch.snapshot import Snapshot

LONG = "encoder." + "block_with_a_long_name." * 8 + "proj"  # a tag over 127 bytes


def _windows() -> list[Snapshot]:
    first = {"a": {"grad_norm": 1.5, "act_mean": -0.25, "act_std": 0.0},
             "b.c": {"act_std": 2.0, "nonfinite": 0.0},
             LONG: {"grad_rms": 3e-7, "act_mean": math.inf},
             "ünï": {"act_max": -math.inf, "act_zero_frac": 0.125}}
    nan_some = {k: dict(v) for k, v in first.items()}
    nan_some["a"]["act_mean"] = math.nan  # not collected this window
    nan_some[LONG]["grad_rms"] = math.nan
    grown = {**first, "lazy.0": {"grad_norm": 1e39, "act_mean": 1e-46}}  # beyond fp32
    return [Snapshot(10, first, 0), Snapshot(20, nan_some, 2), Snapshot(30, grown, 1),
            Snapshot(40, first, 0)]


def _expected(snap: Snapshot) -> Summary:
    return Summary(value=[Summary.Value(tag=scalar_tag(st, la), simple_value=v)
                          for la, by in snap.stats.items() for st, v in by.items()
                          if not math.isnan(v)]
                   + [Summary.Value(tag=AMP_SKIPPED_TAG, simple_value=float(snap.amp_skipped))]
                   + [Summary.Value(tag=alert_count_tag(k), simple_value=0.0) for k in KINDS])


def test_window_events_are_the_per_value_records(tmp_path):
    snaps = _windows()
    sink = TensorBoardSink(SummaryWriter(str(tmp_path)), owns=True)
    for s in snaps:
        sink.write(s, [])
    sink.close()
    (path,) = tmp_path.glob("events.out.tfevents.*")
    got = {}
    for raw in RawEventFileLoader(str(path)).Load():
        ev = Event.FromString(raw)
        if ev.HasField("summary") and any(v.tag == AMP_SKIPPED_TAG for v in ev.summary.value):
            got[ev.step] = ev.summary
    assert sorted(got) == [s.step for s in snaps]
    for s in snaps:
        assert got[s.step].SerializeToString() == _expected(s).SerializeToString()
    tags = [v.tag for v in got[20].value]
    assert scalar_tag("act_mean", "a") not in tags and scalar_tag("act_std", "a") in tags
    values = {v.tag: v.simple_value for v in got[30].value}
    assert values[scalar_tag("grad_norm", "lazy.0")] == math.inf
    assert values[scalar_tag("act_mean", "lazy.0")] == 0.0
    assert values[scalar_tag("grad_rms", LONG)] == 3.000000106112566e-07  # fp32 of 3e-7
    assert values[AMP_SKIPPED_TAG] == 1.0
