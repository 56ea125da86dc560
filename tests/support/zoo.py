"""The zoo: a labeled dataset of small training setups, healthy and broken.

Each ``Setup`` builds a model, its optimizer and a data stream from a seed; ``expect`` is
the label: None for a healthy run (no alert at all), else the alert kind and the layers at
which it is right to report it. ``run`` trains one setup under gradwatch and returns the
alerts. The same setups chose the defaults of ``gradwatch.Thresholds`` (docs/thresholds.md).

Everything is small (widths 32-64, batches 16-64) so the whole zoo trains on one CPU core in
well under a minute per seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import gradwatch


@dataclass
class Trial:
    """One built setup: train ``model`` with ``optimizer`` on ``loss(step)``."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[int], torch.Tensor]
    clip: float | None = None


@dataclass(frozen=True)
class Setup:
    name: str
    build: Callable[[int], Trial]
    kinds: tuple[str, ...] = ()  # the right alert kind(s); () for a healthy setup
    layers: tuple[str, ...] = ()  # where such an alert is right
    steps: int = 160
    cause: str | None = None  # the right Alert.cause of that alert (None: healthy)

    @property
    def label(self) -> str:
        return "/".join(self.kinds) if self.kinds else "healthy"


@dataclass
class Result:
    setup: Setup
    seed: int
    alerts: list[gradwatch.Alert]
    final_loss: float
    snapshots: list[gradwatch.Snapshot] = field(default_factory=list)
    watcher: gradwatch.Watcher | None = field(default=None, repr=False)

    @property
    def hit(self) -> gradwatch.Alert | None:
        """The first alert that matches the label (kind at one of the right layers)."""
        for a in self.alerts:
            if a.kind in self.setup.kinds and a.layer in self.setup.layers:
                return a
        return None

    @property
    def predicted(self) -> str:
        """The verdict of gradwatch on this run: the kind of its first alert, or healthy."""
        return self.alerts[0].kind if self.alerts else "healthy"

    @property
    def ok(self) -> bool:
        if not self.setup.kinds:
            return not self.alerts
        return self.hit is not None


# -- data ------------------------------------------------------------------------------------
def _classify(seed: int, d_in: int, n_cls: int, batch: int) -> Callable[[int], Any]:
    """A fixed linear-teacher classification task; returns step -> (x, y)."""
    g = torch.Generator().manual_seed(1000 + seed)
    teacher = torch.randn(d_in, n_cls, generator=g)

    def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gs = torch.Generator().manual_seed(seed * 100_003 + step)
        x = torch.randn(batch, d_in, generator=gs)
        return x, (x @ teacher).argmax(1)

    return data


