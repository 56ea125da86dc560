"""The README's example: a deep sigmoid net with N(0, 1) weights, watched."""
import torch
import torch.nn as nn

import gradwatch

torch.manual_seed(0)
model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(64, 64), nn.Sigmoid())],
                      nn.Linear(64, 10))
for lin in model[::2]:
    nn.init.normal_(lin.weight, 0.0, 1.0)  # Glorot & Bengio's failing init
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

with gradwatch.watch(model, optimizer=opt, logdir="runs/quickstart", every=20) as watcher:
    for _ in range(200):
        x = torch.randn(128, 64)
        loss = nn.functional.cross_entropy(model(x), x[:, :10].argmax(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
print(watcher.report())
