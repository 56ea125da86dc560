"""The non-finite cases of ``anomaly.py``, the training loop they share, and a reference
check that finds each fault's origin the slow way.

Each case is a small model and data in which a NaN or Inf appears at ``FAULT_STEP``. The
reference (``Reference``) applies the definitions of ``Alert.cause`` with host checks of
every module's inputs, parameters and outputs and of the gradients at every module's output
and input: it is what the table compares against, it syncs on every module, and it is never
timed.
"""

from __future__ import annotations

import collections
import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

FAULT_STEP = 165  # the default samples steps 101, 111, ..., 161, 171: 165 is a light step
BATCH = 64

# -- the cases --------------------------------------------------------------------------------


@dataclass
class Setup:
    model: nn.Module
    batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # step -> (inputs, targets)
    at: Callable[[int, torch.optim.Optimizer], None] = lambda step, opt: None
    lr: float = 0.05
    autocast: torch.dtype | None = None  # forward under torch.autocast("cpu", dtype)


@dataclass
class Case:
    name: str
    what: str  # how the fault is made, for the table
    build: Callable[[], Setup]
    expected: tuple[str, str] | None  # (layer, cause) by construction, if it is known


def _data(n_in: int, n_out: int, shape: tuple[int, ...] = ()) -> tuple[list, list]:
    """Eight fixed batches, cycled (inputs and regression targets)."""
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(BATCH, *shape, n_in, generator=g) for _ in range(8)]
    ys = [torch.randn(BATCH, *shape, n_out, generator=g) for _ in range(8)]
    return xs, ys


def _cycle(xs: list, ys: list) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    return lambda step: (xs[step % len(xs)], ys[step % len(ys)])


def _mlp(**middle: nn.Module) -> nn.Sequential:
    layers: dict[str, nn.Module] = {"fc1": nn.Linear(32, 64), "act1": nn.Tanh()}
    layers.update(middle)
    layers.update(fc2=nn.Linear(64, 64), act2=nn.Tanh(), head=nn.Linear(64, 8))
    return nn.Sequential(collections.OrderedDict(layers))


class LogShift(nn.Module):
    """A custom parameter-free leaf; switched on, it computes ``log(x - 1e6)``: NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.on = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.on:
            return torch.log(x - 1e6)
        return x


def custom_leaf() -> Setup:
    model = _mlp(shift=LogShift())

    def at(step: int, opt: Any) -> None:
        model.shift.on = step >= FAULT_STEP

    return Setup(model, _cycle(*_data(32, 8)), at)


class Block(nn.Module):
    """A container whose own forward holds the faulty op, inline."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 64)
        self.on = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.on:
            return torch.log(torch.tanh(self.lin(x)) - 2)
        return torch.tanh(self.lin(x))


def inline_container() -> Setup:
    model = nn.Sequential(collections.OrderedDict(
        fc1=nn.Linear(32, 64), act1=nn.Tanh(), block=Block(), head=nn.Linear(64, 8)))

    def at(step: int, opt: Any) -> None:
        model.block.on = step >= FAULT_STEP

    return Setup(model, _cycle(*_data(32, 8)), at)


class SafeSqrt(nn.Module):
    """A square root that 'cannot' go NaN: forward and loss stay finite, the gradient of the
    branch not taken is 0 * inf = NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.on = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.on:
            return torch.where(x > 0, x.sqrt(), 0)
        return torch.relu(x)


def where_sqrt() -> Setup:
    model = nn.Sequential(collections.OrderedDict(
        fc1=nn.Linear(32, 64), sqrt=SafeSqrt(), fc2=nn.Linear(64, 64), act2=nn.Tanh(),
        head=nn.Linear(64, 8)))

    def at(step: int, opt: Any) -> None:
        model.sqrt.on = step >= FAULT_STEP

    return Setup(model, _cycle(*_data(32, 8)), at)


class RowNorm(nn.Module):
    """Appends each row's L2 norm, written as sqrt(sum(x^2)): its gradient at a zero row is
    0 * inf = NaN (``torch.linalg.vector_norm`` itself gives 0 there in torch 2.x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, torch.sqrt((x * x).sum(1, keepdim=True))], 1)