def _mlp(widths: Sequence[int], act: Callable[[], nn.Module],
         init: Callable[[torch.Tensor], Any] | None = None,
         dropout: float = 0.0) -> nn.Sequential:
    """Linear layers of ``widths`` with ``act`` between; ``init`` draws each weight (in
    place) and the biases start at 0."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        lin = nn.Linear(a, b)
        if init is not None:
            init(lin.weight)
            nn.init.zeros_(lin.bias)
        layers.append(lin)
        if i < len(widths) - 2:
            layers.append(act())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def _sgd(m: nn.Module, lr: float = 0.05, momentum: float = 0.9) -> torch.optim.Optimizer:
    return torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum)


def _ce_trial(model: nn.Module, opt: torch.optim.Optimizer, seed: int, d_in: int,
              n_cls: int = 10, batch: int = 64, clip: float | None = None) -> Trial:
    data = _classify(seed, d_in, n_cls, batch)

    def loss(step: int) -> torch.Tensor:
        x, y = data(step)
        return F.cross_entropy(model(x), y)

    return Trial(model, opt, loss, clip)


def _he(w: torch.Tensor) -> None:
    nn.init.kaiming_normal_(w, nonlinearity="relu")


# -- healthy ---------------------------------------------------------------------------------
def relu_mlp_he(seed: int) -> Trial:
    torch.manual_seed(seed)
    m = _mlp([32, 64, 64, 64, 64, 64, 10], nn.ReLU, _he)
    return _ce_trial(m, _sgd(m), seed, 32)


class BasicBlock(nn.Module):
    """A ResNet basic block: in-place ReLU and ``out += x`` (also used by other tests)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class SmallResNet(nn.Module):
    def __init__(self, c: int = 8, blocks: int = 3, n_cls: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.blocks = nn.Sequential(*[BasicBlock(c) for _ in range(blocks)])
        self.fc = nn.Linear(c, n_cls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.relu(self.bn(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def resnet_bn(seed: int) -> Trial:
    torch.manual_seed(seed)
    m = SmallResNet()
    g = torch.Generator().manual_seed(2000 + seed)
    protos = torch.randn(10, 3, 8, 8, generator=g)

    def loss(step: int) -> torch.Tensor:
        gs = torch.Generator().manual_seed(seed * 100_003 + step)
        y = torch.randint(0, 10, (32,), generator=gs)
        x = protos[y] + 0.5 * torch.randn(32, 3, 8, 8, generator=gs)
        return F.cross_entropy(m(x), y)

    return Trial(m, _sgd(m), loss)


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 16, d: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        enc = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=64, dropout=0.1,
                                         batch_first=True)
        self.enc = nn.TransformerEncoder(enc, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(x)))


def transformer(seed: int) -> Trial:
    """Sequence reversal with a 2-layer Transformer encoder, Adam."""
    torch.manual_seed(seed)
    m = TinyTransformer()

    def loss(step: int) -> torch.Tensor:
        gs = torch.Generator().manual_seed(seed * 100_003 + step)
        x = torch.randint(0, 16, (16, 8), generator=gs)
        return F.cross_entropy(m(x).reshape(-1, 16), x.flip(1).reshape(-1))

    return Trial(m, torch.optim.Adam(m.parameters(), lr=1e-3), loss)


class SeqModel(nn.Module):
    """Input projection -> recurrent layer -> head on the last hidden state."""

    def __init__(self, rnn: nn.Module, d_in: int = 8, hidden: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, hidden)
        self.rnn = rnn
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.inp(x))
        return self.head(out[:, -1]).squeeze(-1)


def _seq_loss(m: nn.Module, seed: int, T: int) -> Callable[[int], torch.Tensor]:
    """Regress the sum of the first input channel over time (needs long memory)."""

    def loss(step: int) -> torch.Tensor:
        gs = torch.Generator().manual_seed(seed * 100_003 + step)
        x = torch.randn(32, T, 8, generator=gs)
        return F.mse_loss(m(x), x[:, :, 0].sum(1) / math.sqrt(T))

    return loss


def lstm(seed: int) -> Trial:
    torch.manual_seed(seed)
    m = SeqModel(nn.LSTM(32, 32, batch_first=True))
    return Trial(m, torch.optim.Adam(m.parameters(), lr=3e-3), _seq_loss(m, seed, 20))


def tanh_mlp_xavier_dropout(seed: int) -> Trial:
    torch.manual_seed(seed)
    gain = nn.init.calculate_gain("tanh")
    m = _mlp([32, 64, 64, 64, 64, 64, 64, 10], nn.Tanh,
             lambda w: nn.init.xavier_uniform_(w, gain=gain), dropout=0.1)
    return _ce_trial(m, _sgd(m), seed, 32)


# -- broken ------------------------------------------------------------------------------------
def sigmoid_normal(seed: int) -> Trial:
    """Glorot & Bengio's failing net: 8 sigmoid layers, weights from N(0, 1)."""
    torch.manual_seed(seed)
    m = _mlp([32] + [64] * 8 + [10], nn.Sigmoid, lambda w: nn.init.normal_(w, 0.0, 1.0))
    return _ce_trial(m, _sgd(m), seed, 32)


def tanh_tiny_init(seed: int) -> Trial:
    """A deep tanh net initialised with std 0.02: the error signal dies on its way down."""
    torch.manual_seed(seed)
    m = _mlp([32] + [64] * 10 + [10], nn.Tanh, lambda w: nn.init.normal_(w, 0.0, 0.02))
    return _ce_trial(m, _sgd(m), seed, 32)


def exploding_rnn(seed: int, gain: float = 3.0) -> Trial:
    """A tanh RNN whose recurrent weight is an orthogonal matrix times ``gain``."""
    torch.manual_seed(seed)
    m = SeqModel(nn.RNN(32, 32, batch_first=True, nonlinearity="tanh"))
    with torch.no_grad():
        nn.init.orthogonal_(m.rnn.weight_hh_l0)
        m.rnn.weight_hh_l0.mul_(gain)
    return Trial(m, torch.optim.Adam(m.parameters(), lr=1e-3), _seq_loss(m, seed, 40))


def relu_oversized_init(seed: int) -> Trial:
    """A deep ReLU MLP with weights from N(0, 1): activations grow ~5.7x per layer."""
    torch.manual_seed(seed)
    m = _mlp([32] + [64] * 8 + [10], nn.ReLU, lambda w: nn.init.normal_(w, 0.0, 1.0))
    return _ce_trial(m, _sgd(m, lr=0.01, momentum=0.0), seed, 32)


def relu_negative_bias(seed: int) -> Trial:
    """A He-initialised ReLU MLP whose third hidden layer has bias -20: that ReLU is dead."""
    torch.manual_seed(seed)
    m = _mlp([32, 64, 64, 64, 64, 10], nn.ReLU, _he)
    with torch.no_grad():
        m[4].bias.fill_(-20.0)  # the Linear before ReLU '5'
    return _ce_trial(m, _sgd(m), seed, 32)


class NaNAfter(nn.Module):
    """A learnable per-feature scale that outputs NaN from its ``at``-th call (0-based) on:
    a custom layer breaking mid-training (a log of a negative, a 0/0...)."""

    def __init__(self, width: int, at: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))
        self.at = at
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        y = x * self.scale
        if self.calls > self.at:
            return y * float("nan")
        return y


