"""An independent float64 recorder: what gradwatch should report, computed the slow way."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn as nn


def small_mlp() -> nn.Sequential:
    """Linear, Tanh (bounded), Linear, ReLU, Linear: every stat of API.md applies somewhere."""
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 3))


def close(a: float, b: float, rel: float = 1e-3, abs_: float = 1e-7) -> bool:
    """Relative closeness with an absolute floor for values near 0."""
    return abs(a - b) <= max(rel * abs(b), abs_)


class Float64Reference:
    """Records each watched module's outputs, output gradients and parameters in float64,
    per step, through its own hooks; ``window()`` gives the expected window stats."""

    def __init__(self, modules: dict[str, nn.Module], bounds: dict[str, tuple[float, float]],
                 margin: float = 0.01) -> None:
        self.modules = modules
        self.bounds = bounds
        self.margin = margin
        self.steps: list[dict[str, dict[str, list[torch.Tensor]]]] = []
        self.handles = []
        self._new_step()
        for name, m in modules.items():
            self.handles.append(m.register_forward_hook(self._fwd(name)))

    def _new_step(self) -> None:
        self.cur: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        self.steps.append(self.cur)

    def _fwd(self, name):
        def hook(mod, args, out):
            t = out[0] if isinstance(out, tuple) else out
            self.cur[name]["act"].append(t.detach().double().clone())
            if t.requires_grad:
                t.register_hook(lambda g: self.cur[name]["og"].append(g.double().clone()))
        return hook

    def before_step(self) -> None:
        for name, m in self.modules.items():
            ps = [p for p in m.parameters(recurse=False)]
            self.cur[name]["grad"] = [p.grad.double().clone() for p in ps if p.grad is not None]
            self.cur[name]["w0"] = [p.detach().double().clone() for p in ps]

    def after_step(self) -> None:
        for name, m in self.modules.items():
            ps = m.parameters(recurse=False)
            self.cur[name]["w1"] = [p.detach().double().clone() for p in ps]
        self._new_step()

    def train_step(self, model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
        """One step of ``model`` on ``x`` (loss: mean square of the output), recorded."""
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        self.before_step()
        opt.step()
        self.after_step()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def window(self, steps: list[int]) -> dict[str, dict[str, float]]:
        """Expected stats over the given (sampled) step indices."""
        out: dict[str, dict[str, float]] = {}
        for name in self.modules:
            per: dict[str, list[float]] = defaultdict(list)
            gmax = amax = -math.inf
            for k in steps:
                rec = self.steps[k][name]
                if rec["grad"]:
                    flat = torch.cat([g.reshape(-1) for g in rec["grad"]])
                    per["grad_norm"].append(flat.norm().item())
                    per["grad_rms"].append(flat.norm().item() / math.sqrt(flat.numel()))
                    gmax = max(gmax, flat.abs().max().item())
                if rec["w1"]:
                    w1 = torch.cat([w.reshape(-1) for w in rec["w1"]])
                    w0 = torch.cat([w.reshape(-1) for w in rec["w0"]])
                    per["weight_norm"].append(w1.norm().item())
                    per["update_ratio"].append((w1 - w0).norm().item() / w1.norm().item())
                if rec["act"]:
                    a = torch.cat([x.reshape(-1) for x in rec["act"]])
                    per["act_mean"].append(a.mean().item())
                    per["act_std"].append(a.std().item())
                    per["act_zero_frac"].append((a == 0).double().mean().item())
                    amax = max(amax, a.abs().max().item())
                    if name in self.bounds:
                        lo, hi = self.bounds[name]
                        m = self.margin * (hi - lo)
                        sat = ((a <= lo + m) | (a >= hi - m)).double().mean().item()
                        per["act_sat_frac"].append(sat)
                if rec["og"]:
                    g = torch.cat([x.reshape(-1) for x in rec["og"]])
                    per["out_grad_rms"].append(math.sqrt((g * g).mean().item()))
            res = {k: sum(v) / len(v) for k, v in per.items()}
            if gmax > -math.inf:
                res["grad_max"] = gmax
            if amax > -math.inf:
                res["act_max"] = amax
            out[name] = res
        return out
