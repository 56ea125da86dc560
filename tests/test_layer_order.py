"""The layer-order record: the watcher writes its forward order (with module types) into the
log, once and again only when it changes; the event-file reader, ``gradwatch report``,
``gradwatch plot`` and the dashboard's data route (through TensorBoard's own data provider,
in process) all read the layers in that order. Logs without it fall back: first-seen order
for the event-file reader, a natural sort for the data provider. A run written straight
into the logdir is named after the directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.plugins import base_plugin
from torch.utils.tensorboard import SummaryWriter

import gradwatch
from gradwatch.cli import main
from gradwatch.plot import Flow
from gradwatch.reader import (
    LAYERS_TAGS,
    natural_sort,
    newest_record,
    parse_layers_record,
    read_logdir,
)
from gradwatch.sinks.tensorboard import LAYERS_TAG, add_layers, layers_json
from gradwatch.tb_plugin import GradwatchPlugin
from tests.support.events import load


class Net(nn.Module):
    """Forward order stem, blocks.0 ... blocks.11, head: the natural sort of the names
    (blocks..., head, stem) and the alphabetical one both differ from it. ``late_b`` and
    ``late_a`` are first called at step ``late_from``, b before a (slot order: a first)."""

    def __init__(self, late_from: int | None = None) -> None:
        super().__init__()
        self.late_a = nn.Linear(8, 8)
        self.late_b = nn.Linear(8, 8)
        self.stem = nn.Linear(8, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh())
                                    for _ in range(12))
        self.head = nn.Linear(8, 1)
        self.late_from = late_from
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        if self.late_from is not None and self.calls > self.late_from:
            x = self.late_a(self.late_b(x))
        return self.head(x)


def train(net: Net, logdir: Path, steps: int = 8, every: int = 2) -> gradwatch.Watcher:
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with gradwatch.watch(net, optimizer=opt, logdir=logdir, every=every,
                         on_alert="ignore") as w:
        for _ in range(steps):
            opt.zero_grad()
            net(torch.randn(4, 8)).pow(2).mean().backward()
            opt.step()
    return w


def records(logdir: Path) -> list[tuple[int, list[tuple[str, str]]]]:
    acc = load(logdir)
    out = []
    for ev in acc.Tensors(LAYERS_TAG):
        (text,) = ev.tensor_proto.string_val
        parsed = parse_layers_record(text.decode())
        assert parsed is not None
        out.append((ev.step, parsed))
    return out


def types_of(net: nn.Module, names: list[str]) -> list[tuple[str, str]]:
    mods = dict(net.named_modules())
    return [(n, type(mods[n]).__name__) for n in names]


def in_process_plugin(logdir: Path) -> GradwatchPlugin:
    """The dashboard's backend over TensorBoard's own data provider (its Python
    multiplexer), as ``tensorboard --logdir`` builds it, without a server."""
    mux = plugin_event_multiplexer.EventMultiplexer(
        tensor_size_guidance={"text": 0, "gradwatch": 0})
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(logdir))
    return GradwatchPlugin(base_plugin.TBContext(logdir=str(logdir), data_provider=provider))


def route(plugin: GradwatchPlugin, stat: str = "grad_rms") -> dict:
    return plugin.data(context.RequestContext(), "", stat)


def test_the_record_is_written_once_in_forward_order_with_types(tmp_path):
    net = Net()
    w = train(net, tmp_path)
    forward = ["stem"] + [f"blocks.{i}.{j}" for i in range(12) for j in (0, 1)] + ["head"]
    assert w.layers[:len(forward)] == forward  # late_* never called: last
    recs = records(tmp_path)
    assert recs == [(2, types_of(net, w.layers))]  # once, with the first window
    assert dict(recs[0][1])["blocks.3.1"] == "Tanh"


def test_the_record_is_written_again_when_the_order_changes(tmp_path):
    net = Net(late_from=4)
    w = train(net, tmp_path)
    (s1, first), (s2, second) = records(tmp_path)
    assert (s1, s2) == (2, 6)  # the window in which late_b, then late_a, were first called
    assert [n for n, _ in first][-2:] == ["late_a", "late_b"]  # never called: slot order
    assert [n for n, _ in second][-2:] == ["late_b", "late_a"]  # call order
    assert second == types_of(net, w.layers)
    run = read_logdir(tmp_path)[0]
    assert run.layers == w.layers and run.order == "record"


def test_every_reader_uses_the_record(tmp_path, capsys):
    net = Net(late_from=4)
    w = train(net, tmp_path / "net")
    with_grads = [la for la in w.layers if "grad_rms" in w.latest.stats[la]]
    assert natural_sort(with_grads) != with_grads

    (run,) = read_logdir(tmp_path)
    assert run.layers == w.layers
    assert run.types == dict(types_of(net, w.layers))
    assert Flow.from_run(run).layers == with_grads  # gradwatch plot's rows

    assert main(["report", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["runs"][0]["layers"]) == w.layers

    data = route(in_process_plugin(tmp_path))
    (got,) = data["runs"]
    assert got["order"] == "record" and got["layers"] == with_grads
    assert got["types"] == [t for _, t in types_of(net, with_grads)]
    acts = route(in_process_plugin(tmp_path), "act_mean")["runs"][0]
    assert acts["layers"] == w.layers  # every layer has outputs


def write_old_log(logdir: Path, order: list[str]) -> None:
    """A log as written before the record existed: scalars only, in ``order``."""
    with SummaryWriter(str(logdir)) as sw:
        for step in (10, 20):
            for i, layer in enumerate(order):
                sw.add_scalar(f"gradwatch/grad_rms/{layer}", 0.1 * (i + 1), step)


def test_logs_without_a_record_fall_back(tmp_path):
    order = ["stem", "blocks.10.0", "blocks.2.0", "blocks.9.0", "head"]  # as first written
    logdir = tmp_path / "old_logs"
    write_old_log(logdir, order)
    (run,) = read_logdir(logdir)
    assert (run.layers, run.order, run.types) == (order, "first-seen", {})
    (got,) = route(in_process_plugin(logdir))["runs"]
    assert got["order"] == "natural"
    assert got["layers"] == ["blocks.2.0", "blocks.9.0", "blocks.10.0", "head", "stem"]
    assert got["types"] == [""] * 5
    # a layer the record does not name (an older watcher's) follows the recorded ones
    with SummaryWriter(str(logdir)) as sw:
        add_layers(sw, [("head", "Linear"), ("stem", "Linear")], 30)
    (run,) = read_logdir(logdir)
    assert run.layers == ["head", "stem", "blocks.10.0", "blocks.2.0", "blocks.9.0"]
    (got,) = route(in_process_plugin(logdir))["runs"]
    assert got["layers"] == ["head", "stem", "blocks.2.0", "blocks.9.0", "blocks.10.0"]
    assert got["order"] == "record" and got["types"][:2] == ["Linear", "Linear"]


def test_a_run_in_the_logdir_itself_is_named_after_it(tmp_path, capsys):
    logdir = tmp_path / "my_experiment"
    train(Net(), logdir)
    (run,) = read_logdir(logdir)
    assert run.name == "my_experiment"
    assert read_logdir(str(logdir) + os.sep)[0].name == "my_experiment"
    (got,) = route(in_process_plugin(logdir))["runs"]
    assert (got["run"], got["path"]) == ("my_experiment", ".")
    assert main(["report", str(logdir)]) == 0
    assert "run my_experiment · step 8" in capsys.readouterr().out


def test_record_parsing_is_strict_about_shape_and_lenient_about_versions():
    text = layers_json([("a", "Linear"), ("<b>", "ReLU")])
    assert json.loads(text)["version"] == 1
    assert parse_layers_record(text) == [("a", "Linear"), ("<b>", "ReLU")]
    newer = json.dumps({"version": 2, "layers": [{"name": "a", "type": "X", "depth": 0}],
                        "extra": True})
    assert parse_layers_record(newer) == [("a", "X")]
    for bad in ["", "[]", "{}", '{"version": 1}', '{"version": "1", "layers": []}',
                '{"version": 1, "layers": [{"type": "X"}]}', '{"version": 1, "layers": [3]}']:
        assert parse_layers_record(bad) is None, bad
    # the newest readable record wins; unreadable ones are skipped
    assert newest_record([(5, layers_json([("x", "")])), (9, "garbage"),
                          (7, layers_json([("y", "")]))]) == [("y", "")]
    assert newest_record([]) is None


class _TextOnlyWriter:
    """A writer that is not a SummaryWriter (no _get_file_writer): add_text and scalars."""

    def __init__(self, logdir: Path) -> None:
        self.sw = SummaryWriter(str(logdir))

    def add_scalar(self, *a: object) -> None:
        self.sw.add_scalar(*a)  # type: ignore[arg-type]

    def add_text(self, *a: object) -> None:
        self.sw.add_text(*a)  # type: ignore[arg-type]

    def add_custom_scalars(self, layout: object) -> None:
        pass

    def flush(self) -> None:
        self.sw.flush()


def test_other_writers_record_the_order_as_text(tmp_path):
    net = Net(late_from=0)  # every layer called from the first step
    writer = _TextOnlyWriter(tmp_path)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with gradwatch.watch(net, optimizer=opt, writer=writer, every=2, on_alert="ignore") as w:
        for _ in range(4):
            opt.zero_grad()
            net(torch.randn(4, 8)).sum().backward()
            opt.step()
    writer.sw.close()
    assert LAYERS_TAGS[1] in load(tmp_path).Tags()["tensors"]
    (run,) = read_logdir(tmp_path)
    assert run.layers == w.layers and run.order == "record"
    (got,) = route(in_process_plugin(tmp_path), "act_mean")["runs"]
    assert got["layers"] == w.layers and got["order"] == "record"