NAN_STEP = 57  # 0-based index of the training step at which NaNAfter breaks


def nan_midway(seed: int) -> Trial:
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
        NaNAfter(64, NAN_STEP), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10),
    )
    return _ce_trial(m, _sgd(m), seed, 32)


def _regression(m: nn.Module, seed: int, d_in: int,
                target: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[int], torch.Tensor]:
    """MSE on ``target(x @ teacher)`` for a fixed random linear teacher."""
    g = torch.Generator().manual_seed(1000 + seed)
    teacher = torch.randn(d_in, 1, generator=g)

    def loss(step: int) -> torch.Tensor:
        gs = torch.Generator().manual_seed(seed * 100_003 + step)
        x = torch.randn(64, d_in, generator=gs)
        return F.mse_loss(m(x), target(x @ teacher))

    return loss


def _lr_schedule(opt: torch.optim.Optimizer, loss: Callable[[int], torch.Tensor],
                 lr: Callable[[int], float]) -> Callable[[int], torch.Tensor]:
    """``loss`` with the learning rate of step ``i`` set to ``lr(i)`` before it."""

    def scheduled(step: int) -> torch.Tensor:
        for group in opt.param_groups:
            group["lr"] = lr(step)
        return loss(step)

    return scheduled


def relu_lr_too_high(seed: int) -> Trial:
    """A He-initialised ReLU regression MLP whose learning-rate warm-up climbs to 0.3 over
    60 steps: SGD is stable up to about 0.07 here, so it blows up between steps 20 and 35."""
    torch.manual_seed(seed)
    m = _mlp([16, 64, 64, 64, 1], nn.ReLU, _he)
    opt = _sgd(m, lr=0.0, momentum=0.0)
    loss = _regression(m, seed, 16, lambda y: y)
    return Trial(m, opt, _lr_schedule(opt, loss, lambda i: 0.3 * min(1.0, (i + 1) / 60)))


LR_SPIKE = 60  # 0-based first step of the learning-rate spike in relu_lr_spike


def relu_lr_spike(seed: int) -> Trial:
    """A He-initialised ReLU MLP with a ReLU on its one output (a non-negative target),
    SGD at lr 0.01 with a 30x learning-rate spike for 3 steps from step 60: the spike
    overshoots and leaves the output's pre-activations below zero for every input, so the
    output ReLU dies (and with it every gradient of the model)."""
    torch.manual_seed(seed)
    m = nn.Sequential(_mlp([16, 64, 64, 1], nn.ReLU, _he), nn.ReLU())
    opt = _sgd(m, lr=0.01, momentum=0.0)
    loss = _regression(m, seed, 16, lambda y: F.softplus(y) + 1)
    spike = range(LR_SPIKE, LR_SPIKE + 3)
    return Trial(m, opt, _lr_schedule(opt, loss, lambda i: 0.3 if i in spike else 0.01))


