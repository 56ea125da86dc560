"""Vanishing judged for the optimizer in use, linear maps recognised by what they are, and
the path audit on the model's real dataflow (parallel branches, residual sums), learned
once from the first training forward."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gradwatch
from gradwatch.audit import audit, is_norm, linear_fans
from gradwatch.paths import excess
from gradwatch.rules import optimizer_family
from gradwatch.selection import select


# -- the optimizer's family ----------------------------------------------------------------------
class Lion(torch.optim.Optimizer):
    """A sign-based optimizer from outside torch (its groups carry ``betas``, no ``eps``)."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99)):  # type: ignore[no-untyped-def]
        super().__init__(params, {"lr": lr, "betas": betas})


class PlainDescent(torch.optim.Optimizer):
    def __init__(self, params, lr=0.1):  # type: ignore[no-untyped-def]
        super().__init__(params, {"lr": lr})


@pytest.mark.parametrize("make, family, eps", [
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "sgd", None),
    (lambda p: torch.optim.Adam(p, eps=1e-6), "adaptive", 1e-6),
    (lambda p: torch.optim.AdamW(p), "adaptive", 1e-8),
    (lambda p: torch.optim.RMSprop(p), "adaptive", 1e-8),
    (lambda p: torch.optim.Adagrad(p), "adaptive", 1e-10),
    (lambda p: Lion(p), "adaptive", 1e-8),
    (lambda p: PlainDescent(p), "sgd", None),
])
def test_optimizer_family(make, family: str, eps: float | None) -> None:  # type: ignore[no-untyped-def]
    fam, e = optimizer_family(make(nn.Linear(2, 2).parameters()))
    assert fam == family
    assert (math.isnan(e) if eps is None else e == pytest.approx(eps))
    assert optimizer_family(None)[0] == "sgd"  # no optimizer known: SGD-like


# -- vanishing per optimizer -----------------------------------------------------------------------
class LayerScaled(nn.Module):
    """A residual branch behind a per-channel gain (ConvNeXt's LayerScale); ``trainable``
    False: the gain is a constant, the branch's gradient stays that small for good."""

    def __init__(self, d: int, gain: float, trainable: bool = True) -> None:
        super().__init__()
        self.branch = nn.Linear(d, d)
        g = torch.full((d,), gain)
        if trainable:
            self.gamma = nn.Parameter(g)
        else:
            self.register_buffer("gamma", g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * torch.relu(self.branch(x))


def train_scaled(opt_name: str, gain: float, trainable: bool, steps: int = 40) -> list:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), LayerScaled(32, gain, trainable),
                          nn.Linear(32, 4))
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-3) if opt_name == "adamw"
           else torch.optim.SGD(model.parameters(), lr=0.05))
    w_true = torch.randn(16, 4)
    got: list = []
    with gradwatch.watch(model, optimizer=opt, tensorboard=False, every=10,
                         on_alert=got.append):
        for _ in range(steps):
            x = torch.randn(32, 16)
            loss = F.mse_loss(model(x), x @ w_true)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return got


def test_a_layerscale_branch_learns_under_adamw_and_is_not_vanishing() -> None:
    assert [(a.layer, a.kind) for a in train_scaled("adamw", 1e-6, True)] == []


def test_the_same_branch_under_sgd_is_vanishing_by_its_gradient() -> None:
    got = [a for a in train_scaled("sgd", 1e-6, False) if a.kind == "vanishing"]
    assert got and {a.layer for a in got} == {"1.branch"}
    assert got[0].stat == "grad_rms" and got[0].value < 1e-3 * 1e-2


def test_under_adamw_a_gradient_down_at_eps_stops_the_updates_and_is_vanishing() -> None:
    got = [a for a in train_scaled("adamw", 1e-12, False) if a.kind == "vanishing"]
    assert got and {a.layer for a in got} == {"1.branch"}
    a = got[0]
    assert a.stat == "grad_rms" and a.value < 1e-10 == a.threshold and a.step == 20


