"""Fault isolation: a failure inside gradwatch during training is reported once as a
GradwatchWarning naming the stage and the layer, that part switches itself off, the rest
keeps collecting, and the training itself is bit-identical to an unwatched run.

Faults are injected by making one gradwatch internal raise (monkeypatch)."""

from __future__ import annotations

import copy
import errno
import math
import warnings
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
from torch.utils.tensorboard import SummaryWriter

import gradwatch
import gradwatch.batched
import gradwatch.cpukernels
import gradwatch.engine as engine
import gradwatch.hooks
import gradwatch.stats
import gradwatch.stepping
import gradwatch.trace
from gradwatch.buffers import WindowBuffers
from gradwatch.params import ParamTracker
from gradwatch.rules import Rules
from gradwatch.snapshot import Snapshot

torch.set_num_threads(1)
STEPS = 12
EVERY = 4


class Boom(RuntimeError):
    pass


def boom(*args: Any, **kwargs: Any) -> Any:
    raise Boom("injected")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 1))


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 8, generator=g), torch.randn(5, 1, generator=g))
            for _ in range(STEPS)]


def train(model: nn.Module, watch_kw: dict[str, Any] | None,
          on_step: Callable[[gradwatch.Watcher], None] | None = None,
          ) -> tuple[list[torch.Tensor], list[torch.Tensor], gradwatch.Watcher | None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    w = None
    if watch_kw is not None:
        w = gradwatch.watch(model, optimizer=opt, every=EVERY, **watch_kw)
    losses = []
    for x, y in batches():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
        if on_step is not None and w is not None:
            on_step(w)
    return losses, [p.detach().clone() for p in model.parameters()], w


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def run_with_fault(kw: dict[str, Any] | None = None,
                   on_step: Callable[[gradwatch.Watcher], None] | None = None,
                   ) -> tuple[gradwatch.Watcher, list[warnings.WarningMessage]]:
    """Train unwatched and watched (with the fault already injected); the training must be
    bit-identical. Returns the closed watcher and gradwatch's internal-error warnings."""
    base = make_model()
    ref_losses, ref_params, _ = train(copy.deepcopy(base), None)
    kw = {"tensorboard": False, "on_alert": "ignore", **(kw or {})}
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        losses, params, w = train(base, kw, on_step)
        assert w is not None
        w.close()
    for a, b in zip(ref_losses + ref_params, losses + params):
        assert torch.equal(bits(a), bits(b))
    faults = [r for r in rec if issubclass(r.category, gradwatch.GradwatchWarning)
              and "internal error" in str(r.message)]
    return w, faults


def one_fault(faults: list[warnings.WarningMessage], stage: str, layer: str) -> str:
    assert len(faults) == 1, [str(f.message) for f in faults]
    msg = str(faults[0].message)
    assert f"internal error in the {stage} " in msg, msg
    assert layer in msg and "Boom: injected" in msg and "switched off" in msg, msg
    return msg


def finite(snap: Snapshot | None, stat: str) -> dict[str, bool]:
    assert snap is not None
    return {n: math.isfinite(s[stat]) for n, s in snap.stats.items() if stat in s}


def test_no_fault_baseline() -> None:
    w, faults = run_with_fault()
    assert faults == []
    assert all(finite(w.latest, "act_mean").values())
    assert all(finite(w.latest, "grad_norm").values())
    assert all(finite(w.latest, "out_grad_rms").values())


@pytest.mark.parametrize("path", ["kernel", "batched", "one at a time"])
def test_activation_statistics_fault(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    # on CPU a float32 output is reduced in its hook by one C call (cpukernels.py); where
    # the kernels do not apply, small outputs are reduced together at the end of the
    # forward pass (batched.py), a large one (or any with histograms on) in its hook
    if path == "kernel":
        monkeypatch.setattr(gradwatch.cpukernels, "act_row", boom)
    else:
        monkeypatch.setattr(gradwatch.cpukernels, "_kernels", None)
    if path == "batched":
        monkeypatch.setattr(gradwatch.batched.ActBatch, "_rows", boom)
    elif path == "one at a time":
        monkeypatch.setattr(gradwatch.batched.ActBatch, "add", lambda *a: False)
        monkeypatch.setattr(gradwatch.stats, "activation_parts", boom)
    w, faults = run_with_fault()
    one_fault(faults, "activation statistics",
              "all layers" if path == "batched" else "layer '0'")
    snap = w.latest
    assert snap is not None and snap.step == STEPS
    assert not any(finite(snap, "act_mean").values())  # switched off
    assert all(finite(snap, "grad_norm").values())  # kept
    assert all(finite(snap, "weight_norm").values())
    assert all(finite(snap, "update_ratio").values())
    assert all(finite(snap, "out_grad_rms").values())  # the out-grad hooks still placed


def test_nonfinite_trace_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    # every module's outputs get a cheap non-finite check (their sum) on every step: a
    # failure there switches the trace off, and the statistics go on
    monkeypatch.setattr(gradwatch.trace.StepTrace, "_check", boom)
    w, faults = run_with_fault({"sample_every": 2})
    one_fault(faults, "non-finite trace", "all layers")
    assert all(finite(w.latest, "grad_norm").values())
    assert all(finite(w.latest, "act_mean").values())


def test_forward_hook_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gradwatch.hooks, "float_leaves", boom)
    w, faults = run_with_fault()
    one_fault(faults, "forward hook", "layer '0'")
    assert not any(finite(w.latest, "act_mean").values())
    assert not any(finite(w.latest, "out_grad_rms").values())
    assert all(finite(w.latest, "grad_norm").values())  # parameter stats kept


@pytest.mark.parametrize("path", ["kernel", "batched", "one at a time"])
def test_output_gradient_hook_fault(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    if path == "kernel":
        monkeypatch.setattr(gradwatch.cpukernels, "sq_row", boom)
    else:
        monkeypatch.setattr(gradwatch.cpukernels, "_kernels", None)
    if path == "batched":
        monkeypatch.setattr(gradwatch.batched.GradBatch, "flush", boom)
    elif path == "one at a time":
        monkeypatch.setattr(gradwatch.batched.GradBatch, "add", lambda *a: False)
        monkeypatch.setattr(gradwatch.stats, "grad_sq_sum", boom)
    w, faults = run_with_fault()
    # the backward pass meets the last layer first
    one_fault(faults, "output-gradient hook", "all layers" if path == "batched"
              else "layer '4'")
    assert not any(finite(w.latest, "out_grad_rms").values())
    assert all(finite(w.latest, "act_mean").values())
    assert all(finite(w.latest, "grad_norm").values())


def test_output_gradient_hook_placement_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gradwatch.hooks, "OutGradHook", boom)
    w, faults = run_with_fault()
    one_fault(faults, "output-gradient hook", "layer '0'")
    assert all(finite(w.latest, "act_mean").values())


@pytest.mark.parametrize("what,method,lost,kept", [
    ("grad", "grad_stats", "grad_norm", "weight_norm"),
    ("weight", "weight_norms", "weight_norm", "grad_norm"),
    ("update", "update_ratios", "update_ratio", "grad_norm"),
    ("before", "before_update", "update_ratio", "weight_norm"),
])
def test_parameter_statistics_fault(monkeypatch: pytest.MonkeyPatch, what: str, method: str,
                                    lost: str, kept: str) -> None:
    calls = []

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        raise Boom("injected")

    monkeypatch.setattr(ParamTracker, method, failing)
    w, faults = run_with_fault()
    one_fault(faults, f"parameter statistics ({what})", "all layers")
    assert len(calls) == 1  # switched off: not retried every step
    assert not any(finite(w.latest, lost).values())
    assert all(finite(w.latest, kept).values())
    assert all(finite(w.latest, "act_mean").values())


def test_step_commit_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(WindowBuffers, "commit_step", boom)
    w, faults = run_with_fault()
    one_fault(faults, "step commit", "all layers")
    assert w.latest is not None and w.latest.step == STEPS  # windows still flushed
    assert not any(finite(w.latest, "grad_norm").values())


def test_flush_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing(window: Any) -> Any:
        calls.append(1)
        raise Boom("injected")

    # the window's copy to the host, on the training thread
    monkeypatch.setattr(engine, "HostCopy", failing)
    w, faults = run_with_fault()
    one_fault(faults, "flush", "all layers")
    assert len(calls) == 1 and w.latest is None
    assert w._step == STEPS


def test_rules_fault(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(Rules, "evaluate", boom)
    w, faults = run_with_fault({"tensorboard": True, "logdir": tmp_path})
    one_fault(faults, "rules", "all layers")
    # the windows are still written
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("gradwatch/grad_norm/0")]
    assert steps == [4, 8, 12]


def test_nonfinite_check_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Rules, "nonfinite_now", boom)
    base = make_model()
    with torch.no_grad():
        base[2].weight[0, 0] = math.inf  # every step has non-finite values
    seen: list[gradwatch.Alert] = []
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        w = gradwatch.watch(base, every=EVERY, tensorboard=False, on_alert=seen.append)
        for x, y in batches():  # no update: the inf stays where it is
            base.zero_grad()
            ((base(x) - y) ** 2).mean().backward()
            w.step()
        w.close()
    faults = [r for r in rec if "internal error" in str(r.message)]
    one_fault(faults, "non-finite flags", "all layers")
    # the window rules still report it, at the layer where it started
    assert seen and seen[0].kind == "nonfinite" and seen[0].layer == "2"


