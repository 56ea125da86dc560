"""`gradwatch demo`: the broken net is flagged with its cause and hint, the net that follows
the hint is not, and it trains better; runs are written."""

from __future__ import annotations

import re

from gradwatch.cli import main
from gradwatch.demo import command
from tests.support.events import event_files, scalars


def test_demo_diagnoses_the_sigmoid_net_and_the_hinted_fix_is_quiet(tmp_path, capsys):
    assert main(["demo", "--logdir", str(tmp_path), "--steps", "100"]) == 0
    out = capsys.readouterr().out
    sig, relu = out.split("=== relu_he_init")
    assert "=== sigmoid_normal_init" in sig and "gradwatch: saturated at layer" in sig
    # why and what to try: the Linear before a sigmoid, its init std against Glorot's
    assert re.search(r"cause init_scale: weights of '\d+' had std [\d.]+ at watch\(\), "
                     r"[\d.]+x the Glorot std 0\.0884 for 128 -> 128 before a Sigmoid", sig)
    assert "ReLU with nn.init.kaiming_normal_(w, nonlinearity='relu')" in sig
    assert "no alerts" in relu and "saturated" not in relu
    m = re.search(r"loss ([\d.]+) -> ([\d.]+), train accuracy ([\d.]+)% -> ([\d.]+)%, "
                  r"alerts (\d+) -> 0", relu)
    assert m, relu
    loss0, loss1, acc0, acc1, n0 = (float(g) for g in m.groups())
    assert loss1 < loss0 and acc1 > acc0 and n0 >= 1
    assert f"tensorboard --logdir {tmp_path}    (the GRADWATCH tab)" in out
    assert f"gradwatch report {tmp_path}\n" in out
    for run in ("sigmoid_normal_init", "relu_he_init"):
        assert len(event_files(tmp_path / run)) == 1
        assert sorted(scalars(tmp_path / run)["gradwatch/grad_rms/0"]) == [20, 40, 60, 80, 100]
    counts = scalars(tmp_path / "sigmoid_normal_init")["gradwatch/alert_count/saturated"]
    assert counts[100] >= 1


def test_commands_are_printed_as_the_shell_finds_them(tmp_path, monkeypatch):
    """In a virtual environment that is not activated (a clone after ``make demo``) the
    printed commands carry their path; on PATH they are bare."""
    import os
    import sys

    bindir = os.path.dirname(sys.executable)
    monkeypatch.chdir(os.path.dirname(bindir))
    monkeypatch.setenv("PATH", str(tmp_path))
    assert command("tensorboard") == os.path.join(os.path.basename(bindir), "tensorboard")
    monkeypatch.setenv("PATH", bindir)
    assert command("tensorboard") == "tensorboard"
    assert command("no-such-tool") == "no-such-tool"


def test_the_plot_command_names_its_install_only_when_it_is_missing(monkeypatch):
    import sys

    from gradwatch.demo import commands

    assert commands("runs").endswith("plot runs -o flow.png")  # matplotlib is here
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert commands("runs").endswith("install -e '.[plot]')")
