"""Every ```python block of README.md runs exactly as printed.

The blocks are read from README.md when the tests are collected (never copied here); each
runs in a fresh Python process in an empty working directory, so a block that writes
``runs/...`` writes there, and what it wrote is read back with TensorBoard's reader."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.events import scalars

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def blocks() -> list[str]:
    return FENCE.findall(README.read_text())


def test_the_readme_has_its_python_blocks():
    found = blocks()
    assert len(found) >= 3
    assert any("gradwatch.unwatch(model)" in b for b in found)


@pytest.mark.parametrize("index", range(len(blocks())))
def test_readme_block_runs_as_printed(tmp_path: Path, index: int) -> None:
    code = blocks()[index]
    script = tmp_path / f"readme_block_{index}.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    p = subprocess.run([sys.executable, script.name], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"README block {index} failed:\n{code}\n{p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    assert "GradwatchWarning" not in p.stderr  # no internal fault
    for logdir in re.findall(r'logdir="(runs/[^"]+)"', code):
        tags = scalars(tmp_path / logdir)
        grad = [t for t in tags if t.startswith("gradwatch/grad_norm/")]
        assert grad, f"block {index} wrote no gradwatch data into {logdir}"
        every, loop = re.search(r"every=(\d+)", code), re.search(r"in range\((\d+)\):", code)
        if every and loop:  # every window, then the partial last one (at close or exit)
            k, n = int(every[1]), int(loop[1])
            want = list(range(k, n + 1, k)) + ([n] if n % k else [])
            assert sorted(tags[grad[0]]) == want, (index, logdir)
        values = [v for t in grad for v in tags[t].values()]
        assert all(0 < v < 1e3 for v in values), values
    if "print(watcher.report())" in code:
        assert "gradwatch report, step" in p.stdout
