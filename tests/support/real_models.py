"""Real architectures, healthy and broken, trained the way their users train them.

Each ``Case`` builds a model from a library config or from the architecture's paper (no
download: Hugging Face models from their configs; ResNet, ConvNeXt, ViT, nanoGPT, an LSTM LM
and a VAE written here) with the optimizer its users pick (AdamW for transformers, ConvNeXt
and ViT; SGD with momentum for the ResNet), padding masks, eval passes, autocast and gradient
accumulation where users have them. ``train`` runs one case under gradwatch and returns what
the run said: its alerts, its losses, and every ``GradwatchWarning`` that was not an alert.

A healthy case must train (its loss falls) and raise nothing. A broken case names the alert
that must come first: its kind, where (glob patterns on the layer), its cause, its step, and
words its hint must hold (and must not). Everything is tiny (widths 32-128, 2 blocks, batches
of 8, tens of steps, ``every=10``) so the whole suite runs in a few minutes on 2 CPU cores.

``python benchmarks/real_models.py`` prints the table of every case (docs/real-models.md).
"""

from __future__ import annotations

import fnmatch
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import gradwatch
from gradwatch.rules import optimizer_family

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

V = 64  # vocabulary of the token tasks
T = 16  # sequence length
B = 8  # batch
EVERY = 10


# -- data ------------------------------------------------------------------------------------
def counting(g: torch.Generator, b: int = B, t: int = T) -> torch.Tensor:
    """Token sequences that count up from a random start (mod V): learnable in a few steps."""
    start = torch.randint(0, V, (b, 1), generator=g)
    return (start + torch.arange(t)) % V


def padded(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Counting sequences right-padded with token 0 to T: (ids, attention_mask)."""
    ids = counting(g)
    lens = torch.randint(T // 2, T + 1, (B,), generator=g)
    mask = (torch.arange(T) < lens[:, None]).long()
    return ids * mask, mask


def images(g: torch.Generator, b: int = B, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy images of 4 classes: which color channel is bright (class 3: none)."""
    y = torch.randint(0, 4, (b,), generator=g)
    x = torch.randn(b, 3, size, size, generator=g) * 0.5
    for i, c in enumerate(y.tolist()):
        if c < 3:
            x[i, c] += 1.0
    return x, y


# -- models written here ------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """He et al. 2016's basic block: conv-BN-ReLU-conv-BN plus the shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.out(y + self.down(x))


class ResNet(nn.Module):
    def __init__(self, width: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)
        for m in self.modules():  # torchvision's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class ScaleNorm(nn.Module):
    """Nguyen & Salazar 2019's ScaleNorm, ``g * x / (||x|| + eps)``, with the norm written
    as ``sqrt`` of a sum of squares: finite forward on a zero vector (a padding token's
    embedding), but ``sqrt``'s derivative at 0 times 0 is NaN in its backward."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.tensor(float(dim) ** 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.g * x / (torch.sqrt((x * x).sum(-1, keepdim=True)) + 1e-6)


class ContrastNorm(nn.Module):
    """Per-image contrast normalization, written without an epsilon: a blank image (std 0)
    makes 0/0 in its forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - m) / x.std(dim=(1, 2, 3), keepdim=True)


