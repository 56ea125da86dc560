"""What the initialization audit adds to ``watch()`` (CPU, one thread).

For a 1,000-module net (500 Linear + 500 Tanh, 64 and 1024 wide) and LSTMs of 1024 and
4096 hidden units: the audit alone (``InitAudit.seconds``) and the whole ``watch()`` call
that includes it (best of 3; of 1 for the big ones). The audit is one reduction per weight and one
largest-singular-value computation per recurrent gate block, then one host read.

    python benchmarks/audit_cost.py
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn as nn

import gradwatch
from gradwatch.audit import audit
from gradwatch.selection import select


def mlp(width: int) -> nn.Module:
    return nn.Sequential(*[m for _ in range(500) for m in (nn.Linear(width, width), nn.Tanh())])


def best(f: Callable[[], float], reps: int) -> float:
    return min(f() for _ in range(reps))


def watch_seconds(model: nn.Module) -> float:
    t0 = time.perf_counter()
    w = gradwatch.watch(model, tensorboard=False)
    t = time.perf_counter() - t0
    w.close()
    return t


def measure(model: nn.Module, reps: int) -> tuple[float, float]:
    chosen = select(model, None, None)
    return (best(lambda: audit(model, chosen).seconds, reps),
            best(lambda: watch_seconds(model), reps))


def main() -> None:
    torch.set_num_threads(1)
    cases: list[tuple[str, Callable[[], nn.Module], int]] = [
        ("1,000 modules, Linear(64, 64)", lambda: mlp(64), 3),
        ("1,000 modules, Linear(1024, 1024)", lambda: mlp(1024), 1),
        ("LSTM(1024, 1024), 2 layers", lambda: nn.LSTM(1024, 1024, num_layers=2), 3),
        ("LSTM(4096, 4096)", lambda: nn.LSTM(4096, 4096), 1)]
    print(f"{'model':36s} {'audit':>8s} {'watch()':>9s}")
    for name, build, reps in cases:
        a, total = measure(build(), reps)
        print(f"{name:36s} {a:7.3f}s {total:8.3f}s", flush=True)


if __name__ == "__main__":
    main()
