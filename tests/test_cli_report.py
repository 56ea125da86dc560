import json
import os
import re
import struct
import subprocess
import sys

import pytest

from gradwatch.cli import main
from gradwatch.plot import Flow, default_size
from gradwatch.reader import read_logdir
from tests.support.flowlog import HOSTILE, LAYERS, PARAM_LAYERS, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return train(str(tmp_path_factory.mktemp("logs")))


def _env():
    env = dict(os.environ, COLUMNS="200")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    return env


def _tables(out):
    """Body rows of each printed table, as lists of cells (split on runs of spaces)."""
    tables, rows = [], None
    for line in out.splitlines():
        if line.strip().startswith("───"):
            rows = []
            tables.append(rows)
        elif rows is not None and line.strip():
            rows.append(re.split(r"\s{2,}", line.strip()))
        else:
            rows = None
    return tables


def test_report_command_prints_table_and_every_alert(written):
    p = subprocess.run([sys.executable, "-m", "gradwatch", "report", written.logdir],
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert f"run {written.run} · step {written.steps}" in out
    stats, alerts = _tables(out)
    assert [r[0] for r in stats] == LAYERS  # the payload is printed as text
    run = read_logdir(written.logdir)[0]
    assert all(len(r) == 1 + len(run.stats) for r in stats)  # 200 columns: every stat
    hostile = dict(zip(run.stats, stats[LAYERS.index(HOSTILE)][1:]))
    assert hostile["act_zero_frac"] == "1!"  # "!": this stat raised an alert, said under it
    assert "\n! = this layer's stat raised an alert at or before the step shown" in out
    assert hostile["grad_rms"] == "-"  # a ReLU has no parameters
    assert f"alerts in {written.run}: {len(written.alerts)}" in out
    assert [r[:3] for r in alerts] == [[str(a.step), a.layer, a.kind] for a in written.alerts]
    # why: the cause of each alert, then the hint once per kind and cause (plain text: the
    # payload in the layer name is printed, never interpreted)
    assert {a.cause for a in written.alerts} == {"bias_shift"}
    assert [r[-1] for r in alerts] == ["bias_shift"] * len(written.alerts)
    flat = " ".join(out.split())
    hint = " ".join(written.alerts[0].hint.split())
    assert hint.startswith("its inputs (the outputs of 'deep') have mean -")
    assert f"dead, cause bias_shift ({len(written.alerts)} alert(s), '{HOSTILE}'): " \
           f"{hint}" in flat
    assert f"1 run(s), {len(written.alerts)} alert(s)" in out


def test_narrow_terminal_keeps_the_core_stats(written, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["report", written.logdir]) == 0
    out = capsys.readouterr().out
    stats, _ = _tables(out)
    assert [r[0] for r in stats] == LAYERS and 3 <= len(stats[0]) - 1 < 12
    assert "not shown for width: grad_norm" in out.replace("\n", " ")
    assert max(len(line) for line in out.splitlines()) <= 80
    assert main(["report", written.logdir, "--stats", "grad_rms,act_zero_frac"]) == 0
    stats, _ = _tables(capsys.readouterr().out)
    assert stats[LAYERS.index(HOSTILE)][1:] == ["-", "1!"]


def test_report_json_and_fail_on_alert(written, capsys):
    assert main(["report", written.logdir, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (run,) = data["runs"]
    assert run["run"] == written.run and run["step"] == written.steps
    assert list(run["layers"]) == LAYERS
    assert run["layers"][HOSTILE]["act_zero_frac"] == 1.0
    assert "grad_rms" not in run["layers"]["act"]
    assert run["alerted"] == [{"layer": HOSTILE, "stat": "act_zero_frac",
                               "step": written.alerts[-1].step}]
    assert [(a["step"], a["layer"], a["kind"], a["cause"], a["hint"]) for a in run["alerts"]] \
        == [(a.step, a.layer, a.kind, a.cause, a.hint) for a in written.alerts]
    assert data["alerts"] == len(written.alerts) > 0
    assert main(["report", written.logdir, "--json", "--fail-on-alert"]) == 1
    capsys.readouterr()


def test_fail_on_alert_passes_a_healthy_run(tmp_path, capsys):
    healthy = train(str(tmp_path), run="healthy", steps=20, every=10,
                    include=["inp", "act", "deep", "out"])  # the dead ReLU not watched
    assert healthy.alerts == []
    assert main(["report", str(tmp_path), "--fail-on-alert"]) == 0
    assert "no alerts in healthy" in capsys.readouterr().out


@pytest.mark.parametrize("cmd", ["report", "plot"])
def test_missing_or_empty_logdir_is_an_error_naming_it(tmp_path, capsys, cmd):
    missing = str(tmp_path / "absent")
    assert main([cmd, missing]) == 2
    assert f"gradwatch: error: logdir {missing!r} does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([cmd, str(empty)]) == 2
    assert str(empty) in capsys.readouterr().err


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_plot_writes_a_png_of_the_expected_size(written, tmp_path, capsys):
    out = tmp_path / "flow.png"
    assert main(["plot", written.logdir, "-o", str(out)]) == 0
    runs = read_logdir(written.logdir)
    assert _png_size(out) == default_size([Flow.from_run(r) for r in runs])
    assert _png_size(out)[0] == 1200
    sized = tmp_path / "sized.png"
    assert main(["plot", written.logdir, "-o", str(sized), "--size", "640x480"]) == 0
    assert _png_size(sized) == (640, 480)
    assert "wrote" in capsys.readouterr().err


def test_plot_pixels_show_the_heatmap(written, tmp_path):
    import numpy as np

    from gradwatch.plot import render_rgb

    flows = [Flow.from_run(r) for r in read_logdir(written.logdir)]
    assert flows[0].layers == PARAM_LAYERS
    img = render_rgb(flows, (600, 300))
    assert img.shape == (300, 600, 3) and img.dtype == np.uint8
    # viridis cells: many distinct colours, not a blank canvas
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50


def _saturated_log(logdir, layers=24):
    """A log of a deep tanh net with long names, alerted on act_sat_frac at the last layer
    (written by the TensorBoard sink, as the watcher does)."""
    from torch.utils.tensorboard import SummaryWriter

    from gradwatch import Alert
    from gradwatch.schema import STATS
    from gradwatch.sinks.tensorboard import TensorBoardSink
    from gradwatch.snapshot import Snapshot

    names = [f"encoder.blocks.{i}.mlp.activation" for i in range(layers)]
    stats = {n: {s: 0.5 if s == "act_sat_frac" else 0.25 for s in STATS} for n in names}
    sat = Alert(10, names[-1], "saturated", "act_sat_frac", 0.42, 0.4,
                "gradwatch: saturated ...", "init_scale", "try xavier")
    sink = TensorBoardSink(SummaryWriter(logdir), owns=True)
    sink.write(Snapshot(10, stats), [sat])
    sink.close()
    return names


@pytest.mark.parametrize("columns", [64, 80, 120])
def test_narrow_terminal_never_drops_the_alerted_stat(tmp_path, capsys, monkeypatch, columns):
    names = _saturated_log(str(tmp_path / "tanh"))
    monkeypatch.setenv("COLUMNS", str(columns))
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    stats = _tables(out)[0]
    assert len(stats[0]) < 13  # some stats left out for width ...
    last = stats[-1]
    assert last[0].endswith(names[-1][-10:]) and "0.5!" in last  # ... never the alerted one
    assert "act_sat_frac is flagged only when units also sit at a bound" in " ".join(out.split())
    assert max(len(line) for line in out.splitlines()) <= columns
    # the alert too: a row of the alert table, or (narrower) its numbers then its layer
    assert re.search(r"\b10  (\S+\s+)?saturated  act_sat_frac  ", out) and names[-1] in out


def test_unknown_stats_are_an_error_listing_the_valid_names(written, capsys):
    assert main(["report", written.logdir, "--stats", "grad_rms,bogus"]) == 2
    err = capsys.readouterr().err
    assert "gradwatch: error: --stats: unknown stat(s) 'bogus'; valid: grad_norm, grad_rms," in err
    assert err.rstrip().endswith("nonfinite or all")


def test_a_closed_pipe_ends_the_report_quietly(written):
    p = subprocess.run(f"{sys.executable} -m gradwatch report {written.logdir} --json | head -1",
                       shell=True, capture_output=True, text=True, env=_env(), timeout=120)
    assert p.stdout == "{\n"
    assert p.stderr == f"reading {written.logdir} ...\n"  # no traceback, no Broken pipe


def test_a_logdir_that_is_a_file_says_so(tmp_path, capsys):
    f = tmp_path / "runs"
    f.write_text("x")
    for cmd in (["report", str(f)], ["plot", str(f)], ["demo", "--logdir", str(f)]):
        assert main(cmd) == 2
        assert f"gradwatch: error: logdir {str(f)!r} is a file" in capsys.readouterr().err
    import torch

    import gradwatch

    with pytest.raises(ValueError, match=re.escape(f"logdir {str(f)!r} is a file")):
        gradwatch.watch(torch.nn.Linear(2, 2), logdir=f)


def test_report_needs_no_extra_install(written):
    """The runtime install has no rich or matplotlib: the report is plain text without them."""
    code = ("import sys; sys.modules['rich'] = None; sys.modules['matplotlib'] = None\n"
            "from gradwatch.cli import main\n"
            f"sys.exit(main(['report', {written.logdir!r}]))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=_env(), timeout=120)
    assert p.returncode == 0, p.stderr
    assert f"alerts in {written.run}: {len(written.alerts)}" in p.stdout
    code = code.replace("'report'", "'plot'")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=_env(), timeout=120)
    assert p.returncode == 2
    assert ".venv/bin/pip install -e '.[plot]'" in p.stderr
