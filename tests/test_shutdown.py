"""Nothing lost: what was collected is written however the training process ends.

Each test runs a small training script in a subprocess that ends one way, then reads the
event files back with TensorBoard's own reader: every completed window is there, and for
the endings that run Python's shutdown (close, exception, sys.exit, a forgotten close) the
partial last window too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch.nn as nn
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import gradwatch
from gradwatch import shutdown

ROOT = Path(gradwatch.__file__).resolve().parent.parent
TAG = "gradwatch/grad_norm/0"

SCRIPT = textwrap.dedent("""
    import signal, sys, time
    import torch, torch.nn as nn
    import gradwatch

    mode, logdir, marker = sys.argv[1:4]
    torch.set_num_threads(1)
    if mode == "sigterm_chain":
        def handler(signum, frame):
            with open(marker, "w") as f:
                f.write("called")
            sys.exit(7)
        signal.signal(signal.SIGTERM, handler)
    if mode == "sigterm_ignored":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        opt.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        opt.step()

    w = gradwatch.watch(model, optimizer=opt, logdir=logdir, every=10)
    if mode == "close":
        for _ in range(25):
            step()
        w.close()
    elif mode == "with_raises":
        with w:
            for _ in range(25):
                step()
            raise ValueError("the training failed")
    elif mode == "sys_exit":
        for _ in range(25):
            step()
        sys.exit(3)
    elif mode == "sys_exit_in_with":
        with w:
            for _ in range(25):
                step()
            sys.exit(4)
    elif mode == "forgot_close":
        for _ in range(25):
            step()
    elif mode == "fork":
        import os
        for _ in range(25):
            step()
        quiet = os.fork()
        if quiet == 0:  # a child (think DataLoader worker) that ends normally: atexit runs
            sys.exit(0)
        killed = os.fork()
        if killed == 0:  # a child that is terminated
            time.sleep(60)
            os._exit(0)
        time.sleep(0.2)
        os.kill(killed, signal.SIGTERM)
        print("QUIET", os.waitpid(quiet, 0)[1], flush=True)
        status = os.waitpid(killed, 0)[1]
        print("KILLED", os.WIFSIGNALED(status) and os.WTERMSIG(status), flush=True)
        w.close()
    elif mode.startswith("sigterm"):
        for _ in range(35):
            step()
        print("READY", flush=True)
        deadline = time.monotonic() + 60
        while "closed" not in repr(w) and time.monotonic() < deadline:
            time.sleep(0.005)  # between steps: the signal comes here
        for _ in range(10):
            step()
        print("SURVIVED", flush=True)
