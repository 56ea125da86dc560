"""Non-finite values on real architectures, trained the way users train them: an infinity
made on purpose and absorbed downstream is no fault (a causal mask in a module of its own, a
log-softmax head over impossible classes), and silences no other rule; the real faults get
their cause on the step they happen: a learning rate that blows the model up within the first
window, a NaN batch passed by keyword, ``log(0)`` in float32, a float16 overflow; the
nested tensors of ``nn.TransformerEncoder``'s evaluation fast path are checked, not fatal.

Every model is built from a config or written here (no download). Each run asserts the first
alert's kind, layer, cause and step and the words of its hint; a healthy run trains (its
loss falls) and raises no alert and no ``GradwatchWarning``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gradwatch
from tests.support import zoo

pytestmark = pytest.mark.slow


@dataclass
class Run:
    alerts: list[gradwatch.Alert]
    losses: list[float]
    faults: list[str] = field(default_factory=list)  # GradwatchWarning messages

    @property
    def first(self) -> gradwatch.Alert:
        assert self.alerts, "no alert"
        return self.alerts[0]

    def falls(self) -> bool:
        k = max(1, len(self.losses) // 5)
        return sum(self.losses[-k:]) / k < 0.8 * sum(self.losses[:k]) / k


def train(model: nn.Module, opt: torch.optim.Optimizer, loss_of: Callable[[int], Any],
          steps: int, every: int = 100, after: Callable[[int], None] | None = None,
          **kw: Any) -> Run:
    """A user's loop: forward, zero_grad, backward, step; the watcher found from the
    optimizer. ``after(i)``: run after step ``i`` (0-based; an evaluation pass)."""
    got: list[gradwatch.Alert] = []
    losses: list[float] = []
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with gradwatch.watch(model, tensorboard=False, every=every, on_alert=got.append,
                             **kw):
            for i in range(steps):
                loss = loss_of(i)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                if after is not None:
                    after(i)
    faults = [str(w.message) for w in seen if issubclass(w.category, gradwatch.GradwatchWarning)]
    return Run(got, losses, faults)


def healthy(run: Run) -> None:
    assert run.faults == []
    assert [(a.kind, a.layer, a.cause) for a in run.alerts] == []
    assert run.falls(), run.losses


def no_sqrt(hint: str) -> None:
    for word in ("sqrt", "where", "infinite derivative", "float16"):
        assert word not in hint, hint


# -- models -------------------------------------------------------------------------------------
class CausalMask(nn.Module):
    """nanoGPT's causal mask as a module of its own: ``masked_fill(-inf)`` above the
    diagonal; the softmax after it absorbs the infinities."""

    def __init__(self, block: int) -> None:
        super().__init__()
        self.register_buffer("future", torch.ones(block, block).triu(1).bool())

    def forward(self, att: torch.Tensor) -> torch.Tensor:
        t = att.size(-1)
        return att.masked_fill(self.future[:t, :t], float("-inf"))


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, block: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.mask = CausalMask(block)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = self.softmax(self.mask(q @ k.transpose(-2, -1) / math.sqrt(k.size(-1))))
        return self.c_proj((att @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, block: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = SelfAttention(d, heads, block)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, vocab: int = 48, d: int = 32, heads: int = 2, layers: int = 2,
                 block: int = 16) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block, d)
        self.h = nn.ModuleList(Block(d, heads, block) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for blk in self.h:
            x = blk(x)
        return self.lm_head(self.ln_f(x))


def copy_task(vocab: int, batch: int, t: int, seed: int = 0) -> Callable[[int], torch.Tensor]:
    """Sequences of a few repeated tokens: learnable within tens of steps."""
    def data(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1000 + step % 8)
        base = torch.randint(0, vocab, (batch, 4), generator=g)
        return base.repeat(1, t // 4 + 1)[:, : t + 1]

    return data


class ValidClasses(nn.Module):
    """Logits of the classes a sample cannot take set to ``-inf`` (a log-softmax over the
    valid ones follows; the loss reads only the target's log-probability)."""

    def __init__(self, valid: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("valid", valid)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.masked_fill(~self.valid, float("-inf"))


def masked_head_data(seed: int = 0) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(16, 6, generator=g)

    def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gs = torch.Generator().manual_seed(100 + step)
        x = torch.randn(64, 16, generator=gs)
        return x, (x @ teacher).argmax(1)

    return data


VALID = torch.tensor([True] * 6 + [False] * 4)  # 10 outputs, the last 4 impossible


class Res(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNet(nn.Module):
    """A small ResNet (BatchNorm, residual blocks); takes its batch positionally or as
    ``pixel_values=`` like Hugging Face vision models, and normalizes it per channel in its
    own forward (the stem receives a tensor the model made)."""

    def __init__(self, c: int = 8, n_cls: int = 10) -> None:
        super().__init__()
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.1))
        self.register_buffer("std", torch.full((1, 3, 1, 1), 1.2))
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.layer1 = nn.Sequential(Res(c), Res(c))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, n_cls)

    def forward(self, x: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        x = pixel_values if x is None else x
        assert x is not None
        x = (x - self.mean) / self.std
        return self.fc(self.pool(self.layer1(F.relu(self.bn(self.stem(x))))).flatten(1))


def images(seed: int = 0) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(10, 3, 8, 8, generator=g)

    def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gs = torch.Generator().manual_seed(500 + step % 16)
        y = torch.randint(0, 10, (32,), generator=gs)
        return protos[y] + 0.5 * torch.randn(32, 3, 8, 8, generator=gs), y

    return data


# -- class 1: an Inf made on purpose ----------------------------------------------------------
def test_nanogpt_with_its_causal_mask_in_a_module_of_its_own_is_quiet() -> None:
    torch.manual_seed(0)
    m = NanoGPT()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    data = copy_task(48, 8, 16)

    def loss(i: int) -> torch.Tensor:
        seq = data(i)
        return F.cross_entropy(m(seq[:, :-1]).flatten(0, 1), seq[:, 1:].flatten())

    run = train(m, opt, loss, 60, every=20)
    healthy(run)
    with gradwatch.watch(m, tensorboard=False) as w:  # the mask counts in `nonfinite`
        opt.zero_grad()
        loss(0).backward()
        opt.step()
    snap = w.latest  # the window close() flushed
    assert snap is not None and snap.stats["h.0.attn.mask"]["nonfinite"] > 0
    assert math.isinf(snap.stats["h.0.attn.mask"]["act_mean"])


def test_a_log_softmax_head_over_impossible_classes_is_quiet() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 10), ValidClasses(VALID),
                      nn.LogSoftmax(dim=-1))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    data = masked_head_data()

    def loss(i: int) -> torch.Tensor:
        x, y = data(i)
        return F.nll_loss(m(x), y)

    healthy(train(m, opt, loss, 60, every=20))


