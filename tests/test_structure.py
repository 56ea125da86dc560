"""Vanishing judged for the optimizer in use, linear maps recognised by what they are, and
the path audit on the model's real dataflow (parallel branches, residual sums), learned
once from the first training forward."""

from __future__ import annotations

import copy
import math

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
