"""Every model kind of the core issue trains while watched, with the right layers and stats,
and every hook is gone after close()."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn

import gradwatch
from tests.support.zoo import BasicBlock


def hook_counts(model: nn.Module) -> dict[str, int]:
    return {
        name: len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for name, m in model.named_modules()
    }


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(BasicBlock(), BasicBlock())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class DictOut(nn.Module):
    """Returns a dict, None and an int beside tensors."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 5)

    def forward(self, x):
        return {"y": self.a(x), "aux": None, "n": 3, "z": self.b(x).tanh()}


class DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = DictOut()
        self.head = nn.Linear(5, 1)

    def forward(self, x):
        d = self.body(x)
        return self.head(d["y"] + d["z"])


class GatedSplit(nn.Module):
    """Owns its weight and returns the two halves of one product (``chunk``: one autograd
    node, two outputs); the model below uses only the first, so at the second there is no
    gradient (None) while the first has one."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 8) / 6**0.5)

    def forward(self, x):
        return (x @ self.w).chunk(2, dim=-1)


class HalfUsed(nn.Module):
    def __init__(self):
        super().__init__()
        self.split = GatedSplit()
        self.act = nn.Tanh()
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        used, _unused = self.split(x)
        return self.head(self.act(used))


class Reused(nn.Module):
    """The same Linear called three times per step."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(6, 6)
        self.out = nn.Linear(6, 1)

    def forward(self, x):
        for _ in range(3):
            x = torch.tanh(self.shared(x))
        return self.out(x)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.proj = nn.Linear(8, 20, bias=False)
        self.proj.weight = self.emb.weight

    def forward(self, idx):
        return self.proj(self.emb(idx))


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 8, num_layers=2, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        out, (h, c) = self.lstm(x)
        return self.head(out[:, -1])


def frozen_mlp():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    for p in m[0].parameters():
        p.requires_grad_(False)
    return m


def transformer():
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.1, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                         nn.Linear(16, 1))


CASES = {
    "mlp": (lambda: nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2)),
            lambda: torch.randn(8, 4)),
    "resnet_inplace": (ResNet, lambda: torch.randn(2, 3, 8, 8)),
    "transformer": (transformer, lambda: torch.randn(2, 5, 16)),
    "lstm": (LSTMNet, lambda: torch.randn(3, 7, 4)),
    "dict_none_int": (DictModel, lambda: torch.randn(4, 5)),
    "called_thrice": (Reused, lambda: torch.randn(4, 6)),
    "half_used_outputs": (HalfUsed, lambda: torch.randn(4, 6)),
    "frozen": (frozen_mlp, lambda: torch.randn(8, 4)),
    "tied": (Tied, lambda: torch.randint(0, 20, (4, 3))),
    "no_params": (lambda: nn.Sequential(nn.ReLU(), nn.Tanh()), lambda: torch.randn(4, 3)),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_model_kind_trains_watched(kind):
    build, data = CASES[kind]
    model = build()
    before = hook_counts(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01) if params else None
    x0 = data()
    w = gradwatch.watch(model, optimizer=opt, tensorboard=False, every=3)
    warnings.simplefilter("error", gradwatch.GradwatchWarning)  # no part switched off
    for _ in range(6):
        x = data()
        if x.is_floating_point() and not params:
            x.requires_grad_(True)
        out = model(x)
        out.float().pow(2).mean().backward()
        if opt is not None:
            opt.step()
            opt.zero_grad()
        else:
            w.step()
    w.close()
    assert hook_counts(model) == before
    snap = w.latest
    assert snap is not None and snap.step == 6
    stats = snap.stats
    may_be_nan = NOT_COLLECTED.get(kind, {})
    for layer, st in stats.items():
        for stat, v in st.items():
            allowed = may_be_nan.get(layer, ())
            assert math.isnan(v) == (stat in allowed), (kind, layer, stat, v)
        assert st["nonfinite"] == 0
    check = CHECKS.get(kind)
    if check:
        check(stats, w)
    model(x0)  # still a working model after close


