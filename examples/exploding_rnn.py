"""An exploding tanh RNN, flagged by gradwatch with its cause (the recurrent weight's gain,
measured at ``watch()``); then the same model, quiet, with the remedies the hint names: an
orthogonal recurrent init and gradient clipping.

The task: read 40 steps of 8-channel noise and output the (scaled) sum of channel 0.
With the recurrent weight an orthogonal matrix times 3, back-propagation through time
multiplies the error signal by up to 3 per step: the gradients of the RNN reach ~1e3 while
the loss stays finite. gradwatch reads the gradient the optimizer uses (after clipping), so
the fixed run is quiet.

    python examples/exploding_rnn.py [--logdir runs/exploding_rnn] [--steps 150]
    tensorboard --logdir runs/exploding_rnn
"""

from __future__ import annotations

import argparse
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import gradwatch

T, D_IN, HIDDEN = 40, 8, 32


class SeqModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(D_IN, HIDDEN)
        self.rnn = nn.RNN(HIDDEN, HIDDEN, batch_first=True, nonlinearity="tanh")
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.inp(x))
        return self.head(out[:, -1]).squeeze(-1)


def train(name: str, logdir: str, steps: int, gain: float,
          clip: float | None) -> gradwatch.Watcher:
    torch.manual_seed(0)
    model = SeqModel()
    with torch.no_grad():
        nn.init.orthogonal_(model.rnn.weight_hh_l0)
        model.rnn.weight_hh_l0.mul_(gain)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    with gradwatch.watch(model, optimizer=opt, logdir=os.path.join(logdir, name), every=10,
                         on_alert="ignore") as w:
        for _ in range(steps):
            x = torch.randn(32, T, D_IN, generator=g)
            loss = F.mse_loss(model(x), x[:, :, 0].sum(1) / math.sqrt(T))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
    print(f"\n=== {name}: final loss {loss.item():.3f}, {len(w.alerts)} alert(s)")
    hinted: set[str] = set()
    for a in w.alerts:
        print("  " + a.message)
        if a.cause not in hinted:  # why, and what to try: once per cause
            hinted.add(a.cause)
            print(f"    cause {a.cause}: {a.hint}")
    return w


def main(argv: list[str] | None = None) -> dict[str, gradwatch.Watcher]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--logdir", default="runs/exploding_rnn")
    p.add_argument("--steps", type=int, default=150)
    args = p.parse_args(argv)
    out = {
        "rnn_gain3": train("rnn_gain3", args.logdir, args.steps, gain=3.0, clip=None),
        "rnn_orthogonal_clipped": train("rnn_orthogonal_clipped", args.logdir, args.steps,
                                        gain=1.0, clip=1.0),
    }
    print(f"\nTensorBoard: tensorboard --logdir {args.logdir}")
    return out


if __name__ == "__main__":
    main()
