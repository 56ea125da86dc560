"""GPU check (needs CUDA; under 5 minutes): overhead and zero syncs on a GPT-style model.

A 12-layer, d=768 causal transformer (pre-norm, GELU, bf16 autocast, fused AdamW), trained
on random tokens: bare vs gradwatch default vs gradwatch with every stat on every element
every step and a flush every step. For the bare and default variants the steps between
flushes are counted under ``torch.cuda.set_sync_debug_mode("warn")``, per thread: gradwatch
must add none on the training thread (the bare step itself may sync, e.g. in an embedding
backward). Then 5 more steps of the default variant run under ``"error"``: any host sync on
the training thread raises. The flush-every-step variant's background thread may wait on
the copy's event; those waits are counted apart.

    python benchmarks/gpu_check.py [--steps 30] [--batch 8] [--seq 512]

Prints one line per variant and the ratios; exits 1 if a sync was found between flushes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
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


def run(variant: str, steps: int, batch: int, seq: int, tmp: str,
        strict_check: bool) -> dict[str, Any]:
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

    # warm-up; the default watcher reads its first window (100 steps) on every step, then
    # samples one step in 10: time the steady state after it
    for _ in range(105 if variant == "default" else 5):
        step()
    torch.cuda.synchronize()
    main = threading.current_thread()
    syncs = {"training": 0, "background": 0}

    def record(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
        if "synchroniz" in str(message):
            syncs["training" if threading.current_thread() is main else "background"] += 1

    t0 = time.perf_counter()
    times = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
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
    strict = None
    if variant == "default" and strict_check:  # any sync on the training thread raises
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(5):
                step()
            strict = "passed"
        except RuntimeError as e:
            strict = f"FAILED: {e}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps
    ms = [s.elapsed_time(e) for s, e in times]
    if w is not None:
        w.close()
    # the mean, not the median: the sampled steps of the default variant count in full
    return {"variant": variant, "step_ms": statistics.fmean(ms), "wall_ms": 1e3 * wall,
            "syncs_training": syncs["training"], "syncs_background": syncs["background"],
            "strict": strict}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)  # whole sampling periods (10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing measured")
        return 0
    tmp = tempfile.mkdtemp(prefix="gwgpu-")
    res: dict[str, list[dict[str, Any]]] = {}
    for r in range(a.rounds):
        for v in ("bare", "default", "full") if r % 2 == 0 else ("full", "default", "bare"):
            # the strict check proves something only where the bare step itself never syncs
            strict = "bare" in res and max(o["syncs_training"] for o in res["bare"]) == 0
            out = run(v, a.steps, a.batch, a.seq, tmp, strict)
            res.setdefault(v, []).append(out)
            print(f"round {r} {v:8s} {out['step_ms']:8.2f} ms/step (wall {out['wall_ms']:.2f})"
                  f" syncs: training thread {out['syncs_training']}, background "
                  f"{out['syncs_background']}; strict check: {out['strict']}", flush=True)
    base = statistics.median(o["step_ms"] for o in res["bare"])
    bare_syncs = max(o["syncs_training"] for o in res["bare"])
    summary = {}
    bad = False
    for v, outs in res.items():
        med = statistics.median(o["step_ms"] for o in outs)
        added = max(o["syncs_training"] for o in outs) - bare_syncs
        summary[v] = {"ms": med, "ratio": med / base, "syncs_added_on_training_thread": added}
        bad = bad or added > 0 or any(str(o["strict"]).startswith("FAILED") for o in outs)
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "summary": summary}, indent=1))
    return 1 if bad else 0  # a sync that gradwatch added, or the strict check failed


if __name__ == "__main__":
    sys.exit(main())