# NaN is right for these: not collected in the window
NOT_COLLECTED = {
    # MultiheadAttention uses out_proj's weight without calling the module
    "transformer": {f"0.layers.{i}.self_attn.out_proj": (
        "act_mean", "act_std", "act_max", "act_zero_frac", "out_grad_rms") for i in (0, 1)},
    # a frozen first layer on a plain input: its output needs no gradient
    "frozen": {"0": ("out_grad_rms",), "1": ("out_grad_rms",)},
}


def _resnet(stats, w):
    assert "blocks.0.relu" in stats and "blocks.0.conv1" in stats
    assert stats["blocks.0.conv1"]["grad_norm"] > 0
    # the in-place ReLU is called twice per step; both outputs are aggregated
    assert 0 < stats["blocks.0.relu"]["act_zero_frac"] < 1
    assert stats["blocks.0.relu"]["out_grad_rms"] > 0
    assert "bn1" not in w.layers[0]


def _transformer(stats, w):
    mha = "0.layers.0.self_attn"
    assert mha in stats and "0.layers.0.self_attn.out_proj" in stats
    # MultiheadAttention owns in_proj_weight beside its out_proj child
    assert stats[mha]["grad_norm"] > 0 and stats[mha]["weight_norm"] > 0
    assert stats[mha]["out_grad_rms"] > 0


def _lstm(stats, w):
    assert stats["lstm"]["grad_norm"] > 0 and stats["lstm"]["act_std"] > 0
    assert stats["lstm"]["out_grad_rms"] > 0


def _dict(stats, w):
    assert stats["body.a"]["out_grad_rms"] > 0 and stats["body.b"]["act_std"] > 0


def _thrice(stats, w):
    assert set(stats) == {"shared", "out"}


def _frozen(stats, w):
    assert "grad_norm" not in stats["0"] and stats["0"]["weight_norm"] > 0
    assert stats["2"]["grad_norm"] > 0


def _tied(stats, w):
    # the tied weight belongs to its first owner only
    assert "grad_norm" in stats["emb"] and "weight_norm" not in stats["proj"]
    assert stats["proj"]["out_grad_rms"] > 0


def _noparams(stats, w):
    assert set(stats) == {"0", "1"}
    assert all("grad_norm" not in s for s in stats.values())


def _half_used(stats, w):
    # measured from the used half's gradient (the other half has none, and is skipped)
    assert stats["split"]["out_grad_rms"] > 0 and stats["split"]["grad_norm"] > 0


CHECKS = {"half_used_outputs": _half_used, "resnet_inplace": _resnet,
          "transformer": _transformer, "lstm": _lstm, "dict_none_int": _dict,
          "called_thrice": _thrice, "frozen": _frozen, "tied": _tied, "no_params": _noparams}


def test_module_called_several_times_aggregates_calls():
    m = Reused()
    w = gradwatch.watch(m, tensorboard=False, every=1)
    x = torch.randn(4, 6)
    outs = []
    h = m.shared.register_forward_hook(lambda mod, a, o: outs.append(o.detach().double()))
    m(x).sum().backward()
    w.step()
    h.remove()
    w.close()
    allx = torch.cat([o.reshape(-1) for o in outs])
    st = w.latest.stats["shared"]
    assert len(outs) == 3
    assert st["act_mean"] == pytest.approx(allx.mean().item(), rel=1e-4)
    assert st["act_std"] == pytest.approx(allx.std().item(), rel=1e-4)


def test_hooks_removed_after_exception_in_with_block(tmp_path):
    model = ResNet()
    before = hook_counts(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(ZeroDivisionError):
        with gradwatch.watch(model, optimizer=opt, logdir=tmp_path, every=100) as w:
            for _ in range(3):
                model(torch.randn(2, 3, 8, 8)).sum().backward()
                opt.step()
                opt.zero_grad()
            raise ZeroDivisionError("the training loop failed")
    assert hook_counts(model) == before
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert w.latest is not None and w.latest.step == 3  # the partial window was flushed
