"""Shared pieces of the benchmarks: workloads, how gradwatch is attached, host-read and aten-op
counters, the one-process-per-measurement runner, memory readings."""

from __future__ import annotations

import collections
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

# -- workloads ------------------------------------------------------------------------------
# Each returns (model, inputs, targets, loss function). Fixed seed, CPU.


def mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor, Callable[..., torch.Tensor]]:
    """8 Linear 512-wide with Tanh between, batch 128, MSE."""
    layers: list[nn.Module] = []
    for i in range(8):
        layers.append(nn.Linear(512, 512))
        if i < 7:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers), torch.randn(128, 512), torch.randn(128, 512), F.mse_loss


def cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor, Callable[..., torch.Tensor]]:
    """4 x (Conv3x3 + BatchNorm + ReLU(inplace)), 32/64/64/128 channels, batch 32 of 3x32x32.

    A 2x2 max-pool follows each of the first three blocks and a linear head closes it, so
    one step takes tens of milliseconds on one core (without pooling it is ~0.5 s)."""
    layers: list[nn.Module] = []
    c = 3
    for i, o in enumerate((32, 64, 64, 128)):
        layers += [nn.Conv2d(c, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]
        if i < 3:
            layers.append(nn.MaxPool2d(2))
        c = o
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10)]
    x = torch.randn(32, 3, 32, 32)
    return nn.Sequential(*layers), x, torch.randint(0, 10, (32,)), F.cross_entropy


class _LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(64, 256, num_layers=2, batch_first=True)
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


def lstm() -> tuple[nn.Module, torch.Tensor, torch.Tensor, Callable[..., torch.Tensor]]:
    """2-layer LSTM, hidden 256, sequence 50, batch 32 (64 input features), linear head."""
    return _LSTMNet(), torch.randn(32, 50, 64), torch.randint(0, 10, (32,)), F.cross_entropy


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x).mean(1))


def transformer() -> tuple[nn.Module, torch.Tensor, torch.Tensor, Callable[..., torch.Tensor]]:
    """Transformer encoder, 4 layers, d=256, 4 heads, sequence 64, batch 16."""
    return _Encoder(), torch.randn(16, 64, 256), torch.randint(0, 10, (16,)), F.cross_entropy


