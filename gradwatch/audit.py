"""The initialization audit: each layer's weight scale and each recurrent weight's gain,
measured once at ``watch()``.

This is evidence for the diagnosis (``diagnosis.py``), not a rule: a weight far from the
scale that keeps the variance of a signal through its layer (Glorot & Bengio 2010; He et
al. 2015), or a recurrent weight whose largest singular value is far above 1 (Pascanu,
Mikolov & Bengio 2013), only becomes a *cause* when an alert fires downstream of it.

Cost: one reduction per audited weight and one singular-value computation per recurrent
gate block, all on the weights' device, then one host read of the results. Nothing here
runs after ``watch()`` returns.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from gradwatch.selection import ROOT_NAME

#: Layers whose weight maps a fan-in to a fan-out by a sum (the Glorot/He setting).
#: Transposed convolutions are left out: torch's fan-in of their weight is not the number
#: of inputs summed into one output.
AUDITED: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
RECURRENT: tuple[type[nn.Module], ...] = (nn.RNN, nn.LSTM, nn.GRU)
#: Normalization layers: they reset the scale of a signal (forward and backward).
NORMS: tuple[type[nn.Module], ...] = tuple(
    t for t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
                nn.InstanceNorm3d, nn.LocalResponseNorm, getattr(nn, "RMSNorm", None))
    if t is not None)
EMBEDDINGS: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)
#: a library's own normalization layer, by its name: LlamaRMSNorm, T5LayerNorm, LayerNorm2d
_NORM_NAME = re.compile(r"Norm(\d[dD])?$")
_GATES = {nn.LSTM: ("input", "forget", "cell", "output"), nn.GRU: ("reset", "update", "new"),
          nn.RNN: ("",)}


def linear_fans(m: nn.Module, weight: torch.Tensor) -> tuple[int, int] | None:
    """(fan-in, fan-out) of a module that is a linear map by what it is, not by its class:
    torch's Linear and convolutions, and any other module whose one own weight is a 2-D
    matrix applied to the last dimension (Hugging Face's ``Conv1D``, whose weight is
    ``in x out``; a library's own ``Linear``). The orientation comes from the module's
    ``in_features``/``out_features`` or ``nx``/``nf`` where it has them, else torch's
    ``out x in``; the excess over the Glorot/He range does not depend on it."""
    if isinstance(m, AUDITED):
        if weight.dim() < 2:
            return None
        return nn.init._calculate_fan_in_and_fan_out(weight)
    if isinstance(m, (*RECURRENT, *EMBEDDINGS, *NORMS)) or type(m).__module__.startswith("torch.") \
            or weight.dim() != 2:
        return None
    if any(p.dim() >= 2 for n, p in m.named_parameters(recurse=False) if n != "weight"):
        return None  # more than one matrix: not a plain linear map
    rows, cols = weight.shape
    fin, fout = getattr(m, "in_features", None), getattr(m, "out_features", None)
    if fin is None:
        fin, fout = getattr(m, "nx", None), getattr(m, "nf", None)
    if (fin, fout) == (rows, cols):
        return rows, cols
    return cols, rows


def declares_fans(m: nn.Module) -> bool:
    """Whether a module names its fans (``in_features``/``out_features`` or ``nx``/``nf``):
    a module that does not is taken as a linear map only once its use says so (an input
    and an output whose last dimensions are the weight's two sides, ``paths.Graph.dims``)."""
    return isinstance(m, AUDITED) or all(isinstance(getattr(m, a, None), int)
                                         for a in ("in_features", "out_features")) or \
        all(isinstance(getattr(m, a, None), int) for a in ("nx", "nf"))


def is_norm(m: nn.Module) -> bool:
    """A normalization layer: torch's classes, or a library's own (``LlamaRMSNorm``,
    ``T5LayerNorm``...: a module named for it whose only own parameters are 1-D scales and
    shifts)."""
    if isinstance(m, NORMS):
        return True
    own = list(m.parameters(recurse=False))
    return (_NORM_NAME.search(type(m).__name__) is not None and not m._modules and bool(own)
            and all(p.dim() <= 1 for p in own))


def activation_gain(m: nn.Module) -> tuple[str, float] | None:
    """(``torch.nn.init`` nonlinearity name, its gain) of an activation module with a
    gain in ``nn.init.calculate_gain``; None for the others (GELU, SiLU, ELU...)."""
    if isinstance(m, (nn.ReLU, nn.ReLU6, nn.Threshold)):
        return "relu", math.sqrt(2.0)
    if isinstance(m, nn.LeakyReLU):
        return "leaky_relu", nn.init.calculate_gain("leaky_relu", m.negative_slope)
    if isinstance(m, nn.RReLU):
        return "leaky_relu", nn.init.calculate_gain("leaky_relu", (m.lower + m.upper) / 2)
    if isinstance(m, nn.PReLU):
        return "leaky_relu", nn.init.calculate_gain("leaky_relu", 0.25)
    if isinstance(m, nn.Tanh):
        return "tanh", nn.init.calculate_gain("tanh")
    if isinstance(m, nn.Sigmoid):
        return "sigmoid", nn.init.calculate_gain("sigmoid")
    if isinstance(m, nn.SELU):
        return "selu", nn.init.calculate_gain("selu")
    return None


@dataclass(frozen=True)
class WeightScale:
    """One audited weight at ``watch()``: its std against its fan-in and fan-out."""

    fan_in: int
    fan_out: int
    std: float
    bias_mean: float | None  # mean of the layer's bias, None without one

    def reference(self, gain: float) -> tuple[float, float, float]:
        """(Glorot std, He std on fan-in, He std on fan-out) for an activation ``gain``."""
        return (gain * math.sqrt(2.0 / (self.fan_in + self.fan_out)),
                gain / math.sqrt(self.fan_in), gain / math.sqrt(self.fan_out))


@dataclass(frozen=True)
class RecurrentGain:
    """The largest singular value of a recurrent weight's gate blocks at ``watch()``."""

    param: str  # e.g. "weight_hh_l0"
    gate: str  # the block with the largest gain ("" for a plain RNN)
    gain: float


@dataclass
class InitAudit:
    """What ``audit()`` measured. ``order``: every module of the model in registration
    order (the forward order until the first window says otherwise); ``unseen_norms``:
    normalization layers that are not watched, so the forward order cannot place them."""

    scales: dict[str, WeightScale] = field(default_factory=dict)
    #: embedding tables: the std of their entries (a lookup: no fan-in)
    embeddings: dict[str, float] = field(default_factory=dict)
    #: normalization layers' scale (the root mean square of their weight; 1 without one)
    norm_scales: dict[str, float] = field(default_factory=dict)
    #: audited by the shape of their weight alone (``declares_fans`` is False): linear maps
    #: only if their use in the dataflow says so
    by_shape: frozenset[str] = frozenset()
    gains: dict[str, RecurrentGain] = field(default_factory=dict)
    gains_of: dict[str, tuple[str, float]] = field(default_factory=dict)  # activations
    norms: frozenset[str] = frozenset()
    unseen_norms: bool = False
    order: tuple[str, ...] = ()
    seconds: float = 0.0
    #: the model's dataflow between its modules, from one training forward
    #: (``structure.Graph``); None until that forward ran
    graph: Any = None
    #: the hooks that learn ``graph`` (``structure.StructureProbe``); removed at close
    probe: Any = None


def _plain(t: torch.Tensor) -> bool:
    """A weight we can read: materialized, dense, floating point, not a DTensor shard."""
    return (isinstance(t, torch.Tensor) and not isinstance(t, nn.parameter.UninitializedParameter)
            and t.is_floating_point() and not t.is_meta and t.layout == torch.strided
            and type(t).__name__ not in ("DTensor", "ShardedTensor") and t.numel() > 1)


def _moments(w: torch.Tensor) -> torch.Tensor:
    """[mean, mean of squares] of a weight, fp32 (or fp64) accumulation: two fast reductions (a
    norm and a sum); ``std`` costs 4x (4096 x 4096) to 20x (1024 x 1024) more on a CPU."""
    n = w.numel()
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32  # never narrow
    sq = torch.linalg.vector_norm(w, dtype=acc) ** 2 / n
    return torch.stack([w.sum(dtype=acc) / n, sq]).float()


#: Gate blocks with both sides above this get the largest singular value from a subspace
#: iteration instead of a full SVD (4096 x 4096: 1.1 s per block against 11 s on one CPU
#: thread). It is a lower bound (within 1% on random blocks, exact on scaled orthogonal
#: ones), so it can miss a recurrent gain just above the limit, never invent one.
EXACT_SVD = 256
SUBSPACE = (8, 16)  # columns, iterations


def largest_singular_value(blocks: torch.Tensor) -> torch.Tensor:
    """The largest singular value of each matrix of a ``[B, m, n]`` batch, on its device;
    the random start of the subspace iteration comes from a generator of its own (the
    global random state is left as it was)."""
    if min(blocks.shape[-2:]) <= EXACT_SVD:
        return torch.linalg.matrix_norm(blocks, ord=2).reshape(-1)
    q, iters = SUBSPACE
    g = torch.Generator(device=blocks.device).manual_seed(0)
    x = torch.randn(blocks.shape[0], blocks.shape[-1], q, generator=g, device=blocks.device)
    for _ in range(iters):
        x, _ = torch.linalg.qr(blocks.mT @ (blocks @ x))
    return torch.linalg.matrix_norm(blocks @ x, ord=2).reshape(-1)


def audit(root: nn.Module, watched: Sequence[tuple[str, nn.Module]]) -> InitAudit:
    """Measure the weights of the watched modules; one host read for all of them."""
    t0 = time.perf_counter()
    out = InitAudit()
    out.order = tuple(n or ROOT_NAME for n, _ in root.named_modules())
    norms = {n or ROOT_NAME for n, m in root.named_modules() if is_norm(m)}
    chosen = {n for n, _ in watched}
    out.norms = frozenset(norms & chosen)
    out.unseen_norms = bool(norms - chosen)

    values: list[torch.Tensor] = []  # every measurement, read back to the host at once
    scale_rows: list[tuple[str, int, int, int, bool]] = []  # name, fans, first value, bias?
    gain_rows: list[tuple[str, str, tuple[str, ...], int]] = []
    other_rows: list[tuple[str, bool, int]] = []  # name, norm (else embedding), value
    with torch.no_grad():
        for name, m in watched:
            act = activation_gain(m)
            if act is not None:
                out.gains_of[name] = act
            w = getattr(m, "weight", None)
            weight = w if isinstance(w, torch.Tensor) and _plain(w) else None
            fans = linear_fans(m, weight) if weight is not None else None
            if is_norm(m) and name in out.norms:
                other_rows.append((name, True, len(values)))
                values.append(weight.detach().float().square().mean().sqrt().reshape(1)
                              if weight is not None else torch.ones(1))
            elif isinstance(m, EMBEDDINGS) and weight is not None:
                other_rows.append((name, False, len(values)))
                values.append(_moments(weight.detach()))
            elif fans is not None and weight is not None:
                fan_in, fan_out = fans
                if fan_in == 0 or fan_out == 0:
                    continue
                if not declares_fans(m):
                    out.by_shape = out.by_shape | {name}
                scale_rows.append((name, fan_in, fan_out, len(values), False))
                values.append(_moments(weight.detach()))
                b = getattr(m, "bias", None)
                if isinstance(b, torch.Tensor) and _plain(b):
                    values.append(b.detach().float().mean().reshape(1))
                    scale_rows[-1] = scale_rows[-1][:4] + (True,)
            elif isinstance(m, RECURRENT):
                gates = _GATES[type(m)]
                for pname, p in m.named_parameters(recurse=False):
                    if not pname.startswith("weight_hh") or not _plain(p):
                        continue
                    blocks = p.detach().float().reshape(len(gates), -1, p.shape[-1])
                    gain_rows.append((name, pname, gates, len(values)))
                    values.append(largest_singular_value(blocks))
        if not values:
            out.seconds = time.perf_counter() - t0
            return out
        starts = [0]
        for v in values:
            starts.append(starts[-1] + v.numel())
        flat = torch.cat([v.to(values[0].device) for v in values]).to("cpu").tolist()
    for name, fan_in, fan_out, i, has_bias in scale_rows:
        mean, square = flat[starts[i]], flat[starts[i] + 1]
        bias = flat[starts[i + 1]] if has_bias else None
        std = math.sqrt(max(square - mean * mean, 0.0))
        out.scales[name] = WeightScale(fan_in, fan_out, std, bias)
    for name, norm, i in other_rows:
        if norm:
            out.norm_scales[name] = flat[starts[i]]
        else:
            mean, square = flat[starts[i]], flat[starts[i] + 1]
            out.embeddings[name] = math.sqrt(max(square - mean * mean, 0.0))
    for name, pname, gates, i in gain_rows:
        per_gate = flat[starts[i]:starts[i + 1]]
        k = max(range(len(gates)), key=per_gate.__getitem__)
        best = out.gains.get(name)
        if best is None or per_gate[k] > best.gain:
            out.gains[name] = RecurrentGain(pname, gates[k], per_gate[k])
    out.seconds = time.perf_counter() - t0
    return out


def measure(root: nn.Module, watched: Sequence[tuple[str, nn.Module]],
            fault: Callable[[str, str, BaseException], None]) -> InitAudit:
    """``audit()`` that never fails ``watch()``: an internal error goes to ``fault`` (reported
    once as a ``GradwatchWarning``) and the diagnosis goes on without the audit: the causes
    that need it become "unknown"."""
    try:
        return audit(root, watched)
    except Exception as e:  # noqa: BLE001 - reported, never propagated
        fault("initialization audit", "*", e)
        return InitAudit()