def test_background_writer_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Snapshot, "build", boom)
    w, faults = run_with_fault()
    one_fault(faults, "background writer", "all layers")


class FullDisk(SummaryWriter):
    """A real SummaryWriter on a disk that fills up after ``ok`` records written."""

    def __init__(self, logdir: str, ok: int) -> None:
        super().__init__(logdir)
        self.ok = ok
        self.calls = 0

    def _get_file_writer(self) -> Any:
        real = super()._get_file_writer()
        outer = self

        class Filling:
            def add_summary(self, *args: Any, **kwargs: Any) -> None:
                outer.calls += 1
                if outer.calls > outer.ok:
                    raise OSError(errno.ENOSPC, "No space left on device")
                real.add_summary(*args, **kwargs)

            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

        return Filling()


def test_sink_disk_full(tmp_path) -> None:
    base = make_model()
    ref_losses, _, _ = train(copy.deepcopy(base), None)
    writer = FullDisk(str(tmp_path), ok=4)  # full in the second window
    alerts: list[gradwatch.Alert] = []
    th = {"vanishing_rms": 10.0, "patience": 1, "rate_limit": 1}  # an alert every window
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        losses, _, w = train(base, {"writer": writer, "on_alert": alerts.append,
                                    "thresholds": th})
        assert w is not None
        w.close()
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(ref_losses, losses))
    faults = [r for r in rec if "internal error" in str(r.message)]
    assert len(faults) == 1
    msg = str(faults[0].message)
    assert "TensorBoard sink" in msg and "No space left on device" in msg
    assert writer.calls == writer.ok + 1  # switched off after the first failure
    # the rest keeps working: snapshots and alerts of every window
    assert w.latest is not None and w.latest.step == STEPS
    assert sorted({a.step for a in alerts}) == [4, 8, 12]
    writer.close()


