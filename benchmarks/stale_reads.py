"""Count stale reads: ``watcher.latest`` read right after the last training step.

Right after step N with ``every=k`` the latest snapshot must be the window ending at the last
multiple of k. A read that races the background flush sees the window before it (or None).
Each run trains a tiny model for ``--steps`` steps with ``every=--every``, reads ``latest``
once, and compares its step with the expected one.

    python benchmarks/stale_reads.py --runs 100            # plain, accumulation, manual
    python benchmarks/stale_reads.py --runs 100 --ddp      # also DDP, two gloo ranks

It only uses the public API with ``optimizer=`` or ``step()``, so the same script measures
an older checkout (``PYTHONPATH=<checkout> python benchmarks/stale_reads.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any, Callable

import torch
import torch.nn as nn

import gradwatch


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def plain(steps: int, every: int, tb: dict[str, Any]) -> int | None:
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    w = gradwatch.watch(m, optimizer=opt, every=every, **tb)
    for _ in range(steps):
        loss = m(torch.randn(8, 6)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    got = w.latest
    w.close()
    return None if got is None else got.step


def accumulation(steps: int, every: int, tb: dict[str, Any]) -> int | None:
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    w = gradwatch.watch(m, optimizer=opt, every=every, **tb)
    for _ in range(steps):
        for _ in range(3):
            (m(torch.randn(8, 6)).pow(2).mean() / 3).backward()
        opt.step()
        opt.zero_grad()
    got = w.latest
    w.close()
    return None if got is None else got.step


def manual(steps: int, every: int, tb: dict[str, Any]) -> int | None:
    m = _model()
    w = gradwatch.watch(m, every=every, **tb)
    for _ in range(steps):
        m(torch.randn(8, 6)).pow(2).mean().backward()
        with torch.no_grad():
            for p in m.parameters():
                p -= 0.05 * p.grad
                p.grad = None
        w.step()
    got = w.latest
    w.close()
    return None if got is None else got.step


def count(fn: Callable[..., int | None], runs: int, steps: int, every: int,
          tensorboard: bool) -> int:
    want = steps // every * every
    stale = 0
    with tempfile.TemporaryDirectory() as d:
        for r in range(runs):
            tb = ({"logdir": os.path.join(d, f"run{r}")} if tensorboard
                  else {"tensorboard": False})
            stale += fn(steps, every, tb) != want
    return stale


def _ddp_rank(rank: int, world: int, store: str, runs: int, steps: int, every: int,
              out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank,
                            world_size=world)
    want = steps // every * every
    stale = 0
    for _ in range(runs):
        ddp = nn.parallel.DistributedDataParallel(_model())
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        w = gradwatch.watch(ddp, optimizer=opt, every=every, tensorboard=False)
        for _ in range(steps):
            loss = ddp(torch.randn(8, 6)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        got = w.latest
        stale += (None if got is None else got.step) != want
        w.close()
    dist.destroy_process_group()
    with open(os.path.join(out, f"rank{rank}"), "w") as f:
        f.write(str(stale))


def ddp(runs: int, steps: int, every: int) -> list[int]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_ddp_rank, args=(2, os.path.join(d, "store"), runs, steps, every, d),
                           nprocs=2, start_method="spawn")
        return [int(open(os.path.join(d, f"rank{r}")).read()) for r in range(2)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--ddp", action="store_true", help="also two DDP ranks (gloo)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"gradwatch from {os.path.dirname(gradwatch.__file__)}")
    print(f"stale reads of latest after {a.steps} steps, every={a.every}, in {a.runs} runs")
    for name, fn in (("plain", plain), ("accumulation", accumulation), ("manual step()", manual)):
        for tensorboard in (True, False):
            n = count(fn, a.runs, a.steps, a.every, tensorboard)
            print(f"  {name:<14} tensorboard={tensorboard!s:<5}  {n:3d} / {a.runs}")
    if a.ddp:
        r0, r1 = ddp(a.runs, a.steps, a.every)
        print(f"  {'DDP, 2 ranks':<14} tensorboard=False  rank 0: {r0} / {a.runs}, "
              f"rank 1: {r1} / {a.runs}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
