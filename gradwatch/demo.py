"""The built-in demonstration: Glorot & Bengio's failing deep sigmoid net beside a healthy one.

Both nets train on the same synthetic classification task; gradwatch watches each and
writes one TensorBoard run per net.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

import torch
import torch.nn as nn

import gradwatch


def mlp(act: Callable[[], nn.Module], depth: int = 8, width: int = 128,
        init: str = "normal") -> nn.Sequential:
    """``depth`` hidden Linear+activation pairs on 32 inputs, 10 classes."""
    layers: list[nn.Module] = []
    d = 32
    for _ in range(depth):
        lin = nn.Linear(d, width)
        if init == "normal":  # the seed's failure: weights from N(0, 1)
            nn.init.normal_(lin.weight, 0.0, 1.0)
        elif init == "he":
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        elif init == "xavier":
            nn.init.xavier_uniform_(lin.weight, gain=nn.init.calculate_gain("tanh"))
        nn.init.zeros_(lin.bias)
        layers += [lin, act()]
        d = width
    layers.append(nn.Linear(d, 10))
    return nn.Sequential(*layers)


def task(seed: int, n: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g)
    w = torch.randn(32, 10, generator=g)
    return x, (x @ w).argmax(1)


def train(name: str, model: nn.Module, logdir: str, steps: int = 300,
          lr: float = 0.05, seed: int = 0) -> gradwatch.Watcher:
    x, y = task(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    with gradwatch.watch(model, optimizer=opt, logdir=os.path.join(logdir, name),
                         every=20, on_alert="ignore") as w:  # listed by report()
        for _ in range(steps):
            idx = torch.randint(0, len(x), (64,), generator=g)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    print(f"\n=== {name}: final loss {loss.item():.3f}, train accuracy {acc:.1%}")
    return w


def run(logdir: str = "runs", steps: int = 300) -> dict[str, gradwatch.Watcher]:
    torch.manual_seed(0)
    nets = {
        "sigmoid_normal_init": mlp(nn.Sigmoid, init="normal"),
        "relu_he_init": mlp(nn.ReLU, init="he"),
    }
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for name, net in nets.items():
            w = train(name, net, logdir, steps)
            print(w.report())
            out[name] = w
    print(f"\nTensorBoard logs written under {logdir}/. Open them with:\n"
          f"  tensorboard --logdir {logdir}    (the GRADWATCH tab)\n"
          f"or read them without TensorBoard:\n"
          f"  gradwatch report {logdir}\n"
          f"  gradwatch plot {logdir} -o flow.png")
    return out
