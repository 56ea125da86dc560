"""The non-finite trace of code that ``torch.compile`` traces (``ModuleFlags``): the eager
trace's per-tensor host bookkeeping (``trace.py``) would retrace a graph at every step, so
compiled code adds per-module NaN/Inf counts on the device instead, read by
``origin.compiled_origin``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves

from gradwatch.handles import GradHook, grad_site
from gradwatch.record import DIMS
from gradwatch.stats import dense
from gradwatch.trace import _float

# Columns of ``ModuleFlags``: NaN / Inf sums among a call's outputs, among its inputs, and
# NaN among the gradients at its outputs and at its inputs (hooked modules only).
M_OUT_NAN, M_OUT_INF, M_IN_NAN, M_IN_INF, M_OG_NAN, M_IG_NAN = range(6)


class _ModuleGradHook(GradHook):
    """A NaN in the gradient at an input or output of module ``m``, counted in column
    ``col`` (traced code: always a tensor hook, ``handles.grad_site``)."""

    __slots__ = ("m", "col")

    def __init__(self, flags: ModuleFlags, m: int, col: int, nr: int) -> None:
        super().__init__(flags, nr)
        self.m = m
        self.col = col

    def grad(self, g: Tensor) -> None:
        f = self._ref()
        if f is not None:
            v = dense(g.detach())
            s = torch.sum(v, DIMS[v.ndim], dtype=torch.float32)
            f.t[self.m, self.col] += torch.isnan(s).to(torch.float32)


class ModuleFlags:
    """The non-finite trace of code that ``torch.compile`` traces: no per-tensor host
    bookkeeping (Python state in a graph would retrace), per-module counts added on the
    device instead, which the compiler fuses into the model's own kernels. ``order``: the
    modules children first (the order forward hooks complete in); ``ran``: compiled code
    added counts since the last ``take``."""

    def __init__(self, n_modules: int, device: torch.device, unsafe: list[bool],
                 order: tuple[int, ...]) -> None:
        self.t = torch.zeros(n_modules, 6, dtype=torch.float32, device=device)
        self.unsafe = unsafe
        self.order = order
        self.ran = False

    def call(self, m: int, args: Any, output: Any, kwargs: Any = None) -> None:
        self.ran = True
        outs = [t for t in tree_leaves(output) if _float(t)]
        ins = [t for t in tree_leaves(args) if _float(t)]
        if kwargs:  # a batch passed by keyword is an input too
            ins += [t for t in tree_leaves(kwargs) if _float(t)]
        row = self.t[m]
        for ts, col in ((outs, M_OUT_NAN), (ins, M_IN_NAN)):
            if ts:
                s = torch.stack([torch.sum(v, DIMS[v.ndim], dtype=torch.float32)
                                 for v in (dense(t.detach()) for t in ts)]).sum()
                row[col] += torch.isnan(s).to(torch.float32)
                row[col + 1] += torch.isinf(s).to(torch.float32)
        if self.unsafe[m] and torch.is_grad_enabled():
            for ts, col in ((outs, M_OG_NAN), (ins, M_IG_NAN)):
                for t in ts:
                    if t.requires_grad:
                        site, nr = grad_site(t)
                        _ModuleGradHook(self, m, col, nr).place(site)

    def take(self) -> Tensor:
        """This step's counts (a copy), and zero for the next."""
        self.ran = False
        out = self.t.reshape(-1).clone()
        self.t.zero_()
        return out