class ConvNeXtBlock(nn.Module):
    """Liu et al. 2022: depthwise 7x7, LayerNorm, 4x MLP with GELU, LayerScale (1e-6)."""

    def __init__(self, dim: int, scale: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(scale * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, dim: int = 32, depth: int = 2, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.stem_norm = nn.GroupNorm(1, dim)
        self.blocks = nn.Sequential(*[ConvNeXtBlock(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        for m in self.modules():  # the paper's init
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem_norm(self.stem(x)))
        return self.head(self.norm(x.mean(dim=(2, 3))))


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v projections (ViT, BERT style)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // h)
        y = (att.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, t, d)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Dosovitskiy et al. 2021, tiny: 4x4 patches, a class token, learned positions."""

    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, size: int = 16,
                 patch: int = 4, classes: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        n = (size // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        for m in self.modules():  # timm's init
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


class CausalMask(nn.Module):
    """The causal mask in a module of its own: its output holds ``-inf`` above the
    diagonal on purpose, for the ``nn.Softmax`` after it."""

    def __init__(self, t: int) -> None:
        super().__init__()
        self.register_buffer("tril", torch.tril(torch.ones(t, t, dtype=torch.bool)))

    def forward(self, att: torch.Tensor) -> torch.Tensor:
        t = att.shape[-1]
        return att.masked_fill(~self.tril[:t, :t], float("-inf"))


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention: one ``c_attn`` for q, k, v; the mask inline or in a module."""

    def __init__(self, dim: int, heads: int, mask_module: bool) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)
        self.register_buffer("bias", torch.tril(torch.ones(T, T)).view(1, 1, T, T))
        self.mask = CausalMask(T) if mask_module else None
        self.softmax = nn.Softmax(dim=-1) if mask_module else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (y.view(b, t, self.heads, d // self.heads).transpose(1, 2) for y in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        if self.mask is not None and self.softmax is not None:
            att = self.softmax(self.mask(att))
        else:
            att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, d)
        return self.c_proj(y)


class GPTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mask_module: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, mask_module)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """Karpathy's nanoGPT, tiny, with its init (0.02, residual projections scaled)."""

    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4,
                 mask_module: bool = False) -> None:
        super().__init__()
        self.wte = nn.Embedding(V, dim)
        self.wpe = nn.Embedding(T, dim)
        self.h = nn.ModuleList([GPTBlock(dim, heads, mask_module) for _ in range(depth)])
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, V, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * depth) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for blk in self.h:
            x = blk(x)
        return self.lm_head(self.ln_f(x))


class LSTMLM(nn.Module):
    """An LSTM language model; ``scalenorm``: its embeddings go through ``ScaleNorm`` and
    token 0 is padding (its embedding row stays 0)."""

    def __init__(self, dim: int = 64, scalenorm: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, dim, padding_idx=0 if scalenorm else None)
        self.norm = ScaleNorm(dim) if scalenorm else nn.Identity()
        self.lstm = nn.LSTM(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, V)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.norm(self.emb(idx)))[0])


class VAE(nn.Module):
    """Kingma & Welling 2014 on 64-dimensional binary patterns."""

    def __init__(self, d: int = 64, h: int = 128, z: int = 8) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(d, h), nn.ReLU())
        self.mu = nn.Linear(h, z)
        self.logvar = nn.Linear(h, z)
        self.dec = nn.Sequential(nn.Linear(z, h), nn.ReLU(), nn.Linear(h, d))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        e = self.enc(x)
        mu, logvar = self.mu(e), self.logvar(e)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.dec(z), mu, logvar