def zero_norm() -> Setup:
    model = nn.Sequential(collections.OrderedDict(
        fc1=nn.Linear(32, 64, bias=False), norm=RowNorm(), act=nn.Tanh(),
        head=nn.Linear(65, 8)))
    xs, ys = _data(32, 8)
    padded = [x.clone() for x in xs]
    for x in padded:
        x[0] = 0.0  # an all-zero padding sample

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (padded if step >= FAULT_STEP else xs)[step % 8], ys[step % 8]

    return Setup(model, batch)


def nonfinite_batch() -> Setup:
    xs, ys = _data(32, 8)
    bad = xs[FAULT_STEP % 8].clone()
    bad[3, 5] = float("nan")  # one corrupt sample

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (bad if step == FAULT_STEP else xs[step % 8]), ys[step % 8]

    return Setup(_mlp(), batch)


def nan_weight() -> Setup:
    model = _mlp()

    def at(step: int, opt: Any) -> None:
        if step == FAULT_STEP:  # a bad checkpoint loaded between two steps
            with torch.no_grad():
                model.fc2.weight[0, 0] = float("nan")

    return Setup(model, _cycle(*_data(32, 8)), at)


def huge_lr() -> Setup:
    def at(step: int, opt: Any) -> None:
        if step == FAULT_STEP:  # a schedule bug: the learning rate jumps a million-fold
            for g in opt.param_groups:
                g["lr"] *= 1e6

    return Setup(_mlp(), _cycle(*_data(32, 8)), at)


