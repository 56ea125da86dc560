"""A GPT-2-style transformer (Hugging Face ``GPT2LMHeadModel`` from a config, no download)
trained a few dozen steps on random tokens, watched into a logdir: the dashboard's scale test.

One block is broken on purpose, as a user would find it: the output projection of block
``BROKEN_BLOCK``'s MLP was scaled to 1e-9 and frozen, so the gradient reaching the MLP's
input projection (``...mlp.c_fc``) vanishes while every other layer is healthy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

import gradwatch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
N_BLOCKS = 12
BROKEN_BLOCK = 7
BROKEN = f"transformer.h.{BROKEN_BLOCK}.mlp.c_fc"


@dataclass
class Gpt2Run:
    logdir: str
    run: str
    layers: list[str]  # watcher.layers: forward order
    types: dict[str, str]  # layer -> module type
    latest: dict[str, dict[str, float]]  # watcher.latest.stats
    alerts: list[gradwatch.Alert]
    steps: int
    every: int


def model() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=N_BLOCKS, n_embd=256, n_head=4, n_positions=64, vocab_size=512,
                     bos_token_id=0, eos_token_id=0)
    net = GPT2LMHeadModel(cfg)
    proj = net.transformer.h[BROKEN_BLOCK].mlp.c_proj
    with torch.no_grad():
        proj.weight.mul_(1e-9)
    proj.weight.requires_grad_(False)
    return net


def train(logdir: str, run: str = "gpt2", steps: int = 40, every: int = 5) -> Gpt2Run:
    """Batches of 4 random 32-token sequences, AdamW; returns what the watcher saw."""
    net = model()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    with gradwatch.watch(net, optimizer=opt, logdir=os.path.join(logdir, run), every=every,
                         on_alert="ignore") as w:
        for _ in range(steps):
            x = torch.randint(0, 512, (4, 32), generator=g)
            loss = net(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    types = {n: type(m).__name__ for n, m in net.named_modules()}
    return Gpt2Run(logdir, run, w.layers, {la: types[la] for la in w.layers}, w.latest.stats,
                   w.alerts, steps, every)
