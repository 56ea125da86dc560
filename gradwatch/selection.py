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


# Structural modules that hand finite values on (no arithmetic that can overflow or make a
# NaN): with the activations of ``keeps_finite`` their outputs need no sum of their own.
_PASS: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.MaxPool1d, nn.MaxPool2d,
    nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)


def passes_finite(m: nn.Module) -> bool:
    """Finite input -> finite output, nothing of its own that could hold a NaN, so its
    output's finiteness follows from its input's (the non-finite trace skips its sum).
    Exact torch classes only: a subclass may compute anything in its forward."""
    return type(m) in _PASS or (type(m) in _ACTIVATIONS and keeps_finite(m))


# torch.nn modules whose backward turns finite gradients and values into finite gradients
# (short of an fp overflow, which the parameter gradients still show): no gradient hooks
# are needed to find where a NaN gradient is born. Exact classes: a subclass (or any other
# module) may run arbitrary code in its forward, hence in its backward.
_GRAD_SAFE: frozenset[type[nn.Module]] = frozenset({
    *_ACTIVATIONS, *_PASS,
    nn.Linear, nn.Bilinear, nn.LazyLinear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.LazyConv1d, nn.LazyConv2d,
    nn.LazyConv3d, nn.Embedding, nn.EmbeddingBag, nn.BatchNorm1d, nn.BatchNorm2d,
    nn.BatchNorm3d, nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d, nn.LayerNorm,
    nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.RMSNorm,
    nn.SyncBatchNorm, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Upsample, nn.PixelShuffle,
    nn.PixelUnshuffle, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d,
    nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d,
    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.MultiheadAttention, nn.RNN, nn.LSTM, nn.GRU,
    nn.RNNCell, nn.LSTMCell, nn.GRUCell, nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer, nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer,
    nn.Sequential, nn.ModuleList, nn.ModuleDict,
})


def grad_safe(m: nn.Module) -> bool:
    """Whether ``m``'s backward cannot make a NaN from finite gradients and values."""
    return type(m) in _GRAD_SAFE


def custom_leaf(m: nn.Module) -> bool:
    """A parameter-free module without children whose class is not torch's own: usually an
    activation or an op a library or the user wrote (Hugging Face's ``NewGELUActivation``),
    exactly where a reader of the statistics wants a row."""
    return (not m._modules and not _owns_params(m)
            and not type(m).__module__.startswith("torch."))


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

    Default: every module that directly owns parameters, the standard activation modules,
    and parameter-free leaf modules of classes outside torch (``custom_leaf``). ``include``
    globs pick from all modules instead; ``exclude`` globs remove.
    """
    inc = _as_patterns(include, "include")
    exc = _as_patterns(exclude, "exclude")
    named = [(n or ROOT_NAME, m) for n, m in model.named_modules()]
    if inc is None:
        chosen = [(n, m) for n, m in named
                  if _owns_params(m) or isinstance(m, _ACTIVATIONS) or (n != ROOT_NAME
                                                                        and custom_leaf(m))]
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
    )