class Attention(nn.Module):
    """Single-head self-attention without the 1/sqrt(d) scaling of its logits."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(1, 2)
        return torch.softmax(scores, -1) @ self.v(x)


def fp16_overflow() -> Setup:
    model = nn.Sequential(collections.OrderedDict(
        embed=nn.Linear(16, 64), attn=Attention(64), head=nn.Linear(64, 8)))
    xs, ys = _data(16, 8, (16,))  # 64 sequences of 16 positions
    raw = [x * 200 for x in xs]  # the same data, not normalized

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (raw if step >= FAULT_STEP else xs)[step % 8], ys[step % 8]

    return Setup(model, batch, autocast=torch.float16, lr=0.01)


CASES: dict[str, Case] = {c.name: c for c in (
    Case("custom_leaf", "a custom parameter-free leaf computes `torch.log(x - 1e6)`",
         custom_leaf, ("shift", "forward_op")),
    Case("inline_container", "a container's own forward: "
         "`h = torch.log(torch.tanh(self.lin(x)) - 2)`", inline_container,
         ("block", "forward_op")),
    Case("where_sqrt", "`torch.where(x > 0, x.sqrt(), 0)` in a custom module: forward and "
         "loss finite, its gradient NaN", where_sqrt, ("sqrt", "backward_op")),
    Case("zero_norm", "a row norm `sqrt(sum(x^2))` of a zero row (a padding sample): "
         "backward 0 * inf", zero_norm, ("norm", "backward_op")),
    Case("nonfinite_batch", "one NaN in one batch", nonfinite_batch, ("fc1", "input")),
    Case("nan_weight", "a checkpoint with one NaN weight in `fc2` is loaded", nan_weight,
         ("fc2", "parameters")),
    Case("huge_lr", "the learning rate jumps a million-fold (0.05 to 5e4): weights blow "
         "up and turn NaN", huge_lr, None),
    Case("fp16_overflow", "fp16 autocast, no GradScaler: unscaled attention logits of "
         "unnormalized inputs (x200) overflow 65504", fp16_overflow, ("attn", "forward_op")),
)}

# -- the loop ---------------------------------------------------------------------------


def train(s: Setup, opt: torch.optim.Optimizer, steps: int, cpu: list[float],
          after: Callable[[int], None] | None = None) -> None:
    """The training loop every variant runs. ``cpu``: process CPU time of each step is
    appended; ``after(step)``: called after each step (outside the timing)."""
    cast = (torch.autocast("cpu", dtype=s.autocast) if s.autocast is not None
            else contextlib.nullcontext())
    for step in range(1, steps + 1):
        s.at(step, opt)
        x, y = s.batch(step)
        c0 = time.process_time()
        opt.zero_grad(set_to_none=True)
        with cast:
            out = s.model(x)
        F.mse_loss(out.float(), y).backward()
        opt.step()
        cpu.append(time.process_time() - c0)
        if after is not None:
            after(step)


# -- the reference ----------------------------------------------------------------------------


def _bad(obj: Any) -> bool:
    """Any non-finite element in the floating-point tensors of ``obj`` (a host read)."""
    return any(isinstance(t, torch.Tensor) and t.is_floating_point()
               and not bool(torch.isfinite(t).all()) for t in tree_leaves(obj))


class Reference:
    """The origin of a run's first non-finite value, by the definitions of ``Alert.cause``.

    Forward, in call order: a module whose own parameters are non-finite (``parameters``);
    a non-finite batch, at the first module without children that receives it (``input``);
    the innermost module whose output is non-finite while its inputs and own parameters are
    finite (``forward_op``). Backward, on a step whose forward was finite: the innermost
    module whose output gradients are finite and whose input gradient or own parameter
    gradient is not (``backward_op``). Any Inf counts as much as a NaN here (the cases use
    no Inf on purpose). Hooks on every module; every check reads the host.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names = {m: (n or "(root)") for n, m in model.named_modules()}
        self.found: dict[str, Any] | None = None
        self._stack: list[tuple[bool, bool]] = []
        self._fwd: tuple[str, str] | None = None
        self._batch_bad = False
        self._events: list[tuple[nn.Module, str, bool]] = []
        self.handles = []
        for m in self.names:
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._post))

    def _pre(self, m: nn.Module, args: Any) -> None:
        inputs_bad = _bad(args)
        params_bad = any(not bool(torch.isfinite(p).all()) for p in m.parameters(recurse=False))
        self._stack.append((inputs_bad, params_bad))
        if self._fwd is not None:
            return
        if params_bad:
            self._fwd = (self.names[m], "parameters")
        elif inputs_bad and m is self.model:
            self._batch_bad = True
        elif inputs_bad and self._batch_bad and not any(True for _ in m.children()):
            self._fwd = (self.names[m], "input")

    def _post(self, m: nn.Module, args: Any, out: Any) -> None:
        inputs_bad, params_bad = self._stack.pop()
        if self._fwd is None and not inputs_bad and not params_bad and _bad(out):
            self._fwd = (self.names[m], "forward_op")
        for where, obj in (("out", out), ("in", args)):
            for t in tree_leaves(obj):
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(lambda g, m=m, where=where: self._events.append(
                        (m, where, _bad(g))))

    def step_done(self, step: int) -> None:
        """After the optimizer step of ``step``: record the origin if this step has one."""
        fwd, events = self._fwd, self._events
        self._fwd, self._events, self._batch_bad = None, [], False
        if self.found is not None:
            return
        if fwd is not None:
            self.found = {"step": step, "layer": fwd[0], "cause": fwd[1]}
            return
        first_bad: dict[nn.Module, int] = {}
        out_bad: set[nn.Module] = set()
        for i, (m, where, bad) in enumerate(events):
            if bad and where == "out":
                out_bad.add(m)
            elif bad:
                first_bad.setdefault(m, i)
        for m in self.names:  # parameter gradients (read after the step: .grad is kept)
            if m not in first_bad and any(p.grad is not None and _bad(p.grad)
                                          for p in m.parameters(recurse=False)):
                first_bad[m] = len(events)
        if not first_bad and not out_bad:
            return
        # a module qualifies when its output gradients were seen, all finite
        seen = {m for m, where, _ in events if where == "out"}
        ok = [m for m in first_bad if m in seen and m not in out_bad]
        # innermost: drop a module when one of its descendants qualifies too
        inner = [m for m in ok if not any(d is not m and d in ok for d in m.modules())]
        if inner:
            m = min(inner, key=lambda q: first_bad[q])
            self.found = {"step": step, "layer": self.names[m], "cause": "backward_op"}
        else:
            self.found = {"step": step, "layer": None, "cause": "outside the modules"}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