def sigmoid_net(masked: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Glorot & Bengio's failing net (8 sigmoid layers, N(0, 1) weights, the zoo's
    ``sigmoid_normal``), with or without a head that masks impossible classes."""
    trial = zoo.sigmoid_normal(0)
    m = trial.model
    if masked:
        m = nn.Sequential(*m, ValidClasses(torch.ones(10, dtype=torch.bool).index_fill(
            0, torch.tensor([9]), False)), nn.LogSoftmax(dim=-1))
        return m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    return m, trial.optimizer


@pytest.mark.parametrize("masked", [False, True])
def test_a_masked_head_keeps_the_saturation_alerts_of_a_deep_sigmoid_net(masked: bool) -> None:
    m, opt = sigmoid_net(masked)
    data = zoo._classify(0, 32, 9, 64)  # 9 classes: the masked 10th is never the target

    def loss(i: int) -> torch.Tensor:
        x, y = data(i)
        out = m(x)
        return F.nll_loss(out, y) if masked else F.cross_entropy(out, y)

    run = train(m, opt, loss, 60, every=10)
    assert run.faults == []
    assert [a for a in run.alerts if a.kind == "nonfinite"] == []
    first = run.first
    assert (first.kind, first.cause) == ("saturated", "init_scale")
    assert first.layer in zoo._SIGMOIDS and first.step == 20
    assert "Sigmoid" in first.hint


class CausalEncoder(nn.Module):
    """Tokens -> ``nn.TransformerEncoder`` under a float causal mask (``-inf`` above the
    diagonal, ``nn.Transformer.generate_square_subsequent_mask``) passed to every layer."""

    def __init__(self, vocab: int = 48, d: int = 32, t: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 2, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(t))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.size(1)
        return self.head(self.encoder(self.emb(idx), mask=self.causal[:t, :t]))


def test_an_inf_mask_passed_in_is_no_fault_and_does_not_hide_weights_gone_nan() -> None:
    """The ``-inf`` mask is an input of every attention module: quiet while healthy; when
    an attention module's own weights are NaN (a corrupted checkpoint), its NaN output is
    its parameters, not the mask it was given."""
    torch.manual_seed(0)
    m = CausalEncoder()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    data = copy_task(48, 8, 16)
    poison = 30  # 0-based: the forward of step 31 runs with the NaN weight

    def loss(i: int) -> torch.Tensor:
        if i == poison:
            with torch.no_grad():
                m.encoder.layers[0].self_attn.in_proj_weight[3, 5] = float("nan")
        seq = data(i)
        return F.cross_entropy(m(seq[:, :-1]).flatten(0, 1), seq[:, 1:].flatten())

    run = train(m, opt, loss, 32, every=10)
    assert run.faults == []
    assert run.losses[poison - 1] < 0.9 * run.losses[0]
    a = run.first
    assert (a.kind, a.layer, a.cause, a.step) == (
        "nonfinite", "encoder.layers.0.self_attn", "parameters", poison + 1)
    assert f"since the update of step {poison}" in a.message


# -- class 4: nested tensors -------------------------------------------------------------------
class Encoder(nn.Module):
    """Features -> ``nn.TransformerEncoder`` with a key padding mask -> per-token classes."""

    def __init__(self, d_in: int = 8, d: int = 32) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d)
        layer = nn.TransformerEncoderLayer(d, 2, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
        self.head = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.proj(x), src_key_padding_mask=pad))


def test_transformer_encoder_eval_passes_keep_the_trace_and_a_later_nan_batch_is_named() -> None:
    """Evaluation under no_grad takes the fast path and hands hooks nested tensors: nothing
    is switched off, and a NaN batch after many such passes is still the input."""
    torch.manual_seed(0)
    m = Encoder()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 12, 8, generator=g)
    y = (x[..., 0] > 0).long() + 2 * (x[..., 1] > 0).long()
    pad = torch.zeros(16, 12, dtype=torch.bool)
    pad[:8, 9:] = True  # padded tokens at the end of half the sequences
    bad_step = 33  # 0-based: alerted as step 34, a light step of the second window
    nested: list[bool] = []
    m.encoder.layers[0].register_forward_hook(lambda mod, a, out: nested.append(out.is_nested))

    def loss(i: int) -> torch.Tensor:
        xb = x.clone()
        if i == bad_step:
            xb[3, 2, 5] = float("nan")
        return F.cross_entropy(m(xb, pad)[~pad], y[~pad])

    def evaluate(i: int) -> None:
        m.eval()
        with torch.no_grad():
            m(x, pad)
        m.train()

    run = train(m, opt, loss, 40, every=20, after=evaluate)
    assert any(nested)  # the fast path ran
    assert run.faults == []
    assert run.losses[bad_step - 1] < 0.8 * run.losses[0]
    a = run.first
    assert (a.kind, a.layer, a.cause, a.step) == ("nonfinite", "proj", "input", bad_step + 1)
    assert "data pipeline" in a.hint


def tiny_gpt2() -> torch.nn.Module:
    """Hugging Face GPT-2 from its config (2 layers, 32 wide, vocabulary 64), seed 0."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2,
                                  n_head=2)
    return transformers.GPT2LMHeadModel(cfg)