def test_under_adam_a_step_negligible_against_its_weights_is_vanishing() -> None:
    """Weights 1e4 times their init behind a LayerNorm: Adam moves each weight about ``lr``
    a step, nothing against their size; the update ratio says that layer has stalled."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 4))
    with torch.no_grad():
        model[0].weight.mul_(1e4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    got: list = []
    with gradwatch.watch(model, optimizer=opt, tensorboard=False, every=10,
                         on_alert=got.append):
        for _ in range(40):
            x = torch.randn(32, 16)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    van = [a for a in got if a.kind == "vanishing"]
    assert [(a.layer, a.stat) for a in van] == [("0", "update_ratio")]
    assert van[0].value < van[0].threshold < 1e-3 * 0.5


# -- linear maps by what they are ----------------------------------------------------------------
class WeightInOut(nn.Module):
    """A library's own linear map (weight stored in x out, as Hugging Face's Conv1D)."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.nx, self.nf = nx, nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class TwoMatrices(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))
        self.other = nn.Parameter(torch.randn(4, 4))


class MyRMSNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((d,), 3.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_linear_maps_embeddings_and_norm_scales_are_audited() -> None:
    torch.manual_seed(0)
    m = nn.ModuleDict({"emb": nn.Embedding(50, 16), "proj": WeightInOut(16, 48),
                       "norm": MyRMSNorm(48), "ln": nn.LayerNorm(48), "two": TwoMatrices()})
    nn.init.normal_(m["emb"].weight, 0.0, 3.0)
    a = audit(m, select(m, None, None))
    assert linear_fans(m["proj"], m["proj"].weight) == (16, 48)
    assert linear_fans(m["two"], m["two"].weight) is None
    assert set(a.scales) == {"proj"}
    assert (a.scales["proj"].fan_in, a.scales["proj"].fan_out) == (16, 48)
    assert a.scales["proj"].std == pytest.approx(
        float(m["proj"].weight.detach().double().std(unbiased=False)), rel=1e-5)
    assert a.embeddings["emb"] == pytest.approx(
        float(m["emb"].weight.detach().double().std(unbiased=False)), rel=1e-5)
    assert is_norm(m["norm"]) and not is_norm(m["proj"])
    assert a.norms == {"norm", "ln"}
    assert a.norm_scales == {"norm": pytest.approx(3.0), "ln": pytest.approx(1.0)}


def test_hugging_face_conv1d_is_a_linear_map() -> None:
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    net = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=8,
                                     vocab_size=16))
    a = audit(net, select(net, None, None))
    s = a.scales["transformer.h.0.attn.c_attn"]  # Conv1D: weight is 32 x 96
    assert (s.fan_in, s.fan_out) == (32, 96)
    assert s.std == pytest.approx(0.02, rel=0.1)
    assert {"transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj", "lm_head"} <= set(a.scales)
    assert set(a.embeddings) == {"transformer.wte", "transformer.wpe"}


