"""Process bodies for the distributed tests (importable by spawned children)."""

from __future__ import annotations

import json
import os
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

STEPS = 3
BATCH = 8  # per rank
STALE_RUNS = 100  # watch, train, read latest at once: in one process pair
STALE_STEPS, STALE_EVERY = 20, 5


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def batch(step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(BATCH, 6, generator=g)


def run(rank: int, world: int, out: str, body: Callable[..., Any]) -> None:
    """One rank: a file rendezvous in the test's tmp dir (no fixed or raced TCP port; gloo
    then connects the ranks on ports the OS assigns)."""
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method="file://" + os.path.join(out, "store"),
                                rank=rank, world_size=world)
        try:
            result = body(rank, world, out)
        finally:
            dist.destroy_process_group()
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    except BaseException:
        with open(os.path.join(out, f"rank{rank}.error"), "w") as f:
            f.write(traceback.format_exc())
        raise


def ddp_body(rank: int, world: int, out: str) -> dict[str, Any]:
    import warnings

    import gradwatch
    from gradwatch.buffers import ST_N, ST_NF, ParamStepStats, W, WindowBuffers

    ddp = nn.parallel.DistributedDataParallel(model())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w = gradwatch.watch(ddp, optimizer=opt, logdir=os.path.join(out, "tb"), every=STEPS,
                            thresholds={"extreme_rms": 1e-6})  # every layer "explodes"
        for step in range(STEPS):
            ddp(batch(step, rank)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        w.close()
    snap = w.latest
    assert snap is not None

    # the reduction itself: parameter non-finite counts are global already, local ones add
    L = 2
    buf = WindowBuffers(L, torch.device("cpu"))
    buf.stage[:, ST_N] = 4.0  # four output elements
    buf.stage[:, ST_NF] = float(rank + 1)  # local output non-finite count
    z = torch.zeros(L)
    buf.commit_step(ParamStepStats(z + 2.0, z + 1.0, z + 3.0, z + 1.0, z + 1.0), None, None)
    buf.reduce_across_ranks()
    win = buf.window
    reduced = {"nonfinite": win[:, W["nonfinite"]].tolist(),
               "grad_norm": win[:, W["grad_norm"]].tolist(),
               "grad_cnt": win[:, W["grad_cnt"]].tolist(),
               "act_cnt": win[:, W["act_cnt"]].tolist()}
    return {"layers": w.layers, "stats": snap.stats, "step": snap.step,
            "alerts": len(w.alerts),
            "warned": sum(isinstance(c.message, gradwatch.GradwatchWarning) for c in caught),
            "reduced": reduced}


def fsdp_body(rank: int, world: int, out: str) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    import gradwatch

    m = model()
    for layer in m:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w = gradwatch.watch(m, optimizer=opt, tensorboard=False, every=STEPS)
    for step in range(STEPS):
        m(batch(step, rank)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    w.close()
    assert w.latest is not None
    return {"stats": w.latest.stats}


def fsdp_light_body(rank: int, world: int, out: str) -> dict[str, Any]:
    """FSDP2, light steps: at step 4 a gradient far over ``extreme_rms`` lands in one element
    of '2''s bias, in rank 1's shard only (the ReLU is dead: nothing else has a gradient), so
    rank 0's own norms are all 0. The alerts each rank gets."""
    from torch.distributed.fsdp import fully_shard

    import gradwatch

    m = model()
    with torch.no_grad():
        m[0].bias.fill_(-100.0)  # a dead ReLU: only '2''s bias gets a gradient
    for layer in m:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    got: list[Any] = []
    w = gradwatch.watch(m, optimizer=opt, tensorboard=False, every=1000, sample_every=100,
                        on_alert=got.append)
    light = []
    for step in range(6):
        light.append(not w._collector.full)
        scale = 1e5 if step == 3 else 1.0
        (m(batch(step, rank))[:, 2].sum() * scale).backward()  # output 2: rank 1's row
        opt.step()
        opt.zero_grad()
    w.close()
    return {"light": light, "alerts": [(a.kind, a.layer, a.step) for a in got]}


def stale_body(rank: int, world: int, out: str) -> dict[str, Any]:
    """``latest`` read right after the loop, in ``STALE_RUNS`` fresh runs: each rank's step
    and stats of every run (all runs train the same model on the same batches)."""
    import gradwatch

    runs = []
    for _ in range(STALE_RUNS):
        ddp = nn.parallel.DistributedDataParallel(model())
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        w = gradwatch.watch(ddp, optimizer=opt, tensorboard=False, every=STALE_EVERY)
        for step in range(STALE_STEPS):
            loss = ddp(batch(step, rank)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        snap = w.latest  # no flush(), no close() first
        runs.append(None if snap is None else {"step": snap.step, "stats": snap.stats})
        w.close()
    return {"runs": runs}
