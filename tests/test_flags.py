"""Per-step non-finite flags: read in the same step on CPU; when the device runs behind
(simulated with events that have not completed), nothing is lost or read early."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from gradwatch.flags import StepFlags


def flags(step_bad: dict[int, float], n: int = 3,
          rms: dict[int, float] | None = None, trace_nan: float = 0.0) -> torch.Tensor:
    """``[n + 1, 3]``: per layer (outputs, gradients, gradient RMS), then the trace's NaN
    count in the last row."""
    t = torch.zeros(n + 1, 3)
    for layer, v in step_bad.items():
        t[layer, 0] = v
    for layer, v in (rms or {}).items():
        t[layer, 2] = v
    t[n, 0] = trace_nan
    return t


def steps(f: StepFlags) -> list[tuple[int, Any]]:
    return [(x.step, x.layers) for x in f.poll()]


def test_cpu_reads_the_step_at_once() -> None:
    f = StepFlags(3, torch.device("cpu"))
    f.push(flags({}), 1)
    assert f.poll() == []
    f.push(flags({1: 2.0}), 2)
    ((step, arr),) = steps(f)
    assert step == 2 and arr[:, 0].tolist() == [0.0, 2.0, 0.0]
    assert f.poll() == []  # read once


def test_a_trace_comes_along_with_its_record_and_is_a_copy() -> None:
    f = StepFlags(2, torch.device("cpu"))
    rows = torch.tensor([1.0, math.nan, 3.0])
    f.push(flags({}, 2, trace_nan=1.0), 7, rows, meta="record of step 7")
    rows.fill_(0.0)  # the next step writes its rows: what was pushed is not touched
    (got,) = f.poll()
    assert (got.step, got.meta, got.trace_nan, got.dropped) == (7, "record of step 7", 1.0,
                                                                False)
    assert got.trace is not None and np.isnan(got.trace[1])
    assert got.trace[[0, 2]].tolist() == [1.0, 3.0]
    # a finite trace with nothing flagged is not handed on; a longer one grows the buffer
    f.push(flags({}, 2), 8, torch.ones(5000), meta="clean")
    assert f.poll() == []


class Clock:
    """Completion of fake device events: an event completes once ``now`` passes it."""

    def __init__(self) -> None:
        self.now = 0
        self.recorded = 0

    def event(self) -> Clock.Event:
        return Clock.Event(self)

    class Event:
        def __init__(self, clock: Clock) -> None:
            self.clock = clock
            self.at = -1

        def record(self) -> None:
            self.clock.recorded += 1
            self.at = self.clock.recorded

        def query(self) -> bool:
            return self.clock.now >= self.at


def test_device_behind_accumulates_and_loses_nothing() -> None:
    clock = Clock()
    f = StepFlags(3, torch.device("cpu"), slots=2, event=clock.event)
    f.push(flags({2: 1.0}), 1)  # copy 1
    f.push(flags({}), 2)  # copy 2
    f.push(flags({0: 4.0}), 3)  # both slots in flight: stays in the accumulator
    f.push(flags({}), 4)
    assert f.poll() == []  # nothing has landed: nothing is read early
    clock.now = 1
    ((step, arr),) = steps(f)
    assert step == 1 and arr[:, 0].tolist() == [0.0, 0.0, 1.0]
    f.push(flags({}), 5)  # a slot is free: steps 3..5 go in one copy
    clock.now = 3
    ((step, arr),) = steps(f)  # copy 2 was clean; copy 3 spans steps 3-5
    assert step == 5 and arr[:, 0].tolist() == [4.0, 0.0, 0.0]
    assert clock.recorded == 3


def test_traces_of_a_span_are_dropped_and_said_so_but_their_nan_counts_add_up() -> None:
    clock = Clock()
    f = StepFlags(1, torch.device("cpu"), slots=1, event=clock.event)
    nan = torch.tensor([math.nan])
    f.push(flags({}, 1), 1, torch.ones(2), meta=1)  # in flight
    f.push(flags({}, 1, trace_nan=1.0), 2, nan, meta=2)  # no slot: accumulated
    f.push(flags({}, 1), 3, torch.ones(2), meta=3)  # lands with the span 2-3
    clock.now = 1
    assert f.poll() == []  # step 1 was clean
    f.push(flags({}, 1), 4, torch.ones(2), meta=4)  # the span 2..4 goes in one copy
    clock.now = 2
    (got,) = f.poll()
    assert (got.step, got.trace_nan, got.dropped, got.meta, got.trace) == (4, 1.0, True,
                                                                           None, None)


def test_oldest_copy_first() -> None:
    clock = Clock()
    f = StepFlags(2, torch.device("cpu"), slots=3, event=clock.event)
    for s in range(1, 4):
        f.push(flags({0: float(s)}, 2), s)
    clock.now = 3
    assert [(s, a[0, 0]) for s, a in steps(f)] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    f.push(flags({1: 7.0}, 2), 4)  # reuses slot 0, is newest
    f.push(flags({1: 8.0}, 2), 5)
    clock.now = 5
    assert [(s, a[1, 0]) for s, a in steps(f)] == [(4, 7.0), (5, 8.0)]


def test_counts_add_up_and_the_gradient_rms_is_the_max_of_the_span() -> None:
    clock = Clock()
    f = StepFlags(2, torch.device("cpu"), slots=1, event=clock.event)
    f.push(flags({}, 2, {0: 1.0}), 1)  # in flight
    f.push(flags({1: 2.0}, 2, {0: 5.0}), 2)  # accumulating
    f.push(flags({1: 3.0}, 2, {0: 4.0}), 3)
    clock.now = 1
    ((step, arr),) = steps(f)
    assert step == 1 and arr.tolist() == [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    f.push(flags({}, 2, {0: 2.0}), 4)
    clock.now = 2
    ((step, arr),) = steps(f)
    assert step == 4 and arr.tolist() == [[0.0, 0.0, 5.0], [5.0, 0.0, 0.0]]