_SIGMOIDS = tuple(str(i) for i in range(1, 16, 2))
_TANH_LOW = ("0", "2", "4", "6", "8")
_LINEARS_RELU = tuple(str(i) for i in range(0, 17, 2))

ZOO: tuple[Setup, ...] = (
    Setup("relu_mlp_he", relu_mlp_he),
    Setup("resnet_bn_inplace", resnet_bn),
    Setup("transformer_encoder", transformer),
    Setup("lstm", lstm),
    Setup("tanh_mlp_xavier_dropout", tanh_mlp_xavier_dropout),
    Setup("sigmoid_normal_init", sigmoid_normal, ("saturated",), _SIGMOIDS, 60,
          "init_scale"),
    Setup("tanh_tiny_init", tanh_tiny_init, ("vanishing",), _TANH_LOW, 60, "init_scale"),
    Setup("tanh_rnn_gain3", exploding_rnn, ("exploding",), ("rnn",), 60, "recurrent_gain"),
    Setup("relu_oversized_init", relu_oversized_init, ("exploding", "nonfinite"),
          _LINEARS_RELU, 40, "init_scale"),
    Setup("relu_negative_bias", relu_negative_bias, ("dead",), ("5",), 60, "bias_shift"),
    Setup("nan_midway", nan_midway, ("nonfinite",), ("4",), 80, "forward_op"),
    Setup("relu_lr_too_high", relu_lr_too_high, ("exploding",), ("0", "2", "4", "6"), 50,
          "learning_rate"),
    Setup("relu_lr_spike", relu_lr_spike, ("dead",), ("1",), 100, "learning_rate"),
)
SEEDS = (0, 1)


# -- non-finite values, each with where and why it starts (the non-finite origin issue) ------
class LogShift(nn.Module):
    """A custom parameter-free leaf: ``log(x - 1e6)`` is NaN for every ordinary x."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x - 1e6)


class InlineBlock(nn.Module):
    """A container whose own forward does math between its children: ``log`` of a
    pre-activation that is often negative makes NaN inside the container itself."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.log(self.fc(x)))


class WhereSqrt(nn.Module):
    """``torch.where(x > 0, x.sqrt(), 0)``: finite forward, NaN backward (0 * inf from the
    branch not taken at x < 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, x.sqrt(), torch.zeros_like(x))


class WithNorm(nn.Module):
    """Appends each row's L2 norm, written out as ``sqrt(sum(x**2))``, as a feature: its
    gradient x/|x| is 0 * inf on a zero row (``torch.linalg.vector_norm`` defines it as 0
    there; the hand-written norm does not)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x.pow(2).sum(1, keepdim=True).sqrt()], 1)


def _nf_mlp(middle: nn.Module, d: int = 64) -> nn.Sequential:
    return nn.Sequential(nn.Linear(32, d), nn.ReLU(), middle, nn.Linear(d, 10))


def nf_log_leaf(seed: int) -> Trial:
    torch.manual_seed(seed)
    m = _nf_mlp(LogShift())
    return _ce_trial(m, _sgd(m), seed, 32)


def nf_inline_container(seed: int) -> Trial:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), InlineBlock(), nn.ReLU(), nn.Linear(64, 10))
    return _ce_trial(m, _sgd(m), seed, 32)


def nf_where_sqrt(seed: int) -> Trial:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(32, 64), WhereSqrt(), nn.Linear(64, 10))
    return _ce_trial(m, _sgd(m), seed, 32)


