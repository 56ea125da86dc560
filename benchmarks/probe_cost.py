"""What learning the model's dataflow costs, once: the walk of the first training forward's
autograd graph (``structure.StructureProbe``) and placing the audit on it
(``paths.place_on_graph``, on the background thread), on Hugging Face GPT-2 configs.

    python benchmarks/probe_cost.py
"""

from __future__ import annotations

import os
import time

import torch

import gradwatch
import gradwatch.paths as paths
import gradwatch.structure as structure

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(1)
    for layers, width in ((12, 256), (12, 768)):
        torch.manual_seed(0)
        net = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=width, n_head=4,
                                         n_positions=64, vocab_size=512))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        walks: list[tuple[float, int]] = []
        walk = structure._walk

        def timed(calls, walk=walk, walks=walks):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            g = walk(calls)
            walks.append((time.perf_counter() - t0, len(g.ops)))
            return g

        structure._walk = timed
        x = torch.randint(0, 512, (4, 32))
        try:
            with gradwatch.watch(net, optimizer=opt, tensorboard=False, every=100) as w:
                fwd = []
                for _ in range(4):
                    t0 = time.perf_counter()
                    loss = net(input_ids=x, labels=x).loss
                    fwd.append(time.perf_counter() - t0)
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
                d = w._parts.rules.diagnosis
                t0 = time.perf_counter()
                paths.place_on_graph(w.layers, d.audit, d.info, d.audit.graph)
                place = time.perf_counter() - t0
        finally:
            structure._walk = walk
        print(f"GPT-2 {layers} blocks x {width}: forward {fwd[0] * 1e3:.0f} ms (first, with "
              f"the probe) vs {min(fwd[1:]) * 1e3:.0f} ms after; graph walk "
              f"{walks[0][0] * 1e3:.1f} ms over {walks[0][1]} autograd nodes; "
              f"place_on_graph {place * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
