"""DDP and FSDP2 across two real processes (gloo on CPU), against single-process references."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from tests.support import dist_workers as DW
from tests.support.events import event_files, scalars

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="torch built without gloo"),
]
WORLD = 2
TIMEOUT = 240.0


def _launch(body: Any, out: Path) -> tuple[list[dict[str, Any]], Path]:
    """Spawn WORLD processes; any child failure or a hang fails the test with its traceback.
    Returns each rank's result and the directory the ranks wrote into.

    One exception: gloo itself sometimes aborts a rank as its process exits, after
    ``destroy_process_group`` ("terminate called without an active exception", SIGABRT, no
    Python frame; measured here in 1 of 15 runs of a bare two-rank DDP step without
    gradwatch). A rank killed by a signal after every rank wrote its result is accepted
    (the work is done and checked); one killed before any rank wrote anything is launched
    again, twice at most, in a fresh directory.
    """
    for attempt in range(3):
        run_dir = out / f"attempt{attempt}"
        run_dir.mkdir()
        failure = _spawn(body, run_dir)
        errors = "".join(e.read_text() for e in sorted(run_dir.glob("rank*.error")))
        wrote = len(list(run_dir.glob("rank*.json")))
        by_signal = failure is not None and "signal" in failure and not errors
        if by_signal and wrote == WORLD:
            print(f"distributed launch {attempt}: {failure} at exit, after every result")
            failure = None
        elif by_signal and wrote == 0 and attempt < 2:
            print(f"distributed launch {attempt}: {failure} before any result; again")
            continue
        if failure or errors:
            pytest.fail(f"{failure or 'a rank failed'}\n{errors}")
        out = run_dir
        break
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)], out


def _spawn(body: Any, out: Path) -> str | None:
    """Run the ranks; None when all exited cleanly, else what went wrong."""
    ctx = mp.start_processes(DW.run, args=(WORLD, str(out), body), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    failure = None
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                failure = f"distributed run did not finish in {TIMEOUT:.0f}s"
                break
    except ProcessException as e:
        failure = f"a rank failed: {e}"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)
    return failure


def _reference(steps: int = DW.STEPS, window: int | None = None
               ) -> dict[str, dict[str, float]]:
    """Float64, one process: each rank's batch through the same model, DDP-averaged grads,
    over the last ``window`` of ``steps`` steps (None: all).

    Activation and output-gradient stats: the mean over steps and ranks of each rank's
    value (the max for maxima), which is what a flush over two ranks reports.
    """
    m = DW.model().double()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    layers = {"0": m[0], "1": m[1], "2": m[2]}
    acc: dict[str, dict[str, list[float]]] = {n: {} for n in layers}
    first = steps - (window or steps)

    def add(n: str, k: str, v: float, step: int) -> None:
        if step >= first:
            acc[n].setdefault(k, []).append(v)

    for step in range(steps):
        for r in range(WORLD):
            outs: dict[str, torch.Tensor] = {}
            hs = [mod.register_forward_hook(lambda _m, _a, o, n=n, d=outs: d.__setitem__(n, o))
                  for n, mod in layers.items()]
            loss = m(DW.batch(step, r).double()).pow(2).mean()
            for h in hs:
                h.remove()
            grads = torch.autograd.grad(loss, list(outs.values()), retain_graph=True)
            loss.backward()
            for (n, o), g in zip(outs.items(), grads):
                o = o.detach()
                add(n, "act_mean", o.mean().item(), step)
                add(n, "act_std", o.std().item(), step)
                add(n, "act_max", o.abs().max().item(), step)
                add(n, "act_zero_frac", (o == 0).double().mean().item(), step)
                add(n, "out_grad_rms", g.pow(2).mean().sqrt().item(), step)
        before = {n: torch.cat([p.detach().reshape(-1) for p in mod.parameters()]).clone()
                  for n, mod in layers.items() if n != "1"}
        for p in m.parameters():
            p.grad /= WORLD  # DDP averages the gradients of the ranks
        for n in before:
            g = torch.cat([p.grad.reshape(-1) for p in layers[n].parameters()])
            add(n, "grad_norm", g.norm().item(), step)
            add(n, "grad_rms", (g.norm() / math.sqrt(g.numel())).item(), step)
            add(n, "grad_max", g.abs().max().item(), step)
        opt.step()
        opt.zero_grad()
        for n, w0 in before.items():
            w1 = torch.cat([p.detach().reshape(-1) for p in layers[n].parameters()])
            add(n, "weight_norm", w1.norm().item(), step)
            add(n, "update_ratio", ((w1 - w0).norm() / w1.norm()).item(), step)
    return {n: {k: (max(v) if k.endswith("_max") else sum(v) / len(v)) for k, v in d.items()}
            for n, d in acc.items()}


def _assert_matches(got: dict[str, dict[str, float]], ref: dict[str, dict[str, float]],
                    keys: tuple[str, ...] | None = None) -> None:
    for n, stats in ref.items():
        for k, v in stats.items():
            if keys is None or k in keys:
                assert got[n][k] == pytest.approx(v, rel=1e-5, abs=1e-7), (n, k, got[n][k], v)


def test_ddp_two_processes(tmp_path):
    results, run_dir = _launch(DW.ddp_body, tmp_path)
    r0, r1 = results
    assert r0["layers"] == ["0", "1", "2"]  # no "module." prefix
    assert r0["stats"] == r1["stats"]  # both ranks hold the reduced window
    ref = _reference()
    _assert_matches(r0["stats"], ref)
    for n, stats in r0["stats"].items():
        assert stats["nonfinite"] == 0.0, n
    # the reduction: local counts add up, parameter statistics are not multiplied by 2
    for r in results:
        red = r["reduced"]
        assert red["nonfinite"] == [1.0 + 2.0 + 1.0] * 2  # outputs 1 + 2, parameters 1
        assert red["grad_norm"] == [2.0, 2.0] and red["grad_cnt"] == [1.0, 1.0]
        assert red["act_cnt"] == [2.0, 2.0]
    # one writer, one warner: rank 0
    files = event_files(run_dir / "tb")
    assert len(files) == 1
    sc = scalars(run_dir / "tb")
    for n, stats in r0["stats"].items():
        for k, v in stats.items():
            assert sc[f"gradwatch/{k}/{n}"][DW.STEPS] == pytest.approx(v, rel=1e-6)
    assert r0["alerts"] > 0 and r0["warned"] > 0
    assert r1["alerts"] == 0 and r1["warned"] == 0


def test_fsdp2_norms_are_global(tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    results, _ = _launch(DW.fsdp_body, tmp_path)
    ref = _reference()
    keys = ("grad_norm", "grad_rms", "grad_max", "weight_norm", "update_ratio")
    for r in results:
        _assert_matches(r["stats"], ref, keys)
    # activations are each rank's own data, reduced over the ranks at flush
    _assert_matches(results[0]["stats"], ref, ("act_mean", "act_std", "act_max",
                                               "out_grad_rms"))



def test_fsdp2_extreme_gradient_in_another_ranks_shard_on_a_light_step(tmp_path):
    """Rank 0, whose own shards' norms are all 0, still reports within the step a layer whose
    global gradient RMS is over extreme_rms: its norms bound only its own shards."""
    pytest.importorskip("torch.distributed.fsdp")
    r0, r1 = _launch(DW.fsdp_light_body, tmp_path)[0]
    assert r0["light"][3] and r1["light"][3]  # the step of the large gradient is a light one
    # rank 0 reports (as with DDP, the other ranks issue no alerts)
    assert [tuple(a) for a in r0["alerts"]] == [("exploding", "2", 4)]
    assert r1["alerts"] == []


def test_ddp_latest_right_after_the_loop_is_never_stale(tmp_path):
    """100 runs in one process pair (100 launches would take minutes): on both ranks,
    ``latest`` read right after step 20 with every=5 is the window of steps 16-20."""
    results, _ = _launch(DW.stale_body, tmp_path)
    ref = _reference(DW.STALE_STEPS, DW.STALE_EVERY)
    for r in results:
        runs = r["runs"]
        assert len(runs) == DW.STALE_RUNS
        stale = [run and run["step"] for run in runs
                 if run is None or run["step"] != DW.STALE_STEPS]
        assert stale == [], f"{len(stale)} stale reads in {len(runs)} runs"
        for run in runs:
            _assert_matches(run["stats"], ref)