def nf_zero_norm(seed: int) -> Trial:
    """Padding rows (all zero) in every batch reach ``WithNorm`` through a bias-free
    Linear: the forward is finite, the backward NaN."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(32, 64, bias=False), WithNorm(), nn.Linear(65, 10))
    data = _classify(seed, 32, 10, 64)

    def loss(step: int) -> torch.Tensor:
        x, y = data(step)
        x = x.clone()
        x[-4:] = 0.0  # padding
        return F.cross_entropy(m(x), y)

    return Trial(m, _sgd(m), loss)


NF_BAD_BATCH = 30  # 0-based step whose batch holds a NaN in nf_bad_batch


def nf_bad_batch(seed: int) -> Trial:
    torch.manual_seed(seed)
    m = _mlp([32, 64, 64, 10], nn.ReLU, _he)
    data = _classify(seed, 32, 10, 64)

    def loss(step: int) -> torch.Tensor:
        x, y = data(step)
        if step == NF_BAD_BATCH:
            x = x.clone()
            x[3, 5] = float("nan")  # one corrupted feature
        return F.cross_entropy(m(x), y)

    return Trial(m, _sgd(m), loss)


def nf_huge_lr(seed: int) -> Trial:
    """SGD at lr 1e38: the first update overflows the weights to +-inf (NaN after)."""
    torch.manual_seed(seed)
    m = _mlp([16, 64, 64, 1], nn.ReLU, _he)
    opt = _sgd(m, lr=1e38, momentum=0.0)
    return Trial(m, opt, _regression(m, seed, 16, lambda y: 100 * y))


def nf_fp16_overflow(seed: int) -> Trial:
    """fp16 autocast without a GradScaler: inputs of scale 100 and a second Linear drawn
    with std 30 give outputs beyond fp16's 65504 there: inf in that Linear's forward."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                      nn.Linear(256, 10))
    nn.init.kaiming_normal_(m[0].weight)
    nn.init.normal_(m[2].weight, 0.0, 30.0)
    data = _classify(seed, 32, 10, 64)

    def loss(step: int) -> torch.Tensor:
        x, y = data(step)
        with torch.autocast("cpu", dtype=torch.float16):
            out = m(100 * x)
        return F.cross_entropy(out.float(), y)

    return Trial(m, _sgd(m, lr=1e-4), loss)


#: Non-finite values with their origin and cause: ``layers`` is where the NaN/Inf starts,
#: ``cause`` why. Reported right needs the non-finite origin detector.
NONFINITE_ZOO: tuple[Setup, ...] = (
    Setup("nf_log_leaf", nf_log_leaf, ("nonfinite",), ("2",), 5, "forward_op"),
    Setup("nf_inline_container", nf_inline_container, ("nonfinite",), ("2",), 5,
          "forward_op"),
    Setup("nf_where_sqrt_backward", nf_where_sqrt, ("nonfinite",), ("1",), 5,
          "backward_op"),
    Setup("nf_zero_norm_backward", nf_zero_norm, ("nonfinite",), ("1",), 5, "backward_op"),
    Setup("nf_bad_batch", nf_bad_batch, ("nonfinite",), ("0", "(root)"), 40, "input"),
    Setup("nf_huge_lr_params", nf_huge_lr, ("nonfinite",), ("0", "2", "4"), 5,
          "parameters"),
    Setup("nf_fp16_overflow", nf_fp16_overflow, ("nonfinite",), ("2",), 5, "forward_op"),
)


def run(setup: Setup, seed: int, every: int = 10,
        thresholds: gradwatch.Thresholds | dict[str, Any] | None = None,
        keep_snapshots: bool = False, steps: int | None = None,
        sample_every: int | str = "auto") -> Result:
    """Train ``setup`` for its steps under gradwatch (no TensorBoard); collect alerts.
    ``keep_snapshots``: also keep the Snapshot of every ``every``-step window."""
    trial = setup.build(seed)
    alerts: list[gradwatch.Alert] = []
    snaps: list[gradwatch.Snapshot] = []
    w = gradwatch.watch(trial.model, optimizer=trial.optimizer, tensorboard=False,
                        every=every, sample_every=sample_every, thresholds=thresholds,
                        on_alert=alerts.append)
    loss = torch.tensor(math.nan)
    try:
        for step in range(steps or setup.steps):
            loss = trial.loss(step)
            trial.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if trial.clip is not None:
                nn.utils.clip_grad_norm_(trial.model.parameters(), trial.clip)
            trial.optimizer.step()
            if keep_snapshots and (step + 1) % every == 0:
                snap = w.flush()  # the window was just launched: this waits for it
                if snap is not None:
                    snaps.append(snap)
    finally:
        w.close()
    return Result(setup, seed, alerts, float(loss.detach()), snaps, w)
