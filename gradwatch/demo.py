"""The built-in demonstration: Glorot & Bengio's failing deep sigmoid net, diagnosed, then
fixed the way the diagnosis says.

Both nets train on the same synthetic classification task; gradwatch watches each and
writes one TensorBoard run per net. The broken net's report shows what is wrong, why (the
cause, from the weights measured at ``watch()`` and the activations measured in training)
and what to try (the hint); the second net applies the hint's first remedy.
"""

from __future__ import annotations

import os
import shutil
import sys
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
          lr: float = 0.05, seed: int = 0) -> tuple[gradwatch.Watcher, float, float]:
    """Train under gradwatch; returns the watcher, the final loss and the train accuracy."""
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
    return w, loss.item(), acc


def command(name: str) -> str:
    """How to type the console command ``name`` of this installation: its bare name when
    that is what the shell finds, else its path (``.venv/bin/tensorboard`` after ``make
    demo`` in a clone, whose virtual environment is not activated)."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    found = shutil.which(name)
    if not os.path.exists(here) or (found and os.path.samefile(found, here)):
        return name
    rel = os.path.relpath(here)
    return rel if not rel.startswith("..") else here


def commands(logdir: str) -> str:
    """The commands that open what the demo wrote (each works with the runtime install)."""
    import importlib.util

    plot = f"  {command('gradwatch')} plot {logdir} -o flow.png"
    try:
        have_plot = importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):
        have_plot = False
    if not have_plot:
        plot += ("    (needs the plot extra: pip install 'gradwatch[plot]', in a clone "
                 f"{command('pip')} install -e '.[plot]')")
    return (f"TensorBoard logs written under {logdir}/. Open them with:\n"
            f"  {command('tensorboard')} --logdir {logdir}    (the GRADWATCH tab)\n"
            f"or read them without TensorBoard:\n"
            f"  {command('gradwatch')} report {logdir}\n" + plot)


def run(logdir: str = "runs", steps: int = 300) -> dict[str, gradwatch.Watcher]:
    torch.manual_seed(0)
    broken = mlp(nn.Sigmoid, init="normal")
    fixed = mlp(nn.ReLU, init="he")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        w0, loss0, acc0 = train("sigmoid_normal_init", broken, logdir, steps)
        print(f"=== sigmoid_normal_init: 8 sigmoid layers, weights from N(0, 1): final loss "
              f"{loss0:.3f}, train accuracy {acc0:.1%}")
        print(w0.report())
        w1, loss1, acc1 = train("relu_he_init", fixed, logdir, steps)
    print(f"\n=== relu_he_init: the hint's first remedy, ReLU with nn.init.kaiming_normal_: "
          f"final loss {loss1:.3f}, train accuracy {acc1:.1%}, "
          + (f"{len(w1.alerts)} alert(s)" if w1.alerts else "no alerts"))
    print(f"\nsigmoid_normal_init -> relu_he_init: loss {loss0:.3f} -> {loss1:.3f}, "
          f"train accuracy {acc0:.1%} -> {acc1:.1%}, alerts {len(w0.alerts)} -> "
          f"{len(w1.alerts)}")
    print("\n" + commands(logdir))
    return {"sigmoid_normal_init": w0, "relu_he_init": w1}
