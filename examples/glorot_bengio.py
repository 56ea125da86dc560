"""Glorot & Bengio (2010), diagnosed and fixed with gradwatch.

1. A deep sigmoid MLP with weights from N(0, 1): its units sit at the bounds of the sigmoid
   and learning stalls. gradwatch flags ``saturated`` and says why (``cause``) and what to
   try (``hint``), from the weights it measured at ``watch()`` and the activations it
   measured while training.
2. The fix the hint names first: a non-saturating activation (ReLU) with the He init that
   keeps the variance of its signal, ``nn.init.kaiming_normal_``. Same task, same steps.
3. The hint's second remedy: tanh with Xavier (Glorot) init.

The fixed nets train without an alert and reach a lower loss and a higher accuracy. Each
run is a TensorBoard run under ``--logdir``.

    python examples/glorot_bengio.py [--logdir runs/glorot_bengio] [--steps 300]
    tensorboard --logdir runs/glorot_bengio
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import gradwatch

DEPTH, WIDTH, D_IN, CLASSES = 6, 64, 32, 10


def mlp(act: Callable[[], nn.Module], init: Callable[[torch.Tensor], object]) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = D_IN
    for _ in range(DEPTH):
        lin = nn.Linear(d, WIDTH)
        init(lin.weight)
        nn.init.zeros_(lin.bias)
        layers += [lin, act()]
        d = WIDTH
    layers.append(nn.Linear(d, CLASSES))
    return nn.Sequential(*layers)


RUNS: dict[str, Callable[[], nn.Sequential]] = {
    "sigmoid_normal": lambda: mlp(nn.Sigmoid, lambda w: nn.init.normal_(w, 0.0, 1.0)),
    "relu_he": lambda: mlp(nn.ReLU, lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu")),
    "tanh_xavier": lambda: mlp(nn.Tanh, lambda w: nn.init.xavier_uniform_(
        w, gain=nn.init.calculate_gain("tanh"))),
}


@dataclass
class Outcome:
    watcher: gradwatch.Watcher
    loss: float
    accuracy: float


def train(name: str, logdir: str, steps: int) -> Outcome:
    torch.manual_seed(0)
    model = RUNS[name]()
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(D_IN, CLASSES, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, optimizer=opt, logdir=os.path.join(logdir, name), every=20,
                         on_alert="ignore") as w:  # the diagnosis is printed below
        for _ in range(steps):
            x = torch.randn(64, D_IN, generator=g)
            loss = F.cross_entropy(model(x), (x @ teacher).argmax(1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        x = torch.randn(2048, D_IN, generator=g)
        acc = (model(x).argmax(1) == (x @ teacher).argmax(1)).float().mean().item()
    print(f"=== {name}: final loss {loss.item():.3f}, accuracy {acc:.1%}, "
          f"{len(w.alerts)} alert(s)")
    return Outcome(w, loss.item(), acc)


def diagnosis(w: gradwatch.Watcher) -> None:
    """Each kind and cause once, with the hint of its first alert."""
    seen: set[tuple[str, str]] = set()
    for a in w.alerts:
        if (a.kind, a.cause) in seen:
            continue
        seen.add((a.kind, a.cause))
        layers = sorted({b.layer for b in w.alerts if (b.kind, b.cause) == (a.kind, a.cause)},
                        key=w.layers.index)
        print(f"  {a.kind} at {', '.join(repr(n) for n in layers)}; cause: {a.cause}")
        print(f"  hint: {a.hint}")


def main(argv: list[str] | None = None) -> dict[str, Outcome]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--logdir", default="runs/glorot_bengio")
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args(argv)
    out = {"sigmoid_normal": train("sigmoid_normal", args.logdir, args.steps)}
    diagnosis(out["sigmoid_normal"].watcher)
    print("\nThe hint's first remedy, ReLU with nn.init.kaiming_normal_, then its second, "
          "tanh with nn.init.xavier_uniform_:")
    for name in ("relu_he", "tanh_xavier"):
        out[name] = train(name, args.logdir, args.steps)
    before = out["sigmoid_normal"]
    for name in ("relu_he", "tanh_xavier"):
        after = out[name]
        print(f"sigmoid_normal -> {name}: loss {before.loss:.3f} -> {after.loss:.3f}, "
              f"accuracy {before.accuracy:.1%} -> {after.accuracy:.1%}, alerts "
              f"{len(before.watcher.alerts)} -> {len(after.watcher.alerts)}")
    print(f"\nTensorBoard: tensorboard --logdir {args.logdir}")
    return out


if __name__ == "__main__":
    main()
