"""A real short training that leaves a gradwatch logdir with known layers and alerts.

Shared by the report/plot/plugin/browser tests. The ReLU's name is an HTML payload: layer
names are data and every consumer must show it as text.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

import gradwatch

HOSTILE = "<img src=x onerror=alert(1)>"
LAYERS = ["inp", "act", "deep", HOSTILE, "out"]
PARAM_LAYERS = ["inp", "deep", "out"]


@dataclass
class Written:
    logdir: str
    run: str
    alerts: list[gradwatch.Alert]
    steps: int
    every: int


def train(logdir: str, run: str = "dead_relu", steps: int = 60, every: int = 10,
          **watch_kwargs: object) -> Written:
    """A 5-module net whose ReLU is dead from the start (bias -50): a ``dead`` alert."""
    torch.manual_seed(0)
    model = nn.Sequential(collections.OrderedDict([
        ("inp", nn.Linear(8, 16)), ("act", nn.Tanh()), ("deep", nn.Linear(16, 16)),
        (HOSTILE, nn.ReLU()), ("out", nn.Linear(16, 4)),
    ]))
    with torch.no_grad():
        model.deep.bias.fill_(-50.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = os.path.join(logdir, run)
    with gradwatch.watch(model, optimizer=opt, logdir=path, every=every, on_alert="ignore",
                         **watch_kwargs) as w:  # type: ignore[arg-type]
        for _ in range(steps):
            x = torch.randn(32, 8)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return Written(logdir, run, w.alerts, steps, every)
