"""gradwatch used the way people write it, each checked against real values.

Fire-and-forget ``watch()``, no ``optimizer=`` and no ``step()``, reads right after the
loop, ``unwatch()``, watching again, a notebook cell run twice, a script that simply ends.
``flush()`` is called nowhere: no user idiom needs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import gradwatch
from tests.support.events import event_files, scalars
from tests.support.hookstate import hook_state
from tests.support.reference import Float64Reference, close, small_mlp

ROOT = Path(gradwatch.__file__).resolve().parent.parent
EVERY = 5


def _recorder(m: nn.Module) -> Float64Reference:
    return Float64Reference({n: mod for n, mod in m.named_modules() if n}, {"1": (-1.0, 1.0)})


def _train(m: nn.Module, opt: torch.optim.Optimizer, ref: Float64Reference,
           steps: int) -> None:
    for _ in range(steps):
        ref.train_step(m, opt, torch.randn(8, 6))


def _assert_window(got: dict[str, dict[str, float]], ref: Float64Reference,
                   steps: list[int]) -> None:
    want = ref.window(steps)
    for layer, stats in want.items():
        for s, v in got[layer].items():
            if s != "nonfinite":
                assert close(v, stats[s]), (layer, s, v, stats[s])


def _assert_tensorboard(logdir: Path, ref: Float64Reference, ends: list[int]) -> None:
    """Every window in the event file, each equal to its float64 recomputation."""
    tb = scalars(logdir)
    assert sorted(tb["gradwatch/grad_norm/0"]) == ends
    start = 0
    for end in ends:
        want = ref.window(list(range(start, end)))
        for layer, stats in want.items():
            for s, v in stats.items():
                tag = f"gradwatch/{s}/{layer}"
                assert close(tb[tag][end], v), (tag, end, tb[tag][end], v)
        start = end


def test_fire_and_forget_then_a_normal_loop(tmp_path):
    m = small_mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    ref = _recorder(m)
    gradwatch.watch(m, logdir=tmp_path, every=EVERY)  # no optimizer=, the result dropped
    _train(m, opt, ref, 22)
    gradwatch.unwatch(m)
    _assert_tensorboard(tmp_path, ref, [5, 10, 15, 20, 22])
    assert len(event_files(tmp_path)) == 1


def test_no_optimizer_argument_and_no_step_call(tmp_path):
    """The issue's second case: the loop calls opt.step(), never watcher.step()."""
    m = small_mlp()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    ref = _recorder(m)
    w = gradwatch.watch(m, logdir=tmp_path, every=EVERY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        _train(m, opt, ref, 20)
        w.close()
    assert w.latest is not None and w.latest.step == 20
    assert "update_ratio" in w.latest.stats["0"]
    _assert_window(w.latest.stats, ref, list(range(15, 20)))
    _assert_tensorboard(tmp_path, ref, [5, 10, 15, 20])


def test_read_right_after_the_loop_again_and_again():
    m = small_mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    ref = _recorder(m)
    w = gradwatch.watch(m, tensorboard=False, every=EVERY)
    # 25 rounds of 4 steps: the first 100 steps, every one sampled by default (after them
    # one step in 10 is, and a window's statistics are no longer a mean over all its steps)
    for n in range(1, 26):
        _train(m, opt, ref, 4)  # 4 steps a round: a window ends inside some rounds
        last = (4 * n) // EVERY * EVERY
        snap = w.latest
        if last == 0:
            assert snap is None and w.report() == "gradwatch: nothing flushed yet"
            continue
        assert snap is not None and snap.step == last, (n, snap and snap.step)
        assert f"gradwatch report, step {last}" in w.report()
        _assert_window(snap.stats, ref, list(range(last - EVERY, last)))
    gradwatch.unwatch(m)


def test_unwatch_ends_the_watching_and_training_goes_on(tmp_path):
    m = small_mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    ref = _recorder(m)
    before = hook_state(m, (opt,))
    w = gradwatch.watch(m, logdir=tmp_path, every=EVERY)
    _train(m, opt, ref, 7)
    gradwatch.unwatch(m)
    assert hook_state(m, (opt,)) == before
    _train(m, opt, ref, 10)  # not watched any more: nothing is written, nothing fails
    _assert_tensorboard(tmp_path, ref, [5, 7])
    assert w.latest is not None and w.latest.step == 7


def test_watching_again_replaces_the_watcher(tmp_path):
    m = small_mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    ref = _recorder(m)
    gradwatch.watch(m, logdir=tmp_path / "first", every=EVERY)
    _train(m, opt, ref, 8)
    once = hook_state(m, (opt,))
    with pytest.warns(UserWarning, match="already watched"):
        gradwatch.watch(m, logdir=tmp_path / "second", every=EVERY)
    assert hook_state(m, (opt,)) == once  # the old hooks are gone, the new ones in place
    _train(m, opt, ref, 6)
    gradwatch.unwatch(m)
    _assert_tensorboard(tmp_path / "first", ref, [5, 8])  # flushed when replaced
    tb = scalars(tmp_path / "second")  # the new watcher counts its own steps from 1
    assert sorted(tb["gradwatch/grad_norm/0"]) == [5, 6]
    want = ref.window(list(range(8, 13)))
    assert close(tb["gradwatch/grad_norm/0"][5], want["0"]["grad_norm"])


def test_a_notebook_cell_run_twice(tmp_path):
    shell_mod = pytest.importorskip("IPython.core.interactiveshell")
    shell = shell_mod.InteractiveShell.instance()
    try:
        setup = textwrap.dedent("""
            import torch, torch.nn as nn, gradwatch
            from tests.support.reference import small_mlp
            model = small_mlp()
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
        """)
        cell = f"gradwatch.watch(model, logdir={str(tmp_path)!r}, every=5)"
        train = textwrap.dedent("""
            for _ in range(10):
                loss = model(torch.randn(8, 6)).pow(2).mean()
                opt.zero_grad(); loss.backward(); opt.step()
        """)
        assert shell.run_cell(setup).success
        for _ in range(2):  # the watch cell, run again after some training
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = shell.run_cell(cell)  # the cell shows the watcher it made
            assert out.success and isinstance(out.result, gradwatch.Watcher)
            assert shell.run_cell(train).success
        assert sum("already watched" in str(c.message) for c in caught) == 1
        m = shell.user_ns["model"]
        assert [len(mod._forward_hooks) for mod in m] == [1] * 5  # no pile-up
        data, _ = shell.display_formatter.format(out.result)
        assert "text/html" in data and "step 10" in data["text/html"]
        shell.run_cell("gradwatch.unwatch(model)")
        assert len(event_files(tmp_path)) == 2  # one run per watcher, both written
    finally:
        shell_mod.InteractiveShell.clear_instance()


SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, torch.nn as nn
    import gradwatch
    from tests.support.reference import Float64Reference, small_mlp

    torch.manual_seed(0)
    torch.set_num_threads(1)

    def main(logdir):
        model = small_mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        ref = Float64Reference({n: m for n, m in model.named_modules() if n},
                               {"1": (-1.0, 1.0)})
        gradwatch.watch(model, logdir=logdir, every=5)
        for _ in range(23):
            ref.train_step(model, opt, torch.randn(8, 6))
        return ref

    ref = main(sys.argv[1])  # the model is out of scope: garbage, or alive until exit
    if sys.argv[2] == "keep":
        keep = ref
    print(json.dumps({str(end): ref.window(list(range(end - 5 if end % 5 == 0 else 20, end)))
                      for end in (5, 10, 15, 20, 23)}))
""")


@pytest.mark.parametrize("ending", ["keep", "drop"])
def test_a_script_that_simply_ends(tmp_path, ending):
    """No close(), no unwatch(), no flush(): every window is on disk when it ends."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    p = subprocess.run([sys.executable, str(script), str(tmp_path / "logs"), ending],
                       env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    want = json.loads(p.stdout.strip().splitlines()[-1])
    tb = scalars(tmp_path / "logs")
    assert sorted(tb["gradwatch/grad_norm/0"]) == [5, 10, 15, 20, 23]
    for end, layers in want.items():
        for layer, stats in layers.items():
            for s, v in stats.items():
                got = tb[f"gradwatch/{s}/{layer}"][int(end)]
                assert close(got, v), (end, layer, s, got, v)
