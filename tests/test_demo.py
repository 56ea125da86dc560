"""`gradwatch demo`: the broken net is flagged, the healthy one is not, runs are written."""

from __future__ import annotations

from gradwatch.cli import main
from tests.events import event_files, scalars


def test_demo_flags_the_sigmoid_net_and_not_the_relu_net(tmp_path, capsys):
    assert main(["demo", "--logdir", str(tmp_path), "--steps", "100"]) == 0
    out = capsys.readouterr().out
    sig, relu = out.split("=== relu_he_init")
    assert "=== sigmoid_normal_init" in sig and "gradwatch: saturated at layer" in sig
    assert "no alerts" in relu and "saturated" not in relu
    assert f"tensorboard --logdir {tmp_path}" in out
    for run in ("sigmoid_normal_init", "relu_he_init"):
        assert len(event_files(tmp_path / run)) == 1
        assert sorted(scalars(tmp_path / run)["gradwatch/grad_rms/0"]) == [20, 40, 60, 80, 100]
    counts = scalars(tmp_path / "sigmoid_normal_init")["gradwatch/alert_count/saturated"]
    assert counts[100] >= 1
