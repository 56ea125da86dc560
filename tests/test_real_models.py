"""The real-architecture suite (``tests/support/real_models.py``): Hugging Face GPT-2,
BERT, BART and Llama from their configs, a ResNet, a ConvNeXt with LayerScale, a ViT,
nanoGPT (the causal mask inline and in a module of its own), ``nn.TransformerEncoder`` with
a padding mask and eval passes, an LSTM LM, a VAE, a masked log-softmax head, bf16 autocast,
fp16 with a GradScaler, accumulation with clipping; and their real failures.

A healthy run must train (its loss falls) and raise no alert and no internal warning; a
broken one must raise first the right kind at the right layer with the right cause, on the
step it happens, with a hint true for that fault. ``python benchmarks/real_models.py``
prints the same cases as the table of docs/real-models.md.
"""

from __future__ import annotations

import pytest

from tests.support.real_models import CASES, Case, train


@pytest.mark.slow
@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in CASES])
def test_real_model(case: Case) -> None:
    out = train(case)
    assert out.problems() == [], out.row()
    if case.kind is None:
        assert out.alerts == [] and out.internal == []
        assert len(out.losses) == case.steps
    else:
        assert out.first is not None and out.first.kind == case.kind
        assert out.first.cause == case.cause and out.first.hint


def test_the_table_script_runs_as_documented() -> None:
    # ``python benchmarks/real_models.py CASE`` from the repository's root, as
    # docs/real-models.md gives it: the case's row, right
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "benchmarks/real_models.py", "vit-nan-batch-keyword"],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [r for r in done.stdout.splitlines() if r.startswith("| vit-nan-batch-keyword |")]
    assert len(rows) == 1 and rows[0].endswith("| right |"), done.stdout[-2000:]
