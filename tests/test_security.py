"""Nothing gradwatch logs is ever executed or unpickled, and layer names are data, not
markup: the package source has no eval/exec/unpickling, and hostile module names come back
from TensorBoard exactly as they were, one alert table row each."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import torch
import torch.nn as nn
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import gradwatch
from gradwatch.alerts import Alert
from gradwatch.sinks.tensorboard import ALERT_TEXT_TAG, alerts_markdown

PACKAGE = Path(gradwatch.__file__).resolve().parent
SOURCES = sorted(PACKAGE.rglob("*.py"))

# text patterns: a call of eval/exec (not a method such as model.eval()), unpickling loads
FORBIDDEN_TEXT = [
    (re.compile(r"(?<![\w.])eval\s*\("), "eval("),
    (re.compile(r"(?<![\w.])exec\s*\("), "exec("),
    (re.compile(r"\bpickle\s*\.\s*(load|loads|Unpickler)\b"), "pickle.load"),
    (re.compile(r"\btorch\s*\.\s*load\s*\("), "torch.load("),
    (re.compile(r"\b(marshal|dill|cloudpickle|joblib|shelve)\b"), "another unpickler"),
    (re.compile(r"allow_pickle\s*=\s*True"), "numpy allow_pickle=True"),
    (re.compile(r"\byaml\s*\.\s*(load|unsafe_load)\s*\("), "yaml.load("),
]
UNPICKLERS = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve",
              "joblib"}


def test_the_scan_sees_the_package() -> None:
    names = {p.name for p in SOURCES}
    assert {"watcher.py", "hooks.py", "cli.py", "tensorboard.py"} <= names


def scan_text(text: str) -> list[str]:
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        for pat, what in FORBIDDEN_TEXT:
            if pat.search(line):
                found.append(f"{n}: {what}: {line.strip()}")
    return found


def scan_tree(text: str) -> list[str]:
    """The same on the syntax tree, so an alias (``from pickle import loads as l``,
    ``getattr(builtins, 'eval')``) does not slip through."""
    found = []
    for node in ast.walk(ast.parse(text)):
        n = getattr(node, "lineno", 0)
        if isinstance(node, ast.Name) and node.id in {"eval", "exec", "__import__"}:
            found.append(f"{n}: {node.id}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id == "compile":
            found.append(f"{n}: compile()")
        if isinstance(node, ast.Import):
            found += [f"{n}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] in UNPICKLERS]
        if isinstance(node, ast.ImportFrom) and node.module \
                and node.module.split(".")[0] in UNPICKLERS:
            found.append(f"{n}: from {node.module} import ...")
        if isinstance(node, ast.Constant) and node.value in {"eval", "exec"}:
            found.append(f"{n}: the name {node.value!r} as a string")
    return found


def test_no_eval_exec_or_unpickling_in_the_package() -> None:
    found = []
    for path in SOURCES:
        text = path.read_text()
        rel = path.relative_to(PACKAGE)
        found += [f"{rel}:{f}" for f in scan_text(text) + scan_tree(text)]
    assert found == []


def test_the_scanners_catch_what_they_look_for() -> None:
    bad = ["v = eval(s)", "exec(code)", "x = pickle.load(f)", "pickle.loads(b)",
           "sd = torch.load(path)", "np.load(p, allow_pickle=True)", "import dill",
           "y = yaml.load(s)"]
    for line in bad:
        assert scan_text(line), line
    for line in ["from pickle import loads as l", "import marshal", "f = eval", "exec('1')",
                 "getattr(builtins, 'eval')(s)"]:
        assert scan_tree(line), line
    fine = ["model.eval()", "m.train(); m.eval()", "re.compile('x')", "torch.compile(m)",
            "evaluate(x)", "rules.evaluate(step)"]
    for line in fine:
        assert not scan_text(line) and not scan_tree(line), line


HOSTILE = ["a\nb", "<img src=x onerror=alert(1)>", "x|y`z", "[link](javascript:alert(1))"]


def test_alert_table_keeps_hostile_names_in_their_cell() -> None:
    alerts = [Alert(3, name, "dead", "act_zero_frac", 1.0, 0.99, "m") for name in HOSTILE]
    md = alerts_markdown(alerts)
    lines = md.splitlines()
    assert len(lines) == 2 + len(HOSTILE)  # header, rule, one row per alert
    for line in lines[2:]:
        cells = line.split(" | ")
        assert len(cells) == 9, line  # a cell per Alert field
        assert cells[1].startswith("`") and cells[1].endswith("`")
        assert cells[1].count("`") == 2  # one code span: markup inside is shown, not run
    assert "`<img src=x onerror=alert(1)>`" in md


class Hostile(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.acts = nn.ModuleDict({name: nn.ReLU() for name in HOSTILE})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        for act in self.acts.values():
            y = act(y - 100.0)  # dead: every output is 0
        return y


def test_hostile_names_round_trip_through_tensorboard(tmp_path: Path) -> None:
    model = Hostile()
    seen: list[Alert] = []
    with gradwatch.watch(model, logdir=tmp_path, every=2, on_alert=seen.append,
                         thresholds={"patience": 1}) as w:
        for _ in range(4):
            model(torch.randn(4, 3)).sum().backward()
            w.step()
    names = {f"acts.{n}" for n in HOSTILE}
    assert {a.layer for a in seen if a.kind == "dead"} == names
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for n in names:  # tags carry the names as they are: no injection into other tags
        assert f"gradwatch/act_zero_frac/{n}" in tags
        assert [e.value for e in acc.Scalars(f"gradwatch/act_zero_frac/{n}")] == [1.0, 1.0]
    tag = next(t for t in acc.Tags()["tensors"] if t.startswith(ALERT_TEXT_TAG))
    events = acc.Tensors(tag)
    texts = [e.tensor_proto.string_val[0].decode() for e in events]
    rows = [r for t in texts for r in t.splitlines()[2:]]
    assert len(rows) == len(seen) == len(HOSTILE)
