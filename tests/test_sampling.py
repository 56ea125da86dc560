"""Sampling: which steps collect the full stat set (*sampled*) and which only check every
watched output for NaN/Inf and measure the parameter-gradient norms (*light*).

Checked against float64 references: the window values are the means over exactly the
sampled steps (parameter-gradient norms: over every step); a NaN at a light step is named
at its origin within that step; an evaluation loop keeps the per-call logs bounded; the
TensorBoard file is flushed at most once per ``FLUSH_SECS`` but at once on ``flush()``.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter

import gradwatch
from gradwatch.alerts import KINDS
from gradwatch.buffers import FOLD_AT, ROW
from gradwatch.sampling import FIRST_STEPS, PERIOD
from gradwatch.sinks import tensorboard as tb_sink
from tests.support.events import event_files, scalars
from tests.support.reference import Float64Reference, close, small_mlp
from tests.support.zoo import NaNAfter

PARAM_EVERY_STEP = ("grad_norm", "grad_rms")  # measured on light steps too


# -- the schedule --------------------------------------------------------------------------------
def schedule(every: int, sample_every: int | str, steps: int,
             flush_after: tuple[int, ...] = ()) -> list[tuple[list[int], list[int]]]:
    """The documented schedule, written out independently: ``(window steps, sampled steps)``
    per window, as 0-based global step indices. A window ends after ``every`` steps or at an
    explicit flush after step count ``flush_after``; its first step is sampled, then one in
    k. ``"auto"``: every step of the first window and of the run's first 100 steps, then
    k = 10, whatever ``every`` is."""
    out: list[tuple[list[int], list[int]]] = []
    cur: list[int] = []
    for g in range(steps):
        cur.append(g)
        if len(cur) == every or g + 1 in flush_after:
            if sample_every == "auto":
                sampled = [g for s, g in enumerate(cur) if not out or g < 100 or s % 10 == 0]
            else:
                sampled = cur[::int(sample_every)]
            out.append((cur, sampled))
            cur = []
    assert not cur, "end the run on a window boundary"
    return out


def test_schedule_written_out() -> None:
    assert (FIRST_STEPS, PERIOD) == (100, 10)
    # "auto", every=50: every step of the first 100, then every 10th
    assert schedule(50, "auto", 150) == [
        (list(range(0, 50)), list(range(0, 50))),
        (list(range(50, 100)), list(range(50, 100))),
        (list(range(100, 150)), list(range(100, 150, 10))),
    ]
    # every step of the first window, however long
    assert schedule(150, "auto", 300) == [
        (list(range(0, 150)), list(range(0, 150))),
        (list(range(150, 300)), list(range(150, 300, 10))),
    ]
    # "auto" samples no more often as `every` falls: every=10 reads one step in 10 after
    # the first 100 steps, as every=100 does; a window shorter than the period gets its
    # first step
    assert [s for _, s in schedule(10, "auto", 130)][9:] == [list(range(90, 100)), [100],
                                                              [110], [120]]
    assert [s for _, s in schedule(100, "auto", 200)] == [list(range(0, 100)),
                                                          list(range(100, 200, 10))]
    assert [s for _, s in schedule(4, "auto", 108)][-3:] == [[96, 97, 98, 99], [100], [104]]
    # an explicit k holds from the first window on
    assert schedule(20, 5, 40)[0][1] == [0, 5, 10, 15]
    # a flush after 4 steps restarts the window: step 4 is its first, sampled
    assert schedule(9, 3, 13, flush_after=(4,)) == [
        ([0, 1, 2, 3], [0, 3]), (list(range(4, 13)), [4, 7, 10])]


def train_windows(every: int, sample_every: int | str, steps: int,
                  flush_after: tuple[int, ...] = ()) -> tuple[Any, list[Any], Any]:
    """Train ``small_mlp`` with a float64 recorder; one Snapshot per window of ``schedule``."""
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref = Float64Reference({n: m for n, m in model.named_modules() if n},
                           bounds={"1": (-1.0, 1.0)})
    w = gradwatch.watch(model, optimizer=opt, tensorboard=False, every=every,
                        sample_every=sample_every)
    windows = schedule(every, sample_every, steps, flush_after)
    ends = {win[-1] + 1 for win, _ in windows}
    snaps = []
    for g in range(steps):
        # inputs drift from step to step: a mean over the wrong steps is visibly different
        ref.train_step(model, opt, torch.randn(32, 6) * (1.0 + 0.1 * (g % 7)))
        if g + 1 in ends:
            if g + 1 not in flush_after:  # the watcher launched this window on its own
                assert w._window_steps == 0, g
            snaps.append(w.flush())  # waits for the background thread
    w.close()
    return windows, snaps, ref


@pytest.mark.parametrize("every,sample_every,steps", [
    (20, "auto", 140),  # every step up to step 99, then steps 0 and 10 of each window
    (35, "auto", 140),  # every step up to step 99, then window steps 0, 10, 20, 30
    (10, "auto", 130),  # every=10: one step in 10 after step 99, not every step
    (6, "auto", 120),  # a window shorter than the period: its first step
    (20, 5, 60),  # explicit k: window steps 0, 5, 10, 15 from the first window on
])
def test_window_stats_are_means_over_exactly_the_sampled_steps(
        every: int, sample_every: int | str, steps: int) -> None:
    windows, snaps, ref = train_windows(every, sample_every, steps)
    assert [s.step for s in snaps] == list(range(every, steps + 1, every))
    discriminated = False
    for (win, sampled), snap in zip(windows, snaps):
        exp_s, exp_all = ref.window(sampled), ref.window(win)
        checked = 0
        for layer, expected in exp_s.items():
            got = snap.stats[layer]
            assert got["nonfinite"] == 0
            for stat, want in expected.items():
                if stat in PARAM_EVERY_STEP:
                    want = exp_all[layer][stat]
                assert close(got[stat], want), (win[0], layer, stat, got[stat], want)
                checked += 1
                if stat not in PARAM_EVERY_STEP and sampled != win:
                    # this window would fail if every step had been read
                    discriminated |= not close(got[stat], exp_all[layer][stat])
        assert checked == 3 * 10 + 6 + 5  # every stat of every layer
    assert discriminated


def test_explicit_flush_mid_window_restarts_the_window() -> None:
    # every=9, k=3, a flush after 4 steps: windows [0..3] -> sampled [0, 3]; [4..12] ->
    # [4, 7, 10] (without the flush, step 4 would be window step 4: a light step)
    windows, snaps, ref = train_windows(9, 3, 13, flush_after=(4,))
    assert [s.step for s in snaps] == [4, 13]
    assert [sampled for _, sampled in windows] == [[0, 3], [4, 7, 10]]
    for (win, sampled), snap in zip(windows, snaps):
        exp_s, exp_all = ref.window(sampled), ref.window(win)
        for layer in ("0", "1", "2", "3", "4"):
            for stat in ("act_mean", "act_std", "act_max", "out_grad_rms"):
                assert close(snap.stats[layer][stat], exp_s[layer][stat]), (win, layer, stat)
        for layer in ("0", "2", "4"):
            for stat in ("grad_norm", "grad_rms"):
                assert close(snap.stats[layer][stat], exp_all[layer][stat]), (win, layer, stat)
            for stat in ("grad_max", "weight_norm", "update_ratio"):
                assert close(snap.stats[layer][stat], exp_s[layer][stat]), (win, layer, stat)
    # step 4 is window step 4 without the flush (a light step for k=3): it was sampled
    with_step_4 = ref.window([4, 7, 10])["0"]["act_mean"]
    without = ref.window([7, 10])["0"]["act_mean"]
    assert close(snaps[1].stats["0"]["act_mean"], with_step_4)
    assert not close(snaps[1].stats["0"]["act_mean"], without)


def test_auto_period_counts_steps_not_windows() -> None:
    # every=20, "auto", a flush after 95 steps: every one of the first 100 steps is read (the
    # window [95..114] on steps 95..99), then one in 10 counted from the window's start
    # (its step 10: 105), whatever the window
    windows, snaps, ref = train_windows(20, "auto", 115, flush_after=(95,))
    assert windows[4] == (list(range(80, 95)), list(range(80, 95)))
    assert windows[5] == (list(range(95, 115)), [95, 96, 97, 98, 99, 105])
    assert [s.step for s in snaps] == [20, 40, 60, 80, 95, 115]
    exp = ref.window([95, 96, 97, 98, 99, 105])
    exp_all = ref.window(list(range(95, 115)))
    differ = 0
    for layer in ("0", "1", "2", "3", "4"):
        for stat in ("act_mean", "act_std", "out_grad_rms"):
            assert close(snaps[5].stats[layer][stat], exp[layer][stat]), (layer, stat)
            differ += not close(snaps[5].stats[layer][stat], exp_all[layer][stat])
    assert differ >= 10  # of 15: a mean over every step of the window is visibly different
    assert close(snaps[5].stats["2"]["grad_norm"], exp_all["2"]["grad_norm"])


# -- NaN at a light step -------------------------------------------------------------------------
class NaNLinear(nn.Linear):
    """A Linear whose output holds one NaN element from its ``at``-th call (0-based) on."""

    def __init__(self, d_in: int, d_out: int, at: int) -> None:
        super().__init__(d_in, d_out)
        self.at = at
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        y = super().forward(x)
        if self.calls > self.at:
            poison = torch.zeros_like(y)
            poison[0, 3] = float("nan")
            y = y + poison
        return y


def linear_then_tanh(at: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), NaNLinear(16, 16, at), nn.Tanh(),
                         nn.Linear(16, 2))


def module_then_inplace_relu(at: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), NaNAfter(16, at),
                         nn.ReLU(inplace=True), nn.Linear(16, 16), nn.ReLU(inplace=True),
                         nn.Linear(16, 2))


def light_checks(w: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The modules that made a NaN/Inf check (one fp32 sum) of a tensor, in order: the
    entries of each record taken that hold a row of their own."""
    seen: list[str] = []
    trace = w._collector.trace
    take = trace.take_record

    def spy() -> Any:
        rec = take()
        seen.extend(w._map.names[rec.by[k]] for k in range(rec.n) if rec.src[k] == k)
        return rec

    monkeypatch.setattr(trace, "take_record", spy)
    return seen


