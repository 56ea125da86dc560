"""Which modules are watched, and what each one is (parameters, bounds, ReLU-like)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Sequence

import torch.nn as nn

ROOT_NAME = "(root)"

_RELU_LIKE: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.Threshold)
_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish,
    nn.Softsign, nn.Softplus, nn.Softmax, nn.LogSoftmax, nn.LogSigmoid, nn.Tanhshrink,
    nn.Threshold, nn.GLU, nn.Softmin, nn.Hardshrink, nn.Softshrink,
)


@dataclass(frozen=True)
class LayerInfo:
    """Static facts about one watched module."""

    name: str
    type_name: str
    has_params: bool
    has_trainable: bool
    bounds: tuple[float, float] | None  # output range of a bounded activation
    relu_like: bool
    # a parameter-free activation that maps finite inputs to finite outputs: on light steps
    # its output needs no non-finite check when its input was just checked
    keeps_finite: bool = False
    inplace: bool = False  # the module writes its output into its input


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        return model


def output_bounds(m: nn.Module) -> tuple[float, float] | None:
    if isinstance(m, nn.Hardtanh):  # ReLU6 included
        return (float(m.min_val), float(m.max_val))
    if isinstance(m, (nn.Sigmoid, nn.Hardsigmoid)):
        return (0.0, 1.0)
    if isinstance(m, (nn.Tanh, nn.Softsign)):
        return (-1.0, 1.0)
    return None


def keeps_finite(m: nn.Module) -> bool:
    """Finite input -> finite output, with no parameter that could hold a NaN."""
    if not isinstance(m, _ACTIVATIONS) or isinstance(m, (nn.PReLU, nn.Threshold, nn.SELU)):
        return False  # a parameter, a user-given value, a gain > 1 (overflow near 3e38)
    if isinstance(m, nn.LeakyReLU) and abs(m.negative_slope) > 1:
        return False
    return not any(True for _ in m.parameters(recurse=False))


def _owns_params(m: nn.Module) -> bool:
    return any(p is not None for p in m._parameters.values())


def _as_patterns(arg: str | Sequence[str] | None, name: str) -> list[str] | None:
    if arg is None:
        return None
    pats = [arg] if isinstance(arg, str) else list(arg)
    for p in pats:
        if not isinstance(p, str):
            raise TypeError(f"{name} must be a glob string or a list of them, got {p!r}")
    return pats


def select(
    model: nn.Module,
    include: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
) -> list[tuple[str, nn.Module]]:
    """The watched modules, by qualified name, in ``named_modules()`` order.

    Default: every module that directly owns parameters, plus the standard activation
    modules. ``include`` globs pick from all modules instead; ``exclude`` globs remove.
    """
    inc = _as_patterns(include, "include")
    exc = _as_patterns(exclude, "exclude")
    named = [(n or ROOT_NAME, m) for n, m in model.named_modules()]
    if inc is None:
        chosen = [(n, m) for n, m in named if _owns_params(m) or isinstance(m, _ACTIVATIONS)]
    else:
        for pat in inc:
            if not any(fnmatch.fnmatchcase(n, pat) for n, _ in named):
                raise ValueError(
                    f"include pattern {pat!r} matches no module; module names are "
                    f"qualified names such as {[n for n, _ in named[1:4]]!r}"
                )
        chosen = [(n, m) for n, m in named if any(fnmatch.fnmatchcase(n, p) for p in inc)]
    if exc:
        chosen = [(n, m) for n, m in chosen if not any(fnmatch.fnmatchcase(n, p) for p in exc)]
    return chosen


def assign_params(
    root: nn.Module, chosen: Sequence[tuple[str, nn.Module]]
) -> list[tuple[nn.Parameter, int]]:
    """(parameter, slot) pairs: each parameter once (tied weights included), for the first
    watched module that directly owns it, in ``root.parameters()`` order."""
    owner: dict[int, int] = {}
    for slot, (_, m) in enumerate(chosen):
        for p in m._parameters.values():
            if p is not None and id(p) not in owner:
                owner[id(p)] = slot
    return [(p, owner[id(p)]) for p in root.parameters() if id(p) in owner]


def describe(name: str, m: nn.Module, own: Sequence[nn.Parameter]) -> LayerInfo:
    """``own``: the parameters assigned to this module by ``assign_params``."""
    return LayerInfo(
        name=name,
        type_name=type(m).__name__,
        has_params=bool(own),
        has_trainable=any(p.requires_grad for p in own),
        bounds=output_bounds(m),
        relu_like=isinstance(m, _RELU_LIKE),
        keeps_finite=keeps_finite(m),
        inplace=bool(getattr(m, "inplace", False)),
    )