def gpt2() -> tuple[nn.Module, torch.Tensor, torch.Tensor, Callable[..., torch.Tensor]]:
    """A GPT-2-style language model built from a config (no download): Hugging Face
    ``GPT2LMHeadModel``, 12 blocks, d=256, 4 heads, the GPT-2 vocabulary (50,257), sequence
    64, batch 4 of random tokens, next-token cross-entropy. 88 watched modules by default."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import GPT2Config, GPT2LMHeadModel

    seq = 64
    cfg = GPT2Config(n_layer=12, n_embd=256, n_head=4, n_positions=seq, use_cache=False)
    model = GPT2LMHeadModel(cfg)
    ids = torch.randint(0, cfg.vocab_size, (4, seq))

    def next_token(out: Any, y: torch.Tensor) -> torch.Tensor:
        logits = out.logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1))

    return model, ids, ids, next_token


# Deep and narrow at a fixed total size: N x (Linear(w, w) + Tanh), 2N watched modules,
# w chosen so that N * w^2 (parameters and FLOPs per sample) stays at 500 * 64^2.
DEEP = {10: (5, 640), 100: (50, 202), 1000: (500, 64)}


def deep(modules: int) -> Callable[[], Any]:
    """The workload of ``modules`` watched modules (a key of ``DEEP``)."""
    n, w = DEEP[modules]

    def build() -> tuple[nn.Module, torch.Tensor, torch.Tensor, Callable[..., torch.Tensor]]:
        layers: list[nn.Module] = []
        for _ in range(n):
            lin = nn.Linear(w, w)
            # orthogonal weights and zero biases keep the signal and the gradients in range
            # through 500 blocks: with the default init the lower layers' gradients pass
            # through denormal floats (slow on CPU) and the bare step changes by 2x
            nn.init.orthogonal_(lin.weight)
            nn.init.zeros_(lin.bias)
            layers += [lin, nn.Tanh()]
        return nn.Sequential(*layers), torch.randn(32, w), torch.randn(32, w), F.mse_loss

    build.__doc__ = f"{n} x (Linear({w}, {w}) + Tanh), batch 32, MSE: {modules} watched modules."
    return build


WORKLOADS: dict[str, Callable[[], Any]] = {
    "mlp": mlp, "cnn": cnn, "lstm": lstm, "transformer": transformer, "gpt2": gpt2,
    **{f"deep{m}": deep(m) for m in DEEP},
}

# -- attaching gradwatch ----------------------------------------------------------------------
# The step kinds of the module-count series and the breakdown, forced through the public API.
# If the way sampled steps are chosen changes, this is the one function to adapt.
STEP_KINDS = ("default", "light", "sampled", "every10")


def watch_as(kind: str, model: nn.Module, opt: torch.optim.Optimizer, logdir: str) -> Any:
    """gradwatch attached so that every step after the first is of ``kind``.

    ``default``: ``watch()`` as a user writes it; ``every10``: the same with ``every=10``
    (a user who wants denser curves). ``light``: ``every`` and ``sample_every``
    of 10**6 (the first step is sampled, every later one light). ``sampled``:
    ``sample_every=1`` (every step collects the full stat set). The last two never flush
    (``every=10**6``): the flush is measured on its own (``flush.py``, ``breakdown.py``).
    """
    import gradwatch

    if kind == "default":
        return gradwatch.watch(model, optimizer=opt, logdir=logdir, on_alert="ignore")
    if kind == "every10":
        return gradwatch.watch(model, optimizer=opt, logdir=logdir, every=10,
                               on_alert="ignore")
    if kind == "light":
        return gradwatch.watch(model, optimizer=opt, logdir=logdir, every=10**6,
                               sample_every=10**6, on_alert="ignore")
    if kind == "sampled":
        return gradwatch.watch(model, optimizer=opt, logdir=logdir, every=10**6,
                               sample_every=1, on_alert="ignore")
    raise ValueError(f"kind must be one of {STEP_KINDS}, got {kind!r}")


def watched_modules(model: nn.Module) -> int:
    """How many modules gradwatch watches in ``model`` by default."""
    from gradwatch.selection import select, unwrap

    return len(select(unwrap(model), None, None))

# -- the floor ------------------------------------------------------------------------------
# What the promises cost at least, written by hand beside gradwatch (no gradwatch code runs in
# it): the per-step checks of every layer's gradient norm and of where a NaN is born, and the
# full stat set of a sampled step. gradwatch's ratios are taken to these, measured in the same
# run (modules.py, overhead.py).

# Elementwise activations, dropout, pooling and flatten: finite in, finite out. They get the
# empty hook (the hook call itself, which any per-module monitor pays), no sum.
_FLOOR_PASS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softsign, nn.Softplus,
    nn.Tanhshrink, nn.Hardshrink, nn.Softshrink, nn.LogSigmoid,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Flatten, nn.Unflatten, nn.Identity,
)
FLOOR_MAX_OUTPUTS = 8  # floating tensors summed per module output (a row of the buffer each)
FLOOR_KINDS = ("floor", "floor_sampled")


def _float_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _float_tensors(o)]
    return []


class Floor:
    """The floor of a step, by hand. ``sampled=False`` (*light* floor, the promise of every
    step): one ``torch._foreach_norm`` over every parameter gradient at the optimizer step
    (a pre-step hook, where gradwatch reads them), and a forward hook on every module that
    sums each floating output in fp32 into a row of a buffer allocated once (``out=``) --
    unless the module keeps finite values finite (``_FLOOR_PASS``), is an in-place
    activation, or hands on the tensor its last child summed (a container): those get the
    empty hook. ``sampled=True`` (the floor of a sampled step: every stat of every watched
    layer): in addition, one pass over each watched output (its sum, shared with the check
    above when the module is summed anyway), a tensor hook with one fp32 sum over each
    output gradient, and one ``_foreach_norm`` over the parameters themselves."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, sampled: bool) -> None:
        from gradwatch.selection import select, unwrap

        mods = list(model.modules())
        watched = {id(m) for _, m in select(unwrap(model), None, None)} if sampled else set()
        self.buf = torch.zeros(len(mods), FLOOR_MAX_OUTPUTS)
        self.gbuf = torch.zeros(len(mods), FLOOR_MAX_OUTPUTS)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.norms: list[torch.Tensor] = []
        self.last: list[Any] = [None]  # the tensor summed last (a container hands it on)
        self.sampled = sampled
        self.handles = []
        for i, m in enumerate(mods):
            inplace = getattr(m, "inplace", False) is True
            if id(m) in watched:
                hook = self._sum_hook(self.buf[i], self.gbuf[i])
            elif isinstance(m, _FLOOR_PASS) or inplace:
                hook = _empty_hook
            else:
                hook = self._sum_hook(self.buf[i], None)
            self.handles.append(m.register_forward_hook(hook))
        self.handles.append(opt.register_step_pre_hook(self._pre_step))

    def _sum_hook(self, row: torch.Tensor, grow: torch.Tensor | None) -> Callable[..., None]:
        rows = list(row.unbind())
        last = self.last
        if grow is None:
            def hook(m: nn.Module, args: Any, out: Any) -> None:
                if isinstance(out, torch.Tensor):
                    if out is not last[0]:
                        torch.sum(out.detach(), _DIMS[out.ndim], dtype=torch.float32,
                                  out=rows[0])
                        last[0] = out
                    return
                ts = _float_tensors(out)
                if len(ts) > FLOOR_MAX_OUTPUTS:
                    raise ValueError(f"more than {FLOOR_MAX_OUTPUTS} outputs: {type(m)}")
                for j, t in enumerate(ts):
                    if t is not last[0]:
                        torch.sum(t.detach(), _DIMS[t.ndim], dtype=torch.float32, out=rows[j])
                if ts:
                    last[0] = ts[-1]
            return hook

        grows = list(grow.unbind())

        def grad_hook(j: int) -> Callable[[torch.Tensor], None]:
            def h(g: torch.Tensor) -> None:
                torch.sum(g, _DIMS[g.ndim], dtype=torch.float32, out=grows[j])
            return h

        ghooks = [grad_hook(j) for j in range(FLOOR_MAX_OUTPUTS)]

        def watched_hook(m: nn.Module, args: Any, out: Any) -> None:
            ts = [out] if isinstance(out, torch.Tensor) else _float_tensors(out)
            if len(ts) > FLOOR_MAX_OUTPUTS:
                raise ValueError(f"more than {FLOOR_MAX_OUTPUTS} outputs: {type(m)}")
            for j, t in enumerate(ts):
                torch.sum(t.detach(), _DIMS[t.ndim], dtype=torch.float32, out=rows[j])
                if t.requires_grad:
                    t.register_hook(ghooks[j])
            if ts:
                last[0] = ts[-1]
        return watched_hook

    def _pre_step(self, opt: Any, args: Any, kwargs: Any) -> None:
        self.norms = torch._foreach_norm([p.grad for p in self.params if p.grad is not None])
        if self.sampled:
            self.norms += torch._foreach_norm(self.params)
        self.last[0] = None

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _empty_hook(m: nn.Module, args: Any, out: Any) -> None:
    return None