class FullDiskOnFlush(SummaryWriter):
    def flush(self) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_sink_disk_full_at_close(tmp_path) -> None:
    writer = FullDiskOnFlush(str(tmp_path))
    w, faults = run_with_fault({"tensorboard": True, "writer": writer})
    assert len(faults) == 1 and "TensorBoard sink" in str(faults[0].message)
    assert w.latest is not None and w.latest.step == STEPS


def test_pictures_fault(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from gradwatch.sinks.pictures import Pictures

    monkeypatch.setattr(Pictures, "write", boom)
    w, faults = run_with_fault({"tensorboard": True, "logdir": tmp_path, "histograms": True})
    one_fault(faults, "TensorBoard pictures", "all layers")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("gradwatch/grad_norm/0")] == [4, 8, 12]


def test_only_raise_stops_training() -> None:
    base = make_model()
    th = {"vanishing_rms": 10.0, "patience": 1}
    with pytest.raises(gradwatch.GradientAlertError) as e:
        _, _, w = train(base, {"tensorboard": False, "on_alert": "raise", "thresholds": th})
        assert w is not None
        w.flush()  # (the window's rules run off the training thread: flush waits for them)
    assert e.value.alert.kind == "vanishing" and e.value.alert.step == EVERY
    # the raise left it watching (its global optimizer hooks too): close it, which flushes
    # and raises the next alert of the same kind
    with pytest.raises(gradwatch.GradientAlertError, match="vanishing"):
        gradwatch.unwatch(base)


def test_fault_under_warnings_as_errors(monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    """With warnings turned into errors (``-W error``), a fault is logged instead: it still
    does not stop the training."""
    monkeypatch.setattr(gradwatch.cpukernels, "act_row", boom)
    monkeypatch.setattr(Rules, "evaluate", boom)  # a deferred one, from the worker
    base = make_model()
    ref_losses, _, _ = train(copy.deepcopy(base), None)
    with warnings.catch_warnings(), caplog.at_level("WARNING", logger="gradwatch"):
        warnings.simplefilter("error")
        losses, _, w = train(base, {"tensorboard": False, "on_alert": "ignore"})
        assert w is not None
        w.close()
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(ref_losses, losses))
    logged = [r.getMessage() for r in caplog.records if "internal error" in r.getMessage()]
    assert len(logged) == 2
    assert "activation statistics (layer '0')" in logged[0] and "rules" in logged[1]


def test_optimizer_step_hook_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's global optimizer step hooks see every optimizer: a failure there is one
    warning, the hooks turn inert, the optimizer steps as without gradwatch."""
    monkeypatch.setattr(gradwatch.stepping.Stepping, "_holds", boom)
    w, faults = run_with_fault()
    one_fault(faults, "optimizer step hook", "all layers")
    # no step could end after that: close() writes what was collected as one step
    assert w.latest is not None and w.latest.step == 1
    assert all(finite(w.latest, "act_mean").values())