# -- the path audit on the dataflow ----------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, d: int, std: float) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        for lin in (self.q, self.k, self.v, self.o):
            nn.init.normal_(lin.weight, 0.0, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = torch.softmax(self.q(x) @ self.k(x).transpose(-2, -1), dim=-1)
        return x + self.o(att @ self.v(x))  # a residual sum around the branch


def watched_attention(std: float) -> tuple[nn.Module, gradwatch.Watcher]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.LayerNorm(64), Attention(64, std),
                          nn.LayerNorm(64), nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    w = gradwatch.watch(model, optimizer=opt, tensorboard=False, every=2, on_alert="ignore")
    for _ in range(4):
        loss = model(torch.randn(3, 5, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, w


def test_parallel_projections_are_not_a_chain_and_a_residual_sum_keeps_the_signal() -> None:
    model, w = watched_attention(0.02)
    w.close()
    paths = w._parts.rules.diagnosis._paths
    assert paths.on_graph
    a = w._parts.rules.diagnosis.audit
    ex = {n: excess(a.scales[n], None) for n in ("2.q", "2.k", "2.v", "2.o")}
    assert all(e < 0.2 for e in ex.values())  # each of them well below the Glorot range
    s = paths.scales
    # q, k, v read the same normalized input: none of them is behind another
    for n in ("2.q", "2.k", "2.v"):
        assert s[n].growth == pytest.approx(ex[n])
    # the softmax resets the scores; the output projection follows the value path only
    assert s["2.o"].growth == pytest.approx(ex["2.v"] * ex["2.o"])
    chain = math.prod(ex.values())
    assert chain < 1e-3 < paths.path_product(s["2.q"])
    # the residual sum carries the normalized signal (scale 1) around the shrinking branch
    assert paths.norm_in["3"] == pytest.approx(1.0)
    assert paths.before("2.o") is None or paths.before("2.o") != "2.k"


def test_the_probe_runs_once_on_a_training_forward_and_leaves_no_hook_behind() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = [len(m._forward_hooks) for m in model]
    w = gradwatch.watch(model, optimizer=opt, tensorboard=False)
    a = w._parts.rules.diagnosis.audit
    with torch.no_grad():
        model(torch.randn(2, 4))  # an eval pass teaches nothing
    assert a.graph is None
    dup = copy.deepcopy(model)  # a copy's forward never writes into the watcher
    dup(torch.randn(2, 4)).sum().backward()
    assert a.graph is None
    hooks = [len(m._forward_hooks) for m in model]
    loss = model(torch.randn(2, 4)).sum()
    loss.backward()
    opt.step()
    assert a.graph is not None and {"0", "1", "2"} <= set(a.graph.owner.values())
    assert [len(m._forward_hooks) for m in model] == hooks  # the one-time hooks are gone
    w.close()
    assert [len(m._forward_hooks) for m in model] == before
    assert len(model._forward_hooks) == len(model._forward_pre_hooks) == 0


class Table(nn.Module):
    """A 2-D weight that is not a map: a learned table added to its input."""

    def __init__(self, t: int, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(t, d) * 5.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight


class Matrix(nn.Module):
    """A linear map that names no fans: ``x @ weight.T``."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) * 5.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


def test_a_weight_known_by_its_shape_alone_is_a_map_only_when_used_as_one() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), Table(5, 12), Matrix(12, 24), nn.Linear(24, 2))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with gradwatch.watch(model, optimizer=opt, tensorboard=False, every=2,
                         on_alert="ignore") as w:
        for _ in range(2):
            loss = model(torch.randn(3, 5, 6)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    a = w._parts.rules.diagnosis.audit
    assert a.by_shape == {"1", "2"} and {"1", "2"} <= set(a.scales)
    assert a.graph.dims["1"] == (12, 12) and a.graph.dims["2"] == (12, 24)
    paths = w._parts.rules.diagnosis._paths
    assert paths.on_graph and set(paths.scales) == {"0", "2", "3"}  # the table is no map
    assert paths.scales["2"].excess > 8  # std 5 against at most 5/3 x 1/sqrt(12)


def test_a_gradient_100x_the_median_is_exploding_under_sgd_not_under_adam() -> None:
    """The ratio-to-median rule is Glorot & Bengio's SGD reading too: under Adam a head
    whose gradient is 200x the median layer's still steps about ``lr``."""
    from gradwatch.rules import Rules, Thresholds
    from gradwatch.selection import describe

    model = nn.Sequential(*(nn.Linear(8, 8) for _ in range(5)))
    chosen = select(model, None, None)
    infos = [describe(n, m, list(m.parameters(recurse=False))) for n, m in chosen]

    class Driver:  # what the watcher's stepping hands the rules: the optimizer in use
        def __init__(self, opt: torch.optim.Optimizer) -> None:
            self.optimizer = opt

    stats = {str(i): {"grad_rms": 1e-3, "update_ratio": 1e-2} for i in range(4)}
    stats["4"] = {"grad_rms": 0.2, "update_ratio": 1e-2}
    found = {}
    for name, opt in (("sgd", torch.optim.SGD(model.parameters(), lr=0.1)),
                      ("adam", torch.optim.Adam(model.parameters()))):
        r = Rules(Thresholds(patience=1), infos, audit(model, chosen))
        r.optimizer_source = Driver(opt)
        alerts = [a for step in (10, 20) for a in r.evaluate(step, stats, list(stats), {})]
        found[name] = [(a.layer, a.kind, a.step) for a in alerts]
    assert found == {"sgd": [("4", "exploding", 20)], "adam": []}


# -- which modules' gradients the non-finite trace hooks ------------------------------------------
class Conv1DLike(nn.Module):
    """Hugging Face GPT-2's ``Conv1D``: a linear map written as ``addmm`` on a view."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.size()[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size)


class NewGELULike(nn.Module):
    """The tanh approximation of GELU, written out (``x ** 3``, ``tanh``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = math.sqrt(2.0 / math.pi)
        return 0.5 * x * (1.0 + torch.tanh(c * (x + 0.044715 * torch.pow(x, 3.0))))


class RMSNormLike(nn.Module):
    """T5/LLaMA's RMS norm: ``rsqrt`` of the mean square (its backward is Inf at 0)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Block(nn.Module):
    """A residual block whose own code is a sum and a scaling by a number."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = Conv1DLike(d, d)
        self.norm = RMSNormLike(d)
        self.act = NewGELULike()
        self.first = RMSNormLike(d)  # on the batch: no gradient goes through its rsqrt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(x)
        return x + self.act(self.norm(self.fc(x))) / 2.0


class Scaled(nn.Module):
    """Multiplies by what its parent set on it, not by an argument."""

    scale: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class Captures(nn.Module):
    """Hands its child a ``sqrt`` of its own through an attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Scaled()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inner.scale = torch.sqrt(x.abs() + 1.0)
        return self.inner(x)


class Op(nn.Module):
    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class Net(nn.Module):
    """A model of its own class: its root keeps its gradient hooks whatever its code."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.block = Block(d)
        self.captures = Captures()
        self.root = Op(lambda x: (x.abs() + 1.0).pow(0.5))
        self.div = Op(lambda x: x / (x.abs() + 1.0))
        self.cube = Op(lambda x: x.pow(3) / 4.0)
        self.head = Conv1DLike(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.captures(self.block(x))
        return self.head(self.cube(self.div(self.root(x))))


def hooked_after_one_step(model: nn.Module, **watch: Any) -> set[str]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with gradwatch.watch(model, optimizer=opt, tensorboard=False, **watch) as w:
        parts = w._parts
        F.mse_loss(model(torch.randn(4, 6)), torch.zeros(4, 2)).backward()
        opt.step()
        return {n for (n, _), h in zip(parts.mods, parts.hooked) if h}


def test_gradients_are_hooked_only_where_a_module_s_own_code_can_make_a_nan() -> None:
    torch.manual_seed(0)
    assert hooked_after_one_step(Net()) == {
        "(root)",  # the model's output: where a NaN made by the loss is seen
        "block.norm",  # rsqrt
        "captures",  # its sqrt, read by its child through an attribute
        "root",  # x ** 0.5
        "div",  # a division by a tensor
    }


@pytest.mark.filterwarnings("ignore:gradwatch. 0 training forward")
def test_without_a_training_forward_every_module_of_its_own_class_stays_hooked() -> None:
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with gradwatch.watch(model, optimizer=opt, tensorboard=False) as w:
        with torch.no_grad():
            model(torch.randn(4, 6))
        hooked = {n for (n, _), h in zip(w._parts.mods, w._parts.hooked) if h}
    assert hooked == {n or "(root)" for n, _ in model.named_modules()}


def test_hugging_face_gpt2_keeps_only_its_output_hooked() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97,
                                  n_positions=16, use_cache=False)
    model = transformers.GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 97, (2, 16))
    with gradwatch.watch(model, optimizer=opt, tensorboard=False) as w:
        before = {n for (n, _), h in zip(w._parts.mods, w._parts.hooked) if h}
        model(ids, labels=ids).loss.backward()
        opt.step()
        after = {n for (n, _), h in zip(w._parts.mods, w._parts.hooked) if h}
    # Conv1D, the attention, NewGELUActivation and the blocks were hooked as code unknown
    assert {"transformer.h.0.attn.c_attn", "transformer.h.1.mlp.act",
            "transformer.h.0.attn", "transformer.h.1"} <= before
    assert after == {"(root)"}


class SqrtWhere(nn.Module):
    """``where(x > 0, sqrt(x), 0)`` once ``bad`` is set: finite forward, NaN gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.bad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        safe = x if self.bad else x.clamp_min(1e-6)
        return torch.where(x > 0, safe.sqrt(), torch.zeros_like(x))


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = Conv1DLike(6, 8)
        self.act = NewGELULike()
        self.gate = SqrtWhere()
        self.head = Conv1DLike(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gate(self.act(self.fc(x))))


@pytest.mark.parametrize("fault", ["module", "loss"])
def test_a_backward_nan_on_a_light_step_is_still_named_where_it_was_born(fault: str) -> None:
    torch.manual_seed(0)
    model = Chain()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    got: list[gradwatch.Alert] = []
    with gradwatch.watch(model, optimizer=opt, tensorboard=False, every=10, sample_every=5,
                         on_alert=got.append) as w:
        for step in range(1, 24):
            model.gate.bad = step == 23 and fault == "module"
            out = model(torch.randn(8, 6))
            if step == 23 and fault == "loss":  # finite, but its gradient is NaN at 0
                loss = torch.where(out > 1e9, (out - 2e9).sqrt(), out).pow(2).mean()
            else:
                loss = F.mse_loss(out, torch.zeros(8, 2))
            opt.zero_grad()
            loss.backward()
            opt.step()
        hooked = {n for (n, _), h in zip(w._parts.mods, w._parts.hooked) if h}
    assert hooked == {"(root)", "gate"}
    nf = [(a.layer, a.step, a.cause) for a in got if a.kind == "nonfinite"]
    assert nf[:1] == [("gate" if fault == "module" else "(root)", 23, "backward_op")]
    if fault == "loss":
        assert "loss" in next(a for a in got if a.kind == "nonfinite").message


@pytest.mark.parametrize("private", [True, False])
def test_the_sequence_number_now_is_the_next_node_s(private: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from gradwatch import structure

    if not private:  # a torch without torch._C._autograd._get_sequence_nr
        monkeypatch.delattr(torch._C._autograd, "_get_sequence_nr", raising=False)
    x = torch.ones(3, requires_grad=True)
    now = structure._sequence_now()
    y = x * 2.0
    assert y.grad_fn is not None and y.grad_fn._sequence_nr() == now


class Switched(nn.Module):
    """A ReLU until ``on``; then ``where(x > 0, sqrt(x), 0)``, or, with ``same_end``, a
    ``sqrt`` before the same last op as before (``* 2``)."""

    def __init__(self, same_end: bool) -> None:
        super().__init__()
        self.on, self.same_end = False, same_end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same_end:
            return (torch.where(x > 0, x.sqrt(), 0) if self.on else x) * 2.0
        return torch.where(x > 0, x.sqrt(), 0) if self.on else torch.relu(x)


@pytest.mark.parametrize("same_end", [False, True])
def test_a_module_whose_code_takes_another_path_later_is_hooked_again(same_end: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), Switched(same_end), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    got: list[gradwatch.Alert] = []
    with gradwatch.watch(model, optimizer=opt, tensorboard=False, every=10,
                         on_alert=got.append) as w:
        hooked = []
        for step in range(1, 16):
            model[1].on = step >= 14
            loss = F.mse_loss(model(torch.randn(8, 6)), torch.zeros(8, 2))
            opt.zero_grad()
            loss.backward()
            opt.step()
            hooked.append(w._parts.hooked[2])  # "1" (mods: root, "0", "1", "2")
    assert [m for m, _ in w._parts.mods] == ["(root)", "0", "1", "2"]
    assert hooked == [False] * 13 + [True] * 2  # learned in the first forward
    nf = [(a.layer, a.step, a.cause) for a in got if a.kind == "nonfinite"]
    assert nf[:1] == [("1", 14, "backward_op")]