# -- class 3: per-step learning-rate evidence ---------------------------------------------------
def test_gpt2_at_sgd_lr_50_is_the_learning_rate_on_the_step_it_blows_up() -> None:
    m = tiny_gpt2()
    opt = torch.optim.SGD(m.parameters(), lr=50.0)
    data = copy_task(64, 4, 16)
    run = train(m, opt, lambda i: m(input_ids=data(i), labels=data(i)).loss, 10)
    a = run.first
    assert a.kind in ("exploding", "nonfinite") and a.cause == "learning_rate"
    assert a.step <= 8 and a.layer.startswith(("transformer.", "lm_head"))
    assert all(b.cause == "learning_rate" for b in run.alerts if b.step == a.step)
    assert "update_ratio" in a.hint and "lower the learning rate" in a.hint
    no_sqrt(a.hint)
    # the same model at a sound learning rate: quiet
    m = tiny_gpt2()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    healthy(train(m, opt, lambda i: m(input_ids=data(i), labels=data(i)).loss, 40))


def test_a_resnet_at_sgd_lr_50_is_the_learning_rate_on_the_step_it_blows_up() -> None:
    torch.manual_seed(0)
    m = ResNet()
    opt = torch.optim.SGD(m.parameters(), lr=50.0, momentum=0.9)
    data = images()

    def loss(i: int) -> torch.Tensor:
        x, y = data(i)
        return F.cross_entropy(m(x), y)

    run = train(m, opt, loss, 30)
    a = run.first
    assert a.kind in ("exploding", "nonfinite") and a.cause == "learning_rate", a
    assert a.step <= 20
    assert "update_ratio" in a.hint and "lower the learning rate" in a.hint
    no_sqrt(a.hint)
    # at lr 0.05: quiet
    torch.manual_seed(0)
    m = ResNet()
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    healthy(train(m, opt, loss, 40))