""")


def run(tmp_path: Path, mode: str, sigterm: bool = False) -> tuple[int, str, str]:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    args = [sys.executable, str(script), mode, str(tmp_path / "logs"),
            str(tmp_path / "marker")]
    p = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    if sigterm:
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line.strip() == "READY", line + (p.stderr.read() if p.stderr else "")
        p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    return p.returncode, out, err


def steps(logdir: Path, tag: str = TAG) -> list[int]:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


@pytest.mark.parametrize("mode,rc", [
    ("close", 0),
    ("with_raises", 1),
    ("sys_exit", 3),
    ("sys_exit_in_with", 4),
    ("forgot_close", 0),
])
@pytest.mark.slow
def test_clean_endings_keep_every_window(tmp_path: Path, mode: str, rc: int) -> None:
    code, out, err = run(tmp_path, mode)
    assert code == rc, err
    assert steps(tmp_path / "logs") == [10, 20, 25]  # two full windows + the partial one
    assert steps(tmp_path / "logs", "gradwatch/act_mean/1") == [10, 20, 25]
    if mode == "with_raises":
        assert "ValueError: the training failed" in err  # the user's error is not replaced
    assert "Traceback" not in err.replace("ValueError", "") or mode == "with_raises"


@pytest.mark.slow
def test_sigterm_default_action(tmp_path: Path) -> None:
    code, out, err = run(tmp_path, "sigterm_default", sigterm=True)
    assert code == -signal.SIGTERM, err  # still ends the way SIGTERM ends a process
    assert "SURVIVED" not in out
    # every window completed before the signal, and the partial one it interrupted
    assert steps(tmp_path / "logs") == [10, 20, 30, 35]
    assert steps(tmp_path / "logs", "gradwatch/act_mean/1") == [10, 20, 30, 35]


@pytest.mark.slow
def test_sigterm_chains_to_previous_handler(tmp_path: Path) -> None:
    code, out, err = run(tmp_path, "sigterm_chain", sigterm=True)
    assert code == 7, err  # the user's handler ran and chose the exit code
    assert (tmp_path / "marker").read_text() == "called"
    assert steps(tmp_path / "logs") == [10, 20, 30, 35]


@pytest.mark.slow
def test_sigterm_previously_ignored(tmp_path: Path) -> None:
    code, out, err = run(tmp_path, "sigterm_ignored", sigterm=True)
    assert code == 0, err  # SIG_IGN was in place: the process goes on
    assert "SURVIVED" in out
    assert steps(tmp_path / "logs") == [10, 20, 30, 35]  # closed at the signal


@pytest.mark.slow
def test_forked_children_do_not_write(tmp_path: Path) -> None:
    code, out, err = run(tmp_path, "fork")
    assert code == 0, err
    assert "QUIET 0" in out
    assert f"KILLED {int(signal.SIGTERM)}" in out  # the child still dies by SIGTERM
    assert steps(tmp_path / "logs") == [10, 20, 25]  # written once, by the parent
    assert len(list((tmp_path / "logs").glob("events.out.tfevents.*"))) == 1


def test_exit_close_does_not_hang(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal that lands while the training thread holds the watcher's lock: the exit
    close cannot get the background thread's help, and must still end, within budget."""
    import torch

    monkeypatch.setattr(shutdown, "EXIT_BUDGET", 1.0)
    model = nn.Linear(3, 2)
    w = gradwatch.watch(model, logdir=tmp_path, every=10)
    for _ in range(15):
        model(torch.randn(2, 3)).sum().backward()
        w.step()
    w.flush()
    for _ in range(5):
        model(torch.randn(2, 3)).sum().backward()
        w.step()
    t0 = time.monotonic()
    with w._lock:  # as if interrupted inside ``with self._lock``
        shutdown.close_all()  # what the SIGTERM handler does
    assert time.monotonic() - t0 < 10
    assert "closed" in repr(w)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    # the windows written before are safe; the one the stuck thread held is written once
    # the lock is released, or lost if the process ends first
    assert steps(tmp_path, "gradwatch/grad_norm/(root)")[:2] == [10, 15]


def _handler(signum: int, frame: object) -> None:  # pragma: no cover - never signalled
    pass


def test_sigterm_handler_installed_and_restored() -> None:
    before = signal.signal(signal.SIGTERM, _handler)
    try:
        m1, m2 = nn.Linear(2, 2), nn.Linear(2, 2)
        w1 = gradwatch.watch(m1, tensorboard=False)
        assert isinstance(signal.getsignal(signal.SIGTERM), shutdown.SigtermHandler)
        w2 = gradwatch.watch(m2, tensorboard=False)
        w1.close()
        # w2 still open
        assert isinstance(signal.getsignal(signal.SIGTERM), shutdown.SigtermHandler)
        w2.close()
        assert signal.getsignal(signal.SIGTERM) is _handler
        w2.close()  # twice is fine
        assert signal.getsignal(signal.SIGTERM) is _handler
    finally:
        signal.signal(signal.SIGTERM, before)


def test_handler_replaced_by_user_is_left_alone() -> None:
    before = signal.getsignal(signal.SIGTERM)
    try:
        w = gradwatch.watch(nn.Linear(2, 2), tensorboard=False)
        signal.signal(signal.SIGTERM, _handler)  # the user takes SIGTERM over
        w.close()
        assert signal.getsignal(signal.SIGTERM) is _handler
    finally:
        signal.signal(signal.SIGTERM, before)


def test_reinstalled_over_a_user_handler() -> None:
    """Ours was replaced by the user's (and its watcher dropped without close): the next
    watcher installs a fresh handler on top, chaining to the user's."""
    import gc

    before = signal.getsignal(signal.SIGTERM)
    try:
        w = gradwatch.watch(nn.Linear(2, 2), tensorboard=False)
        del w
        gc.collect()
        signal.signal(signal.SIGTERM, _handler)
        w2 = gradwatch.watch(nn.Linear(2, 2), tensorboard=False)
        ours = signal.getsignal(signal.SIGTERM)
        assert isinstance(ours, shutdown.SigtermHandler) and ours.previous is _handler
        w2.close()
        assert signal.getsignal(signal.SIGTERM) is _handler
    finally:
        signal.signal(signal.SIGTERM, before)


def test_registry_holds_watchers_weakly() -> None:
    import gc
    import weakref

    w = gradwatch.watch(nn.Linear(2, 2), tensorboard=False)
    ref = weakref.ref(w)
    assert w in shutdown._open
    del w
    gc.collect()
    assert ref() is None