# every dim of an n-d tensor: torch.sum(x, _DIMS[x.ndim], out=row) reduces it into a 0-d row
_DIMS = [tuple(range(n)) for n in range(16)]


# -- host reads -----------------------------------------------------------------------------

_READ_OPS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.equal.default,
}
_PATCHED = ("item", "tolist", "cpu", "__bool__", "__float__")


class HostReads(TorchDispatchMode):
    """Counts reads of device values on the host, on the thread that enters it.

    At the dispatcher: ``_local_scalar_dense`` (``.item()``, ``float(t)``, ``bool(t)``),
    ``nonzero``, ``equal`` and boolean-mask indexing; plus calls of the Python methods
    ``Tensor.item/tolist/cpu/__bool__/__float__`` (``.cpu()`` and ``.tolist()`` of a CPU
    tensor dispatch nothing, but stall the stream on a GPU). A method call counts once, not
    again for the ops it dispatches.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self._depth = threading.local()
        self._saved: dict[str, Any] = {}

    def _inside(self) -> int:
        return getattr(self._depth, "n", 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        kwargs = kwargs or {}
        if self._inside() == 0:
            if func in _READ_OPS:
                self.count += 1
            elif func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default):
                idx = args[1] if len(args) > 1 else []
                if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx
                       if i is not None):
                    self.count += 1
        return func(*args, **kwargs)

    def __enter__(self) -> HostReads:
        mode = self

        for name in _PATCHED:
            orig = getattr(torch.Tensor, name)
            self._saved[name] = orig

            def wrapped(t: torch.Tensor, *a: Any, _orig: Any = orig, **k: Any) -> Any:
                outer = mode._inside() == 0
                if outer:
                    mode.count += 1
                mode._depth.n = mode._inside() + 1
                try:
                    return _orig(t, *a, **k)
                finally:
                    mode._depth.n -= 1

            setattr(torch.Tensor, name, wrapped)
        return super().__enter__()  # type: ignore[return-value]

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for name, orig in self._saved.items():
            setattr(torch.Tensor, name, orig)
        self._saved.clear()


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while it is active: on a GPU each is a kernel launch
    (or a view/metadata op, a few µs of CPU each either way). The CPU backward runs on the
    calling thread and is counted too. The profiler's own range markers (the optimizer's
    ``record_function``) are not ops and are left out. ``by_op``: counts per op name."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.by_op: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        name = func.name()
        if not name.startswith("profiler::"):
            self.count += 1
            self.by_op[name] += 1
        return func(*args, **(kwargs or {}))


# -- one measurement per process ------------------------------------------------------------
# Every (variant, workload) runs in a process of its own (one thread, fixed seeds), started
# by the driver of each benchmark with these settings.


def run_worker(script: str, argv: list[str], timeout: float) -> dict[str, Any]:
    """Run ``script --worker ARGV...`` in a fresh process; its last stdout line that starts
    with ``{`` is the result. A run that dies before reporting (a transient failure, e.g.
    the shared machine short of memory while loading torch) is tried up to three more
    times; a timeout or a kill (the OOM killer) is not retried. Failures come back as
    ``{"error": why}``."""
    for attempt in range(4):
        out = _run_once(script, argv, timeout)
        if "error" not in out or out["error"].startswith(("timed out", "killed")):
            break
        time.sleep(10.0 * (attempt + 1))
    return out


def _run_once(script: str, argv: list[str], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(script), "--worker", *argv]
    # Fixed glibc malloc thresholds: with the default dynamic mmap threshold, how many page
    # faults a step's large tensors cost depended on what the process had imported before
    # (a bare process paid ~10% more than one that had imported wandb, measured here).
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="offline",
               WANDB_SILENT="true", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1",
               MALLOC_MMAP_THRESHOLD_="1073741824", MALLOC_TRIM_THRESHOLD_="1073741824")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)  # type: ignore[no-any-return]
    if p.returncode < 0:  # e.g. 9: the kernel's OOM killer
        return {"error": f"killed by signal {-p.returncode}"}
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    return {"error": " | ".join(tail)[-300:]}


def block_means(cpu: list[float], block: int) -> list[float]:
    """Mean step time of each whole block of ``block`` consecutive steps."""
    return [statistics.fmean(cpu[i:i + block]) for i in range(0, len(cpu) - block + 1, block)]


# -- memory / machine -----------------------------------------------------------------------


def rss_mb() -> float:
    """Current resident set size of this process, MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