def test_a_backward_overflow_without_update_evidence_gets_an_overflow_hint() -> None:
    """Weights so large (a checkpoint loaded at the wrong scale) that the backward overflows
    to Inf at the first step: no update came before, so no learning-rate cause; and the hint
    speaks of values past the float range, not of sqrt or torch.where."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Linear(32, 1))
    with torch.no_grad():
        m[2].weight.mul_(1e19)
        m[3].weight.mul_(1e19)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    x = torch.randn(8, 16)
    run = train(m, opt, lambda i: m(x).pow(2).mean(), 2)
    a = run.first
    assert a.step == 1 and a.cause != "learning_rate"
    no_sqrt(a.hint)


# -- class 3: a NaN batch passed by keyword ------------------------------------------------------
def test_a_nan_batch_passed_as_inputs_embeds_to_gpt2_is_the_input() -> None:
    m = tiny_gpt2()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    data = copy_task(64, 4, 16)
    emb = torch.randn(64, 32)  # the user's own embedding table

    def loss(i: int) -> torch.Tensor:
        ids = data(i)
        e = emb[ids]
        if i == 6:
            e = e.clone()
            e[1, 3, 4] = float("nan")
        return m(inputs_embeds=e, labels=ids).loss

    run = train(m, opt, loss, 8)
    a = run.first
    assert (a.kind, a.layer, a.cause, a.step) == ("nonfinite", "transformer", "input", 7)
    assert "data pipeline" in a.hint


def test_a_nan_batch_passed_as_inputs_embeds_to_bert_is_the_input() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=32)
    m = transformers.BertForSequenceClassification(cfg)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    e = torch.randn(8, 12, 32, generator=g)
    att = torch.ones(8, 12, dtype=torch.long)
    att[:4, 9:] = 0  # padding
    y = (e[:, 0, 0] > 0).long()

    def loss(i: int) -> torch.Tensor:
        xb = e
        if i == 4:
            xb = e.clone()
            xb[2, 1, 0] = float("nan")
        return m(inputs_embeds=xb, attention_mask=att, labels=y).loss

    run = train(m, opt, loss, 6)
    a = run.first
    assert (a.kind, a.cause, a.step) == ("nonfinite", "input", 5)
    assert a.layer in ("bert", "bert.embeddings")


@pytest.mark.parametrize("by_keyword", [True, False])
def test_a_nan_batch_passed_as_pixel_values_is_the_input(by_keyword: bool) -> None:
    """The model normalizes its batch in its own forward before the stem: the NaN the stem
    receives was made from what the model received, keyword or positional."""
    data = images()
    torch.manual_seed(0)
    m = ResNet()
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)

    def loss(i: int) -> torch.Tensor:
        x, y = data(i)
        if i == 5:
            x = x.clone()
            x[2, 1, 3, 3] = float("nan")
        return F.cross_entropy(m(pixel_values=x) if by_keyword else m(x), y)

    run = train(m, opt, loss, 8)
    a = run.first
    assert (a.kind, a.layer, a.cause, a.step) == ("nonfinite", "(root)", "input", 6)
    assert "data pipeline" in a.hint


# -- class 3: the float16 story ------------------------------------------------------------------
class LogFeatures(nn.Module):
    """``log`` of features a ReLU made: ``log(0)`` is -inf in float32 (no overflow)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


def test_log_of_zero_in_float32_is_a_forward_op_not_an_overflow() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), LogFeatures(), nn.Linear(32, 4))
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    data = masked_head_data()
    run = train(m, opt, lambda i: F.cross_entropy(m(data(i)[0]), data(i)[1] % 4), 3)
    a = run.first
    assert (a.kind, a.layer, a.cause, a.step) == ("nonfinite", "2", "forward_op", 1)
    assert "log of 0" in a.message and "overflow" not in a.message
    assert "float16" not in a.hint and "log" in a.hint


class Fp16Attention(nn.Module):
    """Scores ``q @ k^T`` computed in this module's own forward (float16 under autocast),
    then a softmax and the output projection, a child: the module's output entry is its
    child's."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        return self.out(att @ v)


def test_a_float16_overflow_inside_a_module_whose_output_is_a_childs_gets_the_float16_hint(
) -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 32), Fp16Attention(), nn.Linear(32, 3))
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 10, 8, generator=g)
    y = torch.randint(0, 3, (4, 10), generator=g)

    def loss(i: int) -> torch.Tensor:
        scale = 300.0 if i == 2 else 1.0  # one batch at a scale float16 scores overflow
        with torch.autocast("cpu", dtype=torch.float16):
            out = m(scale * x)
        return F.cross_entropy(out.float().flatten(0, 1), y.flatten())

    run = train(m, opt, loss, 3)
    a = run.first
    assert (a.kind, a.layer, a.cause, a.step) == ("nonfinite", "1", "forward_op", 3)
    assert "float16" in a.message and "float16" in a.hint and "GradScaler" in a.hint
