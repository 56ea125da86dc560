"""Glorot & Bengio (2010), reproduced with gradwatch.

Three deep MLPs on the same synthetic 10-class task, side by side as TensorBoard runs:

* sigmoid, weights from N(0, 1): the units sit at the bounds of the sigmoid and learning
  stalls -> gradwatch flags ``saturated``;
* tanh, Xavier (Glorot) init: healthy;
* ReLU, He init: healthy.

    python examples/glorot_bengio.py [--logdir runs/glorot_bengio] [--steps 300]
    tensorboard --logdir runs/glorot_bengio
"""

from __future__ import annotations

import argparse
import os
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
    "tanh_xavier": lambda: mlp(nn.Tanh, lambda w: nn.init.xavier_uniform_(
        w, gain=nn.init.calculate_gain("tanh"))),
    "relu_he": lambda: mlp(nn.ReLU, lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu")),
}


def train(name: str, logdir: str, steps: int) -> gradwatch.Watcher:
    torch.manual_seed(0)
    model = RUNS[name]()
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(D_IN, CLASSES, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, optimizer=opt, logdir=os.path.join(logdir, name), every=20,
                         on_alert="ignore") as w:
        for _ in range(steps):
            x = torch.randn(64, D_IN, generator=g)
            loss = F.cross_entropy(model(x), (x @ teacher).argmax(1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        x = torch.randn(2048, D_IN, generator=g)
        acc = (model(x).argmax(1) == (x @ teacher).argmax(1)).float().mean().item()
    print(f"\n=== {name}: final loss {loss.item():.3f}, accuracy {acc:.1%}, "
          f"{len(w.alerts)} alert(s)")
    for a in w.alerts:
        print("  " + a.message)
    return w


def main(argv: list[str] | None = None) -> dict[str, gradwatch.Watcher]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--logdir", default="runs/glorot_bengio")
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args(argv)
    out = {name: train(name, args.logdir, args.steps) for name in RUNS}
    print(f"\nTensorBoard: tensorboard --logdir {args.logdir}")
    return out


if __name__ == "__main__":
    main()
