"""The model keeps its watcher alive; ``unwatch()``; dropping the model writes and closes."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading
import warnings
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import gradwatch
from gradwatch import lifetime, shutdown
from tests.support.events import event_files, scalars
from tests.support.hookstate import hook_state

ROOT = Path(gradwatch.__file__).resolve().parent.parent


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        loss = model(torch.randn(6, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def grad_norm_steps(logdir: Path, layer: str = "0") -> dict[int, float]:
    return scalars(logdir)[f"gradwatch/grad_norm/{layer}"]


def test_dropped_result_keeps_watching(tmp_path):
    m = mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    gradwatch.watch(m, optimizer=opt, logdir=tmp_path, every=5)  # the result is dropped
    gc.collect()
    train(m, opt, 22)
    gradwatch.unwatch(m)  # the last partial window is written here
    got = grad_norm_steps(tmp_path)
    assert sorted(got) == [5, 10, 15, 20, 22]
    assert all(0 < v < 10 for v in got.values())
    assert len(event_files(tmp_path)) == 1


def test_dropping_model_and_watcher_writes_and_closes(tmp_path):
    m = mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    before = hook_state(nn.Sequential(), (opt,))  # torch's global registries, the optimizer
    w = gradwatch.watch(m, logdir=tmp_path, every=10)
    train(m, opt, 13)
    writer = w._sink.writer
    thread = w._publish.worker._thread
    model_ref, watcher_ref = weakref.ref(m), weakref.ref(w)
    del m, w
    gc.collect()
    assert model_ref() is None and watcher_ref() is None
    assert writer.all_writers is None  # the SummaryWriter the watcher opened is closed
    assert sorted(grad_norm_steps(tmp_path)) == [10, 13]  # on disk, the partial window too
    assert thread is not None and not thread.is_alive()
    assert hook_state(nn.Sequential(), (opt,)) == before
    train(nn.Sequential(nn.Linear(4, 1)), opt, 1)  # the optimizer still steps, unhooked


def test_collected_on_its_own_background_thread(tmp_path):
    """The collector may run on the watcher's own background thread: the close must not
    wait for that thread (it is the one running); it is queued there and done."""
    m = mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w = gradwatch.watch(m, logdir=tmp_path, every=10)
    train(m, opt, 13)
    writer, worker = w._sink.writer, w._publish.worker
    watcher_ref = weakref.ref(w)
    gc.disable()  # no collection on this thread before the worker's
    try:
        del m, w
        ran = threading.Event()
        worker.submit(lambda: (gc.collect(), ran.set()))
        assert ran.wait(30) and worker.join(30)
    finally:
        gc.enable()
    assert watcher_ref() is None
    assert writer.all_writers is None
    assert sorted(grad_norm_steps(tmp_path)) == [10, 13]


def test_collected_on_a_background_thread_at_exit(tmp_path):
    """Collected on a background thread just before the process ends: the exit waits for
    the last window and the writer's close (the thread is a daemon)."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import gc, sys, time
        import torch, torch.nn as nn
        import gradwatch

        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        w = gradwatch.watch(model, logdir=sys.argv[1], every=10)
        for _ in range(13):
            opt.zero_grad()
            model(torch.randn(6, 4)).pow(2).mean().backward()
            opt.step()
        worker = w._publish.worker
        gc.disable()
        del model, w
        def slow_collect():
            time.sleep(0.2)  # the main thread is at exit by now
            gc.collect()
        worker.submit(slow_collect)
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    p = subprocess.run([sys.executable, str(script), str(tmp_path / "logs")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert sorted(grad_norm_steps(tmp_path / "logs")) == [10, 13]


def test_unwatch_puts_every_hook_container_back(tmp_path):
    m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
                      nn.Tanh())
    opt = torch.optim.Adam(m.parameters())
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)  # another model's
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    before = hook_state(m, (opt, other), (scaler,))
    gradwatch.watch(m, scaler=scaler, logdir=tmp_path, every=2, histograms=True)
    during = hook_state(m, (opt, other), (scaler,))
    assert during != before
    assert during["global.optimizer_pre"] == before["global.optimizer_pre"] + 1
    for _ in range(3):
        loss = m(torch.randn(5, 2, 6, 6)).pow(2).mean()
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    gradwatch.unwatch(m)
    assert hook_state(m, (opt, other), (scaler,)) == before
    assert sorted(grad_norm_steps(tmp_path)) == [2, 3]
    gradwatch.unwatch(m)  # not watched any more: nothing happens
    assert hook_state(m, (opt, other), (scaler,)) == before


def test_unwatch_on_a_model_never_watched_does_nothing():
    m = mlp()
    before = hook_state(m)
    gradwatch.unwatch(m)
    assert hook_state(m) == before


def test_unwatch_rejects_a_non_module():
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got 'model' \(str\)"):
        gradwatch.unwatch("model")  # type: ignore[arg-type]


@pytest.mark.parametrize("wrap", ["compile", "data_parallel", "ddp"])
def test_unwatch_accepts_the_wrappers_watch_accepts(tmp_path, wrap):
    m = mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    before = hook_state(m, (opt,))
    group = False
    if wrap == "compile":
        wrapped: nn.Module = torch.compile(m, backend="eager")
    elif wrap == "data_parallel":
        wrapped = nn.DataParallel(m)
    else:  # one real gloo rank in this process
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                                world_size=1)
        group = True
        wrapped = nn.parallel.DistributedDataParallel(m)
    try:
        before = hook_state(m, (opt,))  # DDP registers hooks of its own
        gradwatch.watch(wrapped, logdir=tmp_path / "tb", every=2)
        train(wrapped, opt, 3)
        gradwatch.unwatch(wrapped)
        assert hook_state(m, (opt,)) == before
        assert sorted(grad_norm_steps(tmp_path / "tb")) == [2, 3]
    finally:
        if group:
            dist.destroy_process_group()
        torch._dynamo.reset()


def test_open_watchers_are_weakly_registered_and_closed_with_the_model():
    m = mlp()
    w = gradwatch.watch(m, tensorboard=False)
    assert w in shutdown._open
    ref = weakref.ref(w)
    del w
    gc.collect()
    assert ref() is not None  # the model holds it
    del m
    gc.collect()
    assert ref() is None


def test_a_model_pickled_by_an_earlier_version_loads_unwatched():
    """Earlier versions pickled the marker as ``gradwatch.watcher._Attachment``."""
    import pickle

    marker = pickle.loads(b"cgradwatch.watcher\n_Attachment\n)R.")
    m = mlp()
    m.__dict__["_gradwatch_attachment"] = marker
    assert lifetime.attached(m) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not watched: no "already watched" warning
        w = gradwatch.watch(m, tensorboard=False)
    assert lifetime.attached(m) is w
    w.close()