class MaskedLogSoftmax(nn.Module):
    """A head over classes of which some are invalid: their logits are set to -inf before
    ``log_softmax`` (the log-probability of an impossible class is -inf on purpose)."""

    def __init__(self, valid: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("valid", valid)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(logits.masked_fill(~self.valid, float("-inf")), dim=-1)


class MaskedClassifier(nn.Module):
    def __init__(self, d: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, classes))
        valid = torch.ones(classes, dtype=torch.bool)
        valid[classes // 2:] = False
        self.head = MaskedLogSoftmax(valid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class PixelAttention(nn.Module):
    """Rows of an image as tokens, one self-attention layer, trained in float16 (the whole
    model ``.half()``, no GradScaler). Fine on inputs scaled to [0, 1]; raw 12-bit sensor
    values (0..4095, still finite in float16) make query-key products past float16's
    largest value (65504)."""

    def __init__(self, d: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(48, d)
        self.attn = Attention(d, 1)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1)  # [b, 16, 48]
        return self.head(self.attn(self.embed(tokens)).mean(dim=1))


# -- the cases --------------------------------------------------------------------------------
@dataclass
class Trial:
    """One built case: ``step(i)`` returns the loss of training step ``i`` after its
    backward (the case does its own forward/backward, accumulation and clipping);
    ``optimizer.step()`` and ``zero_grad`` are done by ``train``."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[int], float]
    scaler: Any = None
    evaluate: Callable[[], None] | None = None  # an eval pass (every EVERY steps)
    clip: float | None = None


@dataclass(frozen=True)
class Case:
    name: str
    family: str
    build: Callable[[], Trial]
    steps: int = 40
    kind: str | None = None  # None: healthy
    layers: tuple[str, ...] = ()  # globs of where the first alert is right
    cause: str | None = None
    at: tuple[int, int] | None = None  # the steps it is right to report it on (inclusive)
    hint: tuple[str, ...] = ()  # words the hint must hold (case-insensitive)
    not_hint: tuple[str, ...] = ()  # ... and must not
    fault: str = ""  # what is broken, in words

    @property
    def expected(self) -> str:
        if self.kind is None:
            return "no alert, loss falls"
        at = "" if self.at is None else f" at step {self.at[0]}" if self.at[0] == self.at[1] \
            else f" at steps {self.at[0]}-{self.at[1]}"
        return f"{self.kind} / {self.cause} at {' or '.join(self.layers)}{at}"


@dataclass
class Outcome:
    case: Case
    alerts: list[gradwatch.Alert]
    losses: list[float]
    internal: list[str]  # GradwatchWarnings that are not alerts
    snapshots: list[gradwatch.Snapshot] = field(default_factory=list)  # train(keep=True)
    family: tuple[str, float] = ("sgd", math.nan)  # the optimizer's, as the rules read it

    @property
    def first(self) -> gradwatch.Alert | None:
        return self.alerts[0] if self.alerts else None

    def problems(self) -> list[str]:
        """What is wrong with this run against its case; [] when right."""
        c, out = self.case, []
        if self.internal:
            out.append("internal warnings: " + "; ".join(w[:120] for w in self.internal))
        if c.kind is None:
            if self.alerts:
                out.append("alerts on a healthy run: " + "; ".join(
                    f"{a.kind} {a.layer} {a.cause} @{a.step}" for a in self.alerts[:5]))
            k = max(1, len(self.losses) // 5)
            first, last = sum(self.losses[:k]) / k, sum(self.losses[-k:]) / k
            if not last < 0.8 * first:
                out.append(f"loss did not fall: {first:.3g} -> {last:.3g}")
            return out
        a = self.first
        if a is None:
            return out + ["no alert"]
        if a.kind != c.kind:
            out.append(f"first alert kind {a.kind}, expected {c.kind}")
        if not any(fnmatch.fnmatchcase(a.layer, p) for p in c.layers):
            out.append(f"first alert at {a.layer!r}, expected {c.layers}")
        if a.cause != c.cause:
            out.append(f"cause {a.cause}, expected {c.cause}")
        if c.at is not None and not c.at[0] <= a.step <= c.at[1]:
            out.append(f"step {a.step}, expected {c.at}")
        hint = (a.hint or "").lower()
        out += [f"hint lacks {w!r}" for w in c.hint if w.lower() not in hint]
        out += [f"hint has {w!r}" for w in c.not_hint if w.lower() in hint]
        return out

    def row(self) -> str:
        a = self.first
        said = "no alert" if a is None else f"{a.kind} | `{a.layer}` | {a.cause} | {a.step}"
        if a is None:
            said = "no alert | | |"
        ok = "right" if not self.problems() else "WRONG: " + "; ".join(self.problems())
        return f"| {self.case.name} | {said} | {self.case.expected} | {ok} |"


def train(case: Case, seed: int = 0, keep: bool = False) -> Outcome:
    """Train ``case`` under gradwatch as its users train it (the README's idiom:
    ``watch(model, optimizer=opt)``, the loop unchanged) and return what the run said.
    ``keep``: also keep every window's ``watcher.latest`` (for the measurements)."""
    torch.manual_seed(seed)
    tr = case.build()
    losses: list[float] = []
    snaps: list[gradwatch.Snapshot] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradwatch.watch(tr.model, optimizer=tr.optimizer, scaler=tr.scaler,
                             tensorboard=False, every=EVERY, on_alert="warn") as w:
            for i in range(case.steps):
                tr.model.train()
                tr.optimizer.zero_grad(set_to_none=True)
                losses.append(tr.step(i))
                if tr.scaler is not None:
                    if tr.clip is not None:
                        tr.scaler.unscale_(tr.optimizer)
                        nn.utils.clip_grad_norm_(tr.model.parameters(), tr.clip)
                    tr.scaler.step(tr.optimizer)
                    tr.scaler.update()
                else:
                    if tr.clip is not None:
                        nn.utils.clip_grad_norm_(tr.model.parameters(), tr.clip)
                    tr.optimizer.step()
                if tr.evaluate is not None and (i + 1) % EVERY == 0:
                    tr.model.eval()
                    with torch.no_grad():
                        tr.evaluate()
                if keep and (i + 1) % EVERY == 0 and w.latest is not None:
                    snaps.append(w.latest)
        alerts = list(w.alerts)
        family = optimizer_family(tr.optimizer)
    internal = [f"{type(x.message).__name__}: {str(x.message)[:200]}" for x in caught
                if isinstance(x.message, gradwatch.GradwatchWarning)
                and not any(isinstance(x.message, k) for k in _ALERT_WARNINGS)]
    return Outcome(case, alerts, losses, internal, snaps, family)


_ALERT_WARNINGS = (gradwatch.VanishingGradientWarning, gradwatch.ExplodingGradientWarning,
                   gradwatch.NonFiniteWarning, gradwatch.DeadActivationWarning,
                   gradwatch.SaturationWarning)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(1)


def _lm(model: nn.Module, opt: torch.optim.Optimizer, call: Callable[[torch.Tensor], Any],
        **extra: Any) -> Trial:
    """A next-token task on counting sequences; ``call(ids)`` -> logits."""
    g = _gen()

    def step(i: int) -> float:
        ids = counting(g)
        logits = call(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
        loss.backward()
        return loss.item()

    return Trial(model, opt, step, **extra)


# Hugging Face ------------------------------------------------------------------------------
def gpt2(init: str = "", lr: float = 3e-3, sgd: bool = False, nan_kw_at: int | None = None,
         accum: int = 1, clip: float | None = None, layers: int = 2,
         width: int = 64) -> Callable[[], Trial]:
    def build() -> Trial:
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=4, n_positions=T, vocab_size=V,
                         bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0)
        net = GPT2LMHeadModel(cfg)
        if init == "normal":  # every weight N(0, 1)
            with torch.no_grad():
                for n, p in net.named_parameters():
                    if n.endswith("weight"):
                        p.normal_(0.0, 1.0)
        opt = (torch.optim.SGD(net.parameters(), lr=lr) if sgd
               else torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01))
        g = _gen()

        def step(i: int) -> float:
            total = 0.0
            for _ in range(accum):
                ids = counting(g)
                if nan_kw_at == i:  # a NaN batch passed by keyword
                    emb = net.transformer.wte(ids).detach()
                    emb[0, 3, :] = float("nan")
                    loss = net(inputs_embeds=emb, labels=ids).loss
                else:
                    loss = net(input_ids=ids, labels=ids).loss
                (loss / accum).backward()
                total += loss.item() / accum
            return total

        return Trial(net, opt, step, clip=clip)
    return build


def bert(nan_kw_at: int | None = None) -> Callable[[], Trial]:
    return lambda: _bert(nan_kw_at)


def _bert(nan_kw_at: int | None) -> Trial:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=T, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    net = BertForSequenceClassification(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    g = _gen()

    def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, mask = padded(g)
        return ids, mask, (ids[:, 0] >= V // 2).long()

    def step(i: int) -> float:
        ids, mask, y = batch()
        if nan_kw_at == i:  # a NaN batch passed by keyword
            emb = net.bert.embeddings.word_embeddings(ids).detach()
            emb[1, 2, :] = float("nan")
            loss = net(inputs_embeds=emb, attention_mask=mask, labels=y).loss
        else:
            loss = net(input_ids=ids, attention_mask=mask, labels=y).loss
        loss.backward()
        return loss.item()

    def evaluate() -> None:
        ids, mask, _ = batch()
        net(input_ids=ids, attention_mask=mask)

    return Trial(net, opt, step, evaluate=evaluate)


def bart() -> Trial:
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = BartConfig(vocab_size=V, d_model=64, encoder_layers=1, decoder_layers=1,
                     encoder_attention_heads=4, decoder_attention_heads=4,
                     encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=T + 2,
                     dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                     pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    net = BartForConditionalGeneration(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    g = _gen()

    def step(i: int) -> float:
        ids, mask = padded(g)
        ids = torch.where(mask.bool(), ids.clamp(min=3), torch.ones_like(ids))  # pad = 1
        labels = ids.masked_fill(~mask.bool(), -100)  # a copy task
        loss = net(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.item()

    return Trial(net, opt, step)


def llama(init: str = "") -> Callable[[], Trial]:
    """``init="normal"``: every matrix N(0, 1), 4 blocks of width 128, SGD."""
    def build() -> Trial:
        from transformers import LlamaConfig, LlamaForCausalLM

        big = init == "normal"
        cfg = LlamaConfig(vocab_size=V, hidden_size=128 if big else 64,
                          intermediate_size=256 if big else 128,
                          num_hidden_layers=4 if big else 2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=T, bos_token_id=0,
                          eos_token_id=0, pad_token_id=0)
        net = LlamaForCausalLM(cfg)
        if big:
            with torch.no_grad():
                for p in net.parameters():
                    if p.dim() == 2:
                        p.normal_(0.0, 1.0)
        opt = (torch.optim.SGD(net.parameters(), lr=0.01) if big
               else torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.01))
        g = _gen()

        def step(i: int) -> float:
            ids = counting(g)
            loss = net(input_ids=ids, labels=ids).loss
            loss.backward()
            return loss.item()

        return Trial(net, opt, step)
    return build


# written here -----------------------------------------------------------------------------
def resnet(lr: float = 0.02, blank_at: int | None = None, contrast: bool = False,
           nan_at: int | None = None) -> Callable[[], Trial]:
    def build() -> Trial:
        net = ResNet()
        if contrast:
            net.stem = nn.Sequential(ContrastNorm(), *net.stem)
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        g = _gen()

        def step(i: int) -> float:
            x, y = images(g)
            if blank_at == i:
                x[0] = 0.0  # a blank image in the batch
            if nan_at == i:
                x[1, 0, 2, 2] = float("nan")
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            return loss.item()

        def evaluate() -> None:
            net(images(g)[0])

        return Trial(net, opt, step, evaluate=evaluate)
    return build


def convnext() -> Trial:
    net = ConvNeXt()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.05)
    g = _gen()

    def step(i: int) -> float:
        x, y = images(g)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss.item()

    return Trial(net, opt, step, evaluate=lambda: net(images(g)[0]))


def vit(nan_at: int | None = None, keyword: bool = False,
        sgd_lr: float | None = None) -> Callable[[], Trial]:
    def build() -> Trial:
        net = ViT()
        opt = (torch.optim.SGD(net.parameters(), lr=sgd_lr, momentum=0.9) if sgd_lr
               else torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05))
        g = _gen()

        def step(i: int) -> float:
            x, y = images(g)
            if nan_at == i:
                x[2, 1, 5, 5] = float("nan")
            out = net(pixel_values=x) if keyword else net(x)
            loss = F.cross_entropy(out, y)
            loss.backward()
            return loss.item()

        return Trial(net, opt, step, evaluate=lambda: net(images(g)[0]))
    return build


def nanogpt(mask_module: bool = False, autocast: torch.dtype | None = None,
            scaler: bool = False) -> Callable[[], Trial]:
    def build() -> Trial:
        net = NanoGPT(mask_module=mask_module)
        opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
        sc = torch.amp.GradScaler("cpu") if scaler else None
        g = _gen()

        def step(i: int) -> float:
            ids = counting(g)
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16,
                                enabled=autocast is not None):
                logits = net(ids)
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(),
                                       ids[:, 1:].reshape(-1))
            (sc.scale(loss) if sc is not None else loss).backward()
            return loss.item()

        return Trial(net, opt, step, scaler=sc, clip=1.0 if scaler else None)
    return build


def transformer_encoder() -> Trial:
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    emb = nn.Embedding(V, 64)
    head = nn.Linear(64, 2)
    net = nn.ModuleDict({"emb": emb, "enc": enc, "head": head})
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    g = _gen()

    def run(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = enc(emb(ids), src_key_padding_mask=~mask.bool())
        return head(h[:, 0])

    def step(i: int) -> float:
        ids, mask = padded(g)
        loss = F.cross_entropy(run(ids, mask), (ids[:, 0] >= V // 2).long())
        loss.backward()
        return loss.item()

    def evaluate() -> None:
        run(*padded(g))

    return Trial(net, opt, step, evaluate=evaluate)


def lstm_lm(pad_at: int | None = None) -> Callable[[], Trial]:
    """``pad_at``: the model has ScaleNorm on its embeddings, and the batch of that step is
    the first one with padding (tokens count in 1..V-1 otherwise)."""
    def build() -> Trial:
        net = LSTMLM(scalenorm=pad_at is not None)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        g = _gen()

        def step(i: int) -> float:
            ids = counting(g) % (V - 1) + 1 if pad_at is not None else counting(g)
            if pad_at == i:
                ids[0, T // 2:] = 0
            logits = net(ids)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
            loss.backward()
            return loss.item()

        return Trial(net, opt, step, clip=1.0)
    return build


def vae(nan_at: int | None = None) -> Callable[[], Trial]:
    def build() -> Trial:
        net = VAE()
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        g = _gen()
        protos = (torch.rand(4, 64, generator=g) > 0.5).float()

        def step(i: int) -> float:
            x = protos[torch.randint(0, 4, (32,), generator=g)]
            if nan_at == i:
                x = x.clone()
                x[0, 0] = float("nan")
            logits, mu, logvar = net(x)
            rec = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / len(x)
            kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / len(x)
            loss = rec + kl
            loss.backward()
            return loss.item()

        return Trial(net, opt, step)
    return build


def masked_head() -> Trial:
    net = MaskedClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    g = _gen()
    w = torch.randn(32, 5, generator=g)

    def step(i: int) -> float:
        x = torch.randn(32, 32, generator=g)
        loss = F.nll_loss(net(x), (x @ w).argmax(-1))
        loss.backward()
        return loss.item()

    return Trial(net, opt, step)


def fp16_overflow() -> Trial:
    net = PixelAttention().half()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    g = _gen()

    def step(i: int) -> float:
        x, y = images(g)
        x = (x * 0.25 + 0.5).clamp(0, 1)  # pixel values scaled to [0, 1]
        if i == 12:
            x = x * 4095  # a batch of raw 12-bit sensor values that skipped the scaling
        loss = F.cross_entropy(net(x.half()).float(), y)
        loss.backward()
        return loss.item()

    return Trial(net, opt, step)


CASES: list[Case] = [
    # healthy: every one must train and stay quiet
    Case("gpt2", "GPT-2 (HF)", gpt2()),
    Case("gpt2-accum-clip", "GPT-2 (HF)", gpt2(accum=4, clip=1.0), steps=30),
    Case("bert-padding", "BERT (HF)", bert()),
    Case("bart-padding", "BART (HF)", bart),
    Case("llama", "Llama (HF)", llama()),
    Case("resnet-sgd", "ResNet", resnet()),
    Case("convnext-layerscale", "ConvNeXt", convnext),
    Case("vit", "ViT", vit()),
    Case("nanogpt-inline-mask", "nanoGPT", nanogpt()),
    Case("nanogpt-mask-module", "nanoGPT", nanogpt(mask_module=True)),
    Case("transformer-encoder-eval", "nn.TransformerEncoder", transformer_encoder),
    Case("lstm-lm", "LSTM LM", lstm_lm()),
    Case("vae", "VAE", vae()),
    Case("masked-log-softmax", "masked head", masked_head),
    Case("nanogpt-bf16-autocast", "nanoGPT", nanogpt(autocast=torch.bfloat16)),
    Case("nanogpt-fp16-scaler", "nanoGPT", nanogpt(autocast=torch.float16, scaler=True)),
    # broken
    Case("gpt2-init-normal", "GPT-2 (HF)",
         gpt2(init="normal", sgd=True, lr=0.01, layers=4, width=128), steps=30,
         kind="vanishing", layers=("transformer.h.*",), cause="init_scale", at=(20, 30),
         hint=("std 1", "normalization divides the gradient"),
         fault="every weight N(0, 1), 4 blocks of width 128, SGD"),
    Case("llama-init-normal", "Llama (HF)", llama(init="normal"), steps=30,
         kind="exploding", layers=("model.layers.*",), cause="init_scale", at=(20, 30),
         hint=("std 1", "comes back through weight layers"),
         fault="every matrix N(0, 1), 4 blocks of width 128, SGD"),
    Case("gpt2-lr-fast", "GPT-2 (HF)", gpt2(lr=50.0, sgd=True), steps=10,
         kind="exploding", layers=("*",), cause="learning_rate", at=(1, 10),
         hint=("learning rate",), not_hint=("sqrt", "where"), fault="SGD lr=50"),
    Case("resnet-lr-fast", "ResNet", resnet(lr=50.0), steps=10,
         kind="exploding", layers=("*",), cause="learning_rate", at=(1, 10),
         hint=("learning rate",), not_hint=("sqrt", "where"), fault="SGD lr=50"),
    Case("gpt2-lr-slow", "GPT-2 (HF)", gpt2(lr=2.0, sgd=True), steps=20,
         kind="exploding", layers=("*",), cause="learning_rate", at=(11, 15),
         hint=("update_ratio", "learning rate"), fault="SGD lr=2: blows up after step 10"),
    Case("vit-lr-slow", "ViT", vit(sgd_lr=1.0), steps=30,
         kind="exploding", layers=("*",), cause="learning_rate", at=(11, 20),
         hint=("update_ratio", "learning rate"), fault="SGD lr=1 (momentum 0.9)"),
    Case("vit-nan-batch", "ViT", vit(nan_at=14), steps=20,
         kind="nonfinite", layers=("patch",), cause="input", at=(15, 15),
         fault="a NaN pixel in the batch of step 15, passed positionally"),
    Case("vit-nan-batch-keyword", "ViT", vit(nan_at=14, keyword=True), steps=20,
         kind="nonfinite", layers=("patch", "(root)"), cause="input", at=(15, 15),
         fault="a NaN pixel, passed as model(pixel_values=...)"),
    Case("gpt2-nan-inputs-embeds", "GPT-2 (HF)", gpt2(nan_kw_at=14), steps=20,
         kind="nonfinite", layers=("transformer", "transformer.*", "(root)"), cause="input",
         at=(15, 15), fault="a NaN in inputs_embeds= at step 15"),
    Case("bert-nan-inputs-embeds", "BERT (HF)", bert(nan_kw_at=14), steps=20,
         kind="nonfinite", layers=("bert", "bert.*", "(root)"), cause="input", at=(15, 15),
         fault="a NaN in inputs_embeds= at step 15"),
    Case("vae-nan-batch", "VAE", vae(nan_at=14), steps=20,
         kind="nonfinite", layers=("enc.0", "enc"), cause="input", at=(15, 15),
         fault="a NaN in the batch of step 15"),
    Case("resnet-forward-op", "ResNet", resnet(blank_at=14, contrast=True), steps=20,
         kind="nonfinite", layers=("stem.0",), cause="forward_op", at=(15, 15),
         fault="contrast normalization without epsilon meets a blank image at step 15"),
    Case("lstm-backward-op", "LSTM LM", lstm_lm(pad_at=14), steps=20,
         kind="nonfinite", layers=("norm",), cause="backward_op", at=(15, 15),
         fault="ScaleNorm's sqrt meets a padding token's zero embedding at step 15"),
    Case("fp16-overflow-no-scaler", "attention in float16", fp16_overflow, steps=20,
         kind="nonfinite", layers=("attn",), cause="forward_op", at=(13, 13),
         hint=("float16",), fault="query-key products pass 65504 in float16 (raw 12-bit "
                                  "values at step 13)"),
]
BY_NAME = {c.name: c for c in CASES}
