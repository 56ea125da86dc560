"""The initialization audit at ``watch()``: weight scales against float64 references,
recurrent gains against a float64 SVD, normalization layers, and what it leaves alone."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn

import gradwatch
from gradwatch.audit import EXACT_SVD, audit, largest_singular_value
from gradwatch.selection import select


def run_audit(model: nn.Module):
    return audit(model, select(model, None, None))


def test_linear_and_conv_scales_match_float64() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Conv1d(4, 8, 3), nn.Conv2d(3, 8, 5))
    nn.init.normal_(m[0].weight, 0.0, 0.5)
    nn.init.constant_(m[0].bias, -3.0)
    a = run_audit(m)
    assert set(a.scales) == {"0", "2", "3"}
    for name, fan_in, fan_out in (("0", 64, 32), ("2", 12, 24), ("3", 75, 200)):
        w = m.get_submodule(name).weight.detach().double()
        s = a.scales[name]
        assert (s.fan_in, s.fan_out) == (fan_in, fan_out)
        assert s.std == pytest.approx(float(w.std(unbiased=False)), rel=1e-5)
    assert a.scales["0"].std == pytest.approx(0.5, rel=0.05)
    assert a.scales["0"].bias_mean == pytest.approx(-3.0)
    # the references: Glorot and He (fan-in, fan-out) for a gain
    glorot, he_in, he_out = a.scales["0"].reference(math.sqrt(2))
    assert glorot == pytest.approx(math.sqrt(2) * math.sqrt(2 / 96))
    assert (he_in, he_out) == (pytest.approx(math.sqrt(2) / 8), pytest.approx(math.sqrt(2 / 32)))
    assert a.gains_of == {"1": ("relu", pytest.approx(math.sqrt(2)))}


def test_lookups_transposed_convs_and_lazy_layers_are_not_judged() -> None:
    m = nn.Sequential(nn.Embedding(10, 8), nn.ConvTranspose1d(8, 8, 3), nn.LazyLinear(4),
                      nn.Linear(4, 4, bias=False))
    a = run_audit(m)
    assert set(a.scales) == {"3"} and a.scales["3"].bias_mean is None


@pytest.mark.parametrize("hidden", [16, EXACT_SVD + 64])  # a full SVD, a subspace iteration
def test_recurrent_gain_is_the_largest_singular_value_of_a_gate_block(hidden: int) -> None:
    torch.manual_seed(0)
    m = nn.LSTM(8, hidden, num_layers=2)
    with torch.no_grad():  # the forget gate of layer 1 is 2.5 x orthogonal
        nn.init.orthogonal_(m.weight_hh_l1[hidden:2 * hidden]).mul_(2.5)
    state = torch.get_rng_state()
    a = run_audit(m)
    assert torch.equal(torch.get_rng_state(), state)  # the user's random stream is untouched
    g = a.gains["(root)"]  # the model itself is the LSTM
    assert (g.param, g.gate) == ("weight_hh_l1", "forget")
    assert g.gain == pytest.approx(2.5, rel=1e-4)
    # every block against float64 singular values: exact, or a lower bound within 2%
    w = m.weight_hh_l0.detach()
    blocks = w.reshape(4, hidden, hidden)
    est = largest_singular_value(blocks)
    ref = torch.linalg.svdvals(blocks.double())[:, 0].float()
    assert torch.all(est <= ref * (1 + 1e-5)) and torch.all(est >= ref * 0.98)


def test_gru_and_bidirectional_rnn_gains() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.GRU(4, 8, bidirectional=True))
    with torch.no_grad():
        nn.init.orthogonal_(m[0].weight_hh_l0_reverse[16:24]).mul_(3.0)
    g = run_audit(m).gains["0"]
    assert (g.param, g.gate, round(g.gain, 4)) == ("weight_hh_l0_reverse", "new", 3.0)


def test_normalization_layers_that_cannot_be_placed_are_flagged() -> None:
    watched = run_audit(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU()))
    assert watched.norms == {"1"} and not watched.unseen_norms
    hidden = run_audit(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False)))
    assert hidden.norms == frozenset() and hidden.unseen_norms


class Unreadable(nn.Linear):
    """A layer whose ``weight`` attribute raises (stands for whatever an exotic layer
    does); its forward reads the parameter directly."""

    @property  # type: ignore[override]
    def weight(self) -> torch.Tensor:
        if self.__dict__.get("locked"):
            raise RuntimeError("weight is not readable")
        raise AttributeError("weight")  # while constructing: nn.Module's own lookup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self._parameters["weight"], self.bias)


def test_a_failing_audit_is_reported_once_and_the_watcher_works() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(Unreadable(4, 8), nn.ReLU(), nn.Linear(8, 1))
    m[0].locked = True
    with pytest.warns(gradwatch.GradwatchWarning, match="initialization audit") as rec:
        w = gradwatch.watch(m, tensorboard=False, every=1, on_alert="ignore",
                            thresholds={"patience": 1})
    assert len([r for r in rec if "audit" in str(r.message)]) == 1
    with torch.no_grad():
        m[0].bias.fill_(-100.0)  # ReLU '1' dead: an alert, without init evidence
    with warnings.catch_warnings():
        warnings.simplefilter("error", gradwatch.GradwatchWarning)
        for _ in range(2):
            m(torch.randn(4, 4)).sum().backward()
            w.step()
        w.close()
    dead = [a for a in w.alerts if a.kind == "dead"]
    # the window's own evidence still gives the cause; the init part is simply absent
    assert dead and dead[0].layer == "1" and dead[0].cause == "bias_shift"
    assert "mean -100" in dead[0].hint and "at watch()" not in dead[0].hint


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_weights_of_any_float_dtype(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 16), nn.GRU(16, 300)).to(dtype)
    nn.init.normal_(m[0].weight, 0.0, 0.25)
    a = run_audit(m)
    ref = float(m[0].weight.detach().double().std(unbiased=False))
    assert a.scales["0"].std == pytest.approx(ref, rel=1e-4)
    assert 0.5 < a.gains["1"].gain < 2.0  # the default uniform init: about 1.15
