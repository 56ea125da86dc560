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
    kinds = {name: {(a.kind, a.layer) for a in w.alerts} for name, w in out.items()}
    assert kinds["tanh_xavier"] == set() and kinds["relu_he"] == set()
    assert kinds["sigmoid_normal"] and {k for k, _ in kinds["sigmoid_normal"]} == {"saturated"}
    assert "saturated at layer" in capsys.readouterr().out
    assert alert_steps(tmp_path / "sigmoid_normal") and not alert_steps(tmp_path / "relu_he")


@pytest.mark.slow
def test_exploding_rnn(tmp_path: Path) -> None:
    out = load("exploding_rnn").main(["--logdir", str(tmp_path), "--steps", "30"])
    bad = out["rnn_gain3"].alerts
    assert ("exploding", "rnn") in {(a.kind, a.layer) for a in bad}
    assert out["rnn_orthogonal_clipped"].alerts == []
    assert alert_steps(tmp_path / "rnn_gain3")
