"""GPU check (needs CUDA; under 5 minutes): overhead and zero syncs on a GPT-style model.

A 12-layer, d=768 causal transformer (pre-norm, GELU, bf16 autocast, fused AdamW), trained
on random tokens: bare vs gradwatch default vs gradwatch with every stat on every element
every step and a flush every step. For the bare and default variants the steps between
flushes run under ``torch.cuda.set_sync_debug_mode("error")``: any host sync raises. For
the flush-every-step variant the mode is "warn" and the warnings are counted (its flush
copies without waiting, and the background thread may wait on the copy's event).

    python benchmarks/gpu_check.py [--steps 30] [--batch 8] [--seq 512]

Prints one line per variant and the ratios; exits 1 if a sync was found between flushes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.proj(self.act(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int = 8192, d: int = 768, layers: int = 12, heads: int = 12,
                 seq: int = 512) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.register_buffer("mask", torch.triu(torch.full((seq, seq), float("-inf")), 1))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.tok(idx) + self.pos.weight[:T]
        for b in self.blocks:
            x = b(x, self.mask[:T, :T])
        return self.head(self.ln(x))


def run(variant: str, steps: int, batch: int, seq: int, tmp: str) -> dict[str, Any]:
    import gradwatch

    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = GPT(seq=seq).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    idx = torch.randint(0, 8192, (batch, seq + 1), device=dev)
    x, y = idx[:, :-1], idx[:, 1:]
    w = None
    if variant == "default":
        w = gradwatch.watch(model, optimizer=opt, logdir=tmp + "/d", on_alert="ignore")
    elif variant == "full":
        w = gradwatch.watch(model, optimizer=opt, logdir=tmp + "/f", every=1, sample_every=1,
                            on_alert="ignore")
        w._collector.sample = None

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()

    for _ in range(5):  # warm-up; the default watcher's first window ends at step 100
        step()
    torch.cuda.synchronize()
    syncs = 0
    mode = "warn" if variant == "full" else "error"
    t0 = time.perf_counter()
    times = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(mode)
        try:
            for _ in range(steps):
                s = torch.cuda.Event(enable_timing=True)
                e = torch.cuda.Event(enable_timing=True)
                s.record()
                step()
                e.record()
                times.append((s, e))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(c.message) for c in caught)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps
    ms = [s.elapsed_time(e) for s, e in times]
    if w is not None:
        w.close()
    return {"variant": variant, "median_ms": statistics.median(ms), "wall_ms": 1e3 * wall,
            "syncs": syncs, "mode": mode}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing measured")
        return 0
    tmp = tempfile.mkdtemp(prefix="gwgpu-")
    res: dict[str, list[dict[str, Any]]] = {}
    bad = False
    for r in range(a.rounds):
        for v in ("bare", "default", "full") if r % 2 == 0 else ("full", "default", "bare"):
            try:
                out = run(v, a.steps, a.batch, a.seq, tmp)
            except RuntimeError as e:  # set_sync_debug_mode("error") raises on a sync
                print(f"round {r} {v}: SYNC between flushes: {e}")
                bad = True
                continue
            res.setdefault(v, []).append(out)
            print(f"round {r} {v:8s} {out['median_ms']:8.2f} ms/step (wall {out['wall_ms']:.2f})"
                  f" syncs={out['syncs']} ({out['mode']})", flush=True)
    summary = {}
    if "bare" in res:
        base = statistics.median(o["median_ms"] for o in res["bare"])
        for v, outs in res.items():
            med = statistics.median(o["median_ms"] for o in outs)
            summary[v] = {"ms": med, "ratio": med / base,
                          "syncs": max(o["syncs"] for o in outs)}
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "summary": summary}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