def train_step(m: nn.Module, opt: torch.optim.Optimizer) -> None:
    loss = F.cross_entropy(m(torch.randn(4, 8)), torch.zeros(4, dtype=torch.long))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


@pytest.mark.parametrize("build,checked,skipped", [
    # the batch (at '0', its first module), then each output but the Tanh ones: a Tanh
    # keeps finite inputs finite, its output's state follows from its input's
    (linear_then_tanh, ["0", "0", "2", "4"], {"1", "3"}),
    # the in-place ReLU '3' rewrites the output of '2' (just checked): not checked again
    (module_then_inplace_relu, ["0", "0", "2", "4", "6"], {"1", "3", "5"}),
])
def test_nan_at_a_light_step_is_named_at_its_origin(
        build: Any, checked: list[str], skipped: set[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    at, k = 7, 5  # step index 7 is window step 7: a light step (sampled: 0, 5, 10...)
    assert at % k != 0
    m = build(at)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    got: list[gradwatch.Alert] = []
    w = gradwatch.watch(m, optimizer=opt, tensorboard=False, every=100, sample_every=k,
                        on_alert=got.append)
    seen = light_checks(w, monkeypatch)
    for _ in range(at):
        train_step(m, opt)
    assert got == []
    assert w._collector.full is False  # the next step is a light one
    seen.clear()
    train_step(m, opt)  # the forward of '2' goes NaN
    assert seen == checked and not skipped & set(seen)
    assert [(a.kind, a.layer, a.step) for a in got] == [("nonfinite", "2", at + 1)]
    assert got[0].value >= 1 and "'2'" in got[0].message
    for _ in range(6):  # light and sampled steps with NaN everywhere: no new origin
        train_step(m, opt)
    w.close()
    assert {a.layer for a in got} == {"2"}
    assert w.latest is not None and w.latest.stats["2"]["nonfinite"] > 0


class InplaceBeforeTanh(nn.Module):
    """``lin`` -> an in-place write outside any module (NaN from call ``at`` on) -> Tanh
    module ``act`` -> ``head``. The NaN is born in the root's own forward code: ``lin``'s
    output was finite when made, ``act`` received it already NaN."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 16)
        self.act = nn.Tanh()
        self.head = nn.Linear(16, 2)
        self.at = at
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = self.lin(x)
        if self.calls > self.at:
            h[0, 0] = float("nan")  # in place: the version of lin's output moves by one
        return self.head(self.act(h))


@pytest.mark.parametrize("sample_every", [1, 5])
def test_nan_written_in_place_between_modules_is_named_at_the_code_that_wrote_it(
        sample_every: int) -> None:
    torch.manual_seed(0)
    at = 7
    m = InplaceBeforeTanh(at)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    got: list[gradwatch.Alert] = []
    w = gradwatch.watch(m, optimizer=opt, tensorboard=False, every=100,
                        sample_every=sample_every, on_alert=got.append)
    for _ in range(at + 1):
        train_step(m, opt)
    w.close()
    assert [(a.kind, a.layer, a.step, a.cause) for a in got] == [
        ("nonfinite", "(root)", at + 1, "forward_op")]
    assert "InplaceBeforeTanh" in got[0].message


# -- an evaluation loop --------------------------------------------------------------------------
def test_eval_forwards_keep_the_logs_bounded_and_pool_into_the_next_step(kernels) -> None:
    """Forward calls that no optimizer step ends (evaluation under no_grad) are logged like
    any call of the step in progress and folded into the stage every FOLD_AT calls, so the
    logs stay bounded (the C kernels add each call into the stage at once: no log at all);
    the stage then commits them with the next training step: that step's act stats are
    those of all its forward calls pooled, evaluation included."""
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref = Float64Reference({n: m for n, m in model.named_modules() if n},
                           bounds={"1": (-1.0, 1.0)})
    w = gradwatch.watch(model, optimizer=opt, tensorboard=False, every=100, sample_every=2)
    buf = w._buffers
    calls = 3 * FOLD_AT
    train_out: list[torch.Tensor] = []
    first = model[0].register_forward_hook(
        lambda mod, a, o: train_out.append(o.detach().double()) if o.requires_grad else None)

    trace = w._collector.trace

    def evaluate() -> tuple[int, int]:
        peak_rows = peak_trace = 0
        model.eval()
        with torch.no_grad():
            for _ in range(calls):
                model(torch.randn(4, 6) * 3)  # another distribution than the training data
                assert buf._act_log.shape == (FOLD_AT, ROW)  # preallocated, never grown
                peak_rows = max(peak_rows, len(buf._row_slots))
                # each evaluation forward is checked on its own as it ends: bounded
                peak_trace = max(peak_trace, trace.rec.n, len(trace._ids))
        model.train()
        return peak_rows, peak_trace

    def train() -> None:
        ref.train_step(model, opt, torch.randn(16, 6))

    # step 0 (sampled): the full per-call rows are logged
    rows, entries = evaluate()
    if kernels == "C kernels":
        assert rows == 0 and buf._direct and entries == 0
    else:
        assert 0 < rows < FOLD_AT and entries == 0
    train()
    assert not buf._row_slots and not buf._g_slots  # folded, committed
    # step 1 (light): no per-call rows at all
    assert w._collector.full is False
    rows, entries = evaluate()
    assert rows == 0 and entries == 0
    train()
    snap = w.flush()
    first.remove()
    w.close()
    assert snap is not None and snap.step == 2
    assert len(ref.steps[0]["0"]["act"]) == calls + 1  # the recorder saw the same calls
    exp = ref.window([0])  # step 0: its 3 * FOLD_AT evaluation calls and its training call
    exp_all = ref.window([0, 1])
    for layer in ("0", "1", "2", "3", "4"):
        got = snap.stats[layer]
        for stat in ("act_mean", "act_std", "act_max", "act_zero_frac", "out_grad_rms"):
            assert close(got[stat], exp[layer][stat]), (layer, stat, got[stat],
                                                        exp[layer][stat])
        assert got["nonfinite"] == 0
    assert close(snap.stats["1"]["act_sat_frac"], exp["1"]["act_sat_frac"])
    for layer in ("0", "2", "4"):
        assert close(snap.stats[layer]["grad_norm"], exp_all[layer]["grad_norm"])
        assert close(snap.stats[layer]["weight_norm"], exp[layer]["weight_norm"])
    # the pooled value, not the training forward's own: the eval calls count
    train_only = train_out[0]
    assert not close(snap.stats["0"]["act_std"], train_only.std().item(), rel=0.05)


# -- TensorBoard ---------------------------------------------------------------------------------
class CountingWriter(SummaryWriter):
    """A SummaryWriter that records when it is flushed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.flushes: list[float] = []

    def flush(self) -> None:
        self.flushes.append(time.monotonic())
        super().flush()


def dead_net() -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    with torch.no_grad():
        m[0].bias.fill_(-100.0)  # ReLU '1' is dead: "dead" alerts, rate-limited
    return m


def test_tensorboard_file_flushed_on_a_timer_and_at_once_on_flush(tmp_path) -> None:
    m = dead_net()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    writer = CountingWriter(log_dir=str(tmp_path))
    t0 = time.monotonic()
    w = gradwatch.watch(m, optimizer=opt, writer=writer, every=1, on_alert="ignore",
                        thresholds={"patience": 1, "rate_limit": 4})
    total = done = 0
    try:
        for part in (15, 30):
            for _ in range(part - done):
                train_step(m, opt)
            done = part
            w.flush()  # explicit: a writer flush queued behind every window of the run
            t1 = time.monotonic()
            *timed, forced = writer.flushes
            total += len(writer.flushes)
            # the windows themselves flush at most once per FLUSH_SECS: not once per window
            gaps = [b - a for a, b in zip([t0, *timed], timed)]
            assert all(g >= tb_sink.FLUSH_SECS * 0.999 for g in gaps), gaps
            assert len(timed) <= (t1 - t0) / tb_sink.FLUSH_SECS
            t0 = forced
            writer.flushes.clear()
            # readable now, without close(): every window up to this step
            tb = scalars(tmp_path)
            assert sorted(tb["gradwatch/act_zero_frac/1"]) == list(range(1, part + 1))
            assert tb["gradwatch/act_zero_frac/1"][part] == 1.0
            snap = w.latest
            assert snap is not None and snap.step == part
            for stat, v in snap.stats["0"].items():
                if not math.isnan(v):
                    assert tb[f"gradwatch/{stat}/0"][part] == pytest.approx(v, rel=1e-6)
            # the alert counts of every window: cumulative, per kind
            for kind in KINDS:
                series = tb[f"gradwatch/alert_count/{kind}"]
                assert sorted(series) == list(range(1, part + 1)), kind
                for step, v in series.items():
                    assert v == sum(1 for a in w.alerts if a.kind == kind and a.step <= step)
        dead = [a.step for a in w.alerts if a.kind == "dead"]
        assert dead[:2] == [1, 5] and len(dead) >= 5  # there were counts to write
        assert tb["gradwatch/alert_count/dead"][30] == len(dead)
        assert total < 30  # 30 windows
    finally:
        w.close()
        writer.close()
    assert len(event_files(tmp_path)) == 1


def test_explicit_flush_of_a_partial_window_is_readable_without_close(tmp_path) -> None:
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = CountingWriter(log_dir=str(tmp_path))
    w = gradwatch.watch(model, optimizer=opt, writer=writer, every=4)
    try:
        for _ in range(6):
            loss = model(torch.randn(8, 6)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        t = time.monotonic()
        snap = w.flush()  # steps 5-6: a window of two steps, written and flushed at once
        assert snap is not None and snap.step == 6
        assert writer.flushes and writer.flushes[-1] >= t
        tb = scalars(tmp_path)
        assert sorted(tb["gradwatch/act_std/2"]) == [4, 6]
        assert tb["gradwatch/act_std/2"][6] == pytest.approx(snap.stats["2"]["act_std"],
                                                             rel=1e-6)
        assert sorted(tb["gradwatch/alert_count/nonfinite"]) == [4, 6]
    finally:
        w.close()
        writer.close()


def test_windows_flush_the_file_once_per_flush_secs(tmp_path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # a shorter period and slow steps, so that the timer fires within the test
    period = 0.05
    monkeypatch.setattr(tb_sink, "FLUSH_SECS", period)
    m = dead_net()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    writer = CountingWriter(log_dir=str(tmp_path))
    t0 = time.monotonic()
    w = gradwatch.watch(m, optimizer=opt, writer=writer, every=1, on_alert="ignore")
    try:
        for _ in range(30):
            train_step(m, opt)
            time.sleep(0.01)
        w.flush()
        t1 = time.monotonic()
    finally:
        w.close()
        writer.close()
    *timed, forced = writer.flushes[:-1]  # the last one: close()
    gaps = [b - a for a, b in zip([t0, *timed], timed)]
    assert timed and all(g >= period * 0.999 for g in gaps), gaps
    assert len(timed) <= (t1 - t0) / period < 30
    assert forced <= t1


@pytest.mark.parametrize("sample_every", [1, 2])
def test_inference_mode_forwards_between_steps(sample_every: int) -> None:
    """Outputs made under torch.inference_mode have no version counter: light steps must
    not rely on one (that part of the watcher once switched itself off here)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        w = gradwatch.watch(m, optimizer=opt, tensorboard=False, every=4,
                            sample_every=sample_every)
        for _ in range(8):
            with torch.inference_mode():
                m(torch.randn(3, 4))
            opt.zero_grad()
            m(torch.randn(3, 4)).sum().backward()
            opt.step()
        w.close()
    faults = [str(r.message) for r in rec if issubclass(r.category, gradwatch.GradwatchWarning)]
    assert faults == []
    assert w.latest is not None and w.latest.step == 8
    for layer in ("0", "1", "2"):
        assert math.isfinite(w.latest.stats[layer]["act_mean"])
    assert 0.0 <= w.latest.stats["1"]["act_sat_frac"] <= 1.0
