"""One-way structure of the package: every module has a layer (the table below), imports
only run to its own layer or lower, there is no import cycle, and no module is over
``MAX_LINES`` lines.

Imports are read with ``ast`` from the source, those inside functions included (they run
too, only later); imports under ``if TYPE_CHECKING:`` are left out (never run).

The layers follow the data: hooks fill device buffers, the step path ends steps and sends
the per-step flags, a flush makes a snapshot, the publisher runs the rules and hands the
result to the sinks; the watcher is the facade over all of it; the offline readers (logs,
TensorBoard plugin, report) read what the sinks wrote.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gradwatch"
MAX_LINES = 450

#: lowest first; a module may import its own layer and the layers below.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("schema: stat names, tags, alert fields (torch-free)", ("schema",)),
    ("leaf: no state of the watcher's", (
        "alerts", "thresholds", "blame", "handles", "faults", "inbox", "options", "checksums",
        "sampling", "selection", "distributed", "compiled", "worker")),
    ("compiled: C extensions (no Python imports)", ("_kernels",)),
    ("stats and device buffers", (
        "stats", "cpukernels", "buffers", "hostcopy", "flags", "histograms", "audit")),
    ("hooks and trace (inside forward/backward, and the parameter reads)", (
        "record", "trace", "modflags", "batched", "hooks", "params", "lazy", "amp", "origin",
        "nonfinite", "structure")),
    ("step path: the end of a step, its flags, the watcher's lifetime", (
        "engine", "monitor", "stepping", "shutdown", "lifetime")),
    ("snapshot: a window on the host", ("snapshot",)),
    ("publish, rules, diagnosis (background thread)", (
        "publish", "rules", "diagnosis", "paths", "steplr")),
    ("sinks: what a window is written as", (
        "sinks", "sinks.console", "sinks.notebook", "sinks.tensorboard")),
    ("offline reading: logs, plots, the TensorBoard plugin", (
        "reader", "plot", "textreport", "tb_plugin")),
    ("sinks drawn with the offline plots", ("sinks.pictures",)),
    ("the watcher facade and the package's public names", ("watcher", "assembly", "")),
    ("entry points: integrations, the demo, the command line", (
        "integrations", "integrations.lightning", "integrations.transformers", "demo",
        "cli", "__main__")),
]
LAYER = {m: i for i, (_, mods) in enumerate(LAYERS) for m in mods}
#: in the table before its file exists (another change adds it)
OPTIONAL = {"schema"}
#: extension modules built from C sources of the package (``_kernels.c``: ``_kernels``)
COMPILED = {p.stem for p in PACKAGE.glob("*.c")}


def module_files() -> dict[str, Path]:
    """Module name relative to the package ("" for the package itself) -> its file."""
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = list(p.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return ((isinstance(t, ast.Name) and t.id == "TYPE_CHECKING")
            or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"))


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports (at any depth of its code, TYPE_CHECKING
    blocks left out)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = ["gradwatch"] + (name.split(".") if name else [])
    pkg = here if path.name == "__init__.py" else here[:-1]
    found: set[str] = set()

    def add(full: str, names: list[str]) -> None:
        if full != "gradwatch" and not full.startswith("gradwatch."):
            return
        rel = full[len("gradwatch."):] if full != "gradwatch" else ""
        for n in names:  # `from gradwatch import stats`: the module gradwatch.stats
            sub = f"{rel}.{n}" if rel else n
            if sub in known:
                found.add(sub)
                break
        else:
            while rel and rel not in known:
                rel = rel.rpartition(".")[0]
            found.add(rel)

    def visit(node: ast.AST) -> None:
        for ch in ast.iter_child_nodes(node):
            if isinstance(ch, ast.If) and _type_checking(ch):
                for x in ch.orelse:
                    visit_one(x)
                continue
            visit_one(ch)

    def visit_one(ch: ast.AST) -> None:
        if isinstance(ch, ast.Import):
            for a in ch.names:
                add(a.name, [])
        elif isinstance(ch, ast.ImportFrom):
            if ch.level:
                base = pkg[: len(pkg) - ch.level + 1]
                full = ".".join(base + ([ch.module] if ch.module else []))
            else:
                full = ch.module or ""
            for a in ch.names:
                add(full, [a.name])
        visit(ch)

    visit(tree)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files) | COMPILED
    return {n: imports_of(n, p, known) for n, p in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), and modules
    that import themselves: every import cycle lies in one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def label(m: str) -> str:
    return f"gradwatch.{m}" if m else "gradwatch"


def test_every_module_has_a_layer() -> None:
    files = module_files()
    missing = sorted(label(m) for m in files if m not in LAYER)
    assert not missing, f"modules missing from the layer table: {missing}"
    gone = sorted(label(m) for m in LAYER
                  if m not in files and m not in COMPILED and m not in OPTIONAL)
    assert not gone, f"layer table names modules that do not exist: {gone}"


def test_no_import_runs_upward() -> None:
    upward = []
    for m, deps in sorted(import_graph().items()):
        for d in sorted(deps):
            if m in LAYER and d in LAYER and LAYER[d] > LAYER[m]:
                upward.append(f"{label(m)} ({LAYERS[LAYER[m]][0]}) imports {label(d)} "
                              f"({LAYERS[LAYER[d]][0]})")
    assert not upward, "\n".join(upward)


def test_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_no_module_over_max_lines() -> None:
    long = {label(m): n for m, p in module_files().items()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, long


@pytest.mark.parametrize("source, expected", [
    ("from gradwatch.hooks import _Inert\n", {"hooks"}),
    ("def f():\n    from gradwatch import stats as S\n", {"stats"}),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from gradwatch import watcher\n",
     set()),
    ("import gradwatch.sinks.tensorboard\n", {"sinks.tensorboard"}),
])
def test_the_graph_reads_imports_as_python_runs_them(tmp_path: Path, source: str,
                                                     expected: set[str]) -> None:
    """The reader the checks above rely on: imports in functions count, TYPE_CHECKING
    ones do not, a submodule named in ``from gradwatch import x`` is that module."""
    f = tmp_path / "probe.py"
    f.write_text(source)
    assert imports_of("probe", f, set(module_files())) == expected


def test_a_cycle_is_found() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
