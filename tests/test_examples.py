"""The two diagnosis examples run and find what they claim (short runs)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def alert_steps(run: Path) -> list[int]:
    acc = EventAccumulator(str(run), size_guidance={"tensors": 0})
    acc.Reload()
    if "gradwatch/alerts" not in acc.Tags()["tensors"]:
        return []
    return [e.step for e in acc.Tensors("gradwatch/alerts")]


@pytest.mark.slow
def test_glorot_bengio(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = load("glorot_bengio").main(["--logdir", str(tmp_path), "--steps", "60"])
    broken = out["sigmoid_normal"].watcher.alerts
    assert broken and {(a.kind, a.cause) for a in broken} == {("saturated", "init_scale")}
    # the diagnosis names the Linear before the saturated sigmoid and the remedy applied next
    a = broken[0]
    assert f"weights of '{int(a.layer) - 1}' had std " in a.hint
    assert "ReLU with nn.init.kaiming_normal_(w, nonlinearity='relu')" in a.hint
    text = capsys.readouterr().out
    assert f"saturated at '{a.layer}'" in text and "cause: init_scale" in text
    assert f"hint: {a.hint}" in text
    # the hinted fixes: no alert, a lower loss and a higher accuracy on the same task
    for name in ("relu_he", "tanh_xavier"):
        fixed = out[name]
        assert fixed.watcher.alerts == []
        assert fixed.loss < out["sigmoid_normal"].loss - 0.1
        assert fixed.accuracy > out["sigmoid_normal"].accuracy + 0.1
        assert f"sigmoid_normal -> {name}: loss" in text
        assert not alert_steps(tmp_path / name)
    assert alert_steps(tmp_path / "sigmoid_normal")


@pytest.mark.slow
def test_exploding_rnn(tmp_path: Path) -> None:
    out = load("exploding_rnn").main(["--logdir", str(tmp_path), "--steps", "30"])
    bad = out["rnn_gain3"].alerts
    assert ("exploding", "rnn", "recurrent_gain") in {(a.kind, a.layer, a.cause) for a in bad}
    assert out["rnn_orthogonal_clipped"].alerts == []
    assert alert_steps(tmp_path / "rnn_gain3")
