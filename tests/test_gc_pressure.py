"""What a training step leaves to Python's garbage collector.

Python runs a full collection, a walk over every object of the process (several hundred
thousand once torch is imported: about 0.1 s here), whenever the objects that outlived two
younger collections reach a quarter of the rest. A watcher that kept a tuple, a weak
reference or a hook handle per module and per step (held until the step ends, so they
outlive the young collections) made a 1,000-module model run a full collection every
20 steps of its first window. So the objects a step makes and still holds at its optimizer
step must not grow with the number of modules, on light and on sampled steps alike.
"""

from __future__ import annotations

import gc
import tempfile

import pytest
import torch
import torch.nn as nn

import gradwatch
from gradwatch.batched import HOLD_COUNT


class Block(nn.Module):
    """A module with code of its own: the trace hooks its gradients on every step."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.act = nn.Linear(16, 16), nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.01 * self.act(self.lin(x))


def held_at_optimizer_step(modules: int, kind: str | None, blocks: bool = False) -> int:
    """GC-tracked objects made during one training step (the 6th) and alive when the
    optimizer steps (its pre-step hook, after gradwatch's own), the parameters' gradients
    left out; ``kind``: None (no watcher), "light" or "sampled"."""
    torch.manual_seed(0)
    if blocks:
        model = nn.Sequential(*[Block() for _ in range(modules // 3)])
    else:
        model = nn.Sequential(*[m for _ in range(modules // 2)
                                for m in (nn.Linear(16, 16), nn.Tanh())])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    w = None
    if kind is not None:
        w = gradwatch.watch(model, optimizer=opt, logdir=tempfile.mkdtemp(),
                            every=10**6, sample_every=1 if kind == "sampled" else 10**6,
                            on_alert="ignore")
    x = torch.randn(8, 16)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        opt.step()

    for _ in range(5):
        step()
    found: list[int] = []

    def pre(*_: object) -> None:
        # the parameters' gradients are the optimizer's to read (it makes the same Python
        # objects of them a moment later)
        grads = {id(p.grad) for p in model.parameters() if p.grad is not None}
        found.append(sum(1 for o in gc.get_objects()
                         if id(o) not in before and id(o) not in grads))

    gc.collect()
    enabled = gc.isenabled()
    gc.disable()  # nothing collected while counting
    try:
        before = {id(o) for o in gc.get_objects()}
        h = opt.register_step_pre_hook(pre)
        step()
        h.remove()
    finally:
        if enabled:
            gc.enable()
    if w is not None:
        w.close()
    return found[0]


@pytest.mark.parametrize("blocks", [False, True])
@pytest.mark.parametrize("kind", ["light", "sampled"])
def test_a_step_holds_no_object_per_module_for_the_collector(kind: str, blocks: bool) -> None:
    """Light steps hold a few objects whatever the model; sampled steps at most the
    ``HOLD_COUNT`` output gradients that a batch holds before it is reduced."""
    bound = 60 if kind == "light" else HOLD_COUNT + 60
    extra = [held_at_optimizer_step(n, kind, blocks) - held_at_optimizer_step(n, None, blocks)
             for n in (20, 400, 1200)]
    assert all(e <= bound for e in extra), extra
