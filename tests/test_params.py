"""The parameter statistics of sampled steps (``params.ParamTracker``), against float64.

A sampled step reads each parameter as few times as it can: one pack of the gradients gives
their norms and max-abs, one pack of the update samples after the update gives the weight
norms of the parameters they cover whole and the update ratio's denominator, the difference
is taken in place in the copy made before the update, and the packs reuse buffers from one
step to the next. These tests hold every value to the float64 reference across windows
(the reused buffers), with frozen, large (sampled) and stacked parameters, and after a
parameter's storage is replaced mid-run.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

import gradwatch
from gradwatch.params import UPDATE_CHUNKS, UPDATE_SAMPLE
from gradwatch.stats import STACK_MIN
from tests.support.reference import Float64Reference, close


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(6, 16), nn.Tanh()]
    for _ in range(STACK_MIN + 1):  # same-shape small parameters: stacked on CPU
        layers += [nn.Linear(16, 16), nn.Tanh()]
    layers += [nn.Linear(16, 80), nn.Linear(80, 80), nn.ReLU(),  # 6,400 > UPDATE_SAMPLE
               nn.Linear(80, 16), nn.Linear(16, 3)]
    model = nn.Sequential(*layers)
    assert model[-4].weight.numel() > UPDATE_SAMPLE
    model[-2].requires_grad_(False)  # frozen: a weight norm, no gradient, no update
    return model


def _sampled_ratio(ref: Float64Reference, name: str, steps: list[int]) -> float:
    """The update ratio of a layer whose weight is measured on its documented sample:
    ``UPDATE_CHUNKS`` evenly spaced runs of ``UPDATE_SAMPLE`` elements in all, the bias
    whole; the window's mean over ``steps``, in float64."""
    out = []
    for k in steps:
        rec = ref.steps[k][name]
        d2 = w2 = 0.0
        for w0, w1 in zip(rec["w0"], rec["w1"]):
            a, b = w0.reshape(-1), w1.reshape(-1)
            n = a.numel()
            if n > UPDATE_SAMPLE:
                run, stride = UPDATE_SAMPLE // UPDATE_CHUNKS, n // UPDATE_CHUNKS
                sel = torch.cat([torch.arange(c * stride, c * stride + run)
                                 for c in range(UPDATE_CHUNKS)])
                a, b = a[sel], b[sel]
            d2 += float(((b - a) ** 2).sum())
            w2 += float((b ** 2).sum())
        out.append((d2 / w2) ** 0.5)
    return sum(out) / len(out)


def _check(got: dict, exp: dict, model: nn.Sequential, sampled_ratio: float) -> int:
    checked = 0
    big, frozen = str(len(model) - 4), str(len(model) - 2)
    for layer, want in exp.items():
        if not any(True for _ in model[int(layer)].parameters()):
            continue
        stats = ["weight_norm"]
        if layer != frozen:
            stats += ["grad_norm", "grad_rms", "grad_max"]
            if layer != big:  # a large weight's update ratio is measured on a sample
                stats.append("update_ratio")
        for stat in stats:
            assert close(got[layer][stat], want[stat], rel=1e-4), (layer, stat)
            checked += 1
    assert "grad_norm" not in got[frozen] and "update_ratio" not in got[frozen]
    # the large weight's update ratio, on its sample: the elements there now (a parameter
    # whose storage was replaced is sampled in its new storage)
    assert close(got[big]["update_ratio"], sampled_ratio, rel=1e-4)
    return checked + 1


def test_sampled_parameter_stats_match_float64_across_windows(kernels):
    model = _model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05,
                          momentum=0.9)
    names = {n: m for n, m in model.named_modules() if n}
    ref = Float64Reference(names, bounds={})
    w = gradwatch.watch(model, tensorboard=False, every=3, sample_every=1)
    snaps = []
    g = torch.Generator().manual_seed(1)
    for i in range(9):
        if i == 6:  # a new storage for the large weight: its sample follows it
            model[-4].weight.data = model[-4].weight.data.clone() * 2
        ref.train_step(model, opt, torch.randn(12, 6, generator=g))
        if i % 3 == 2:
            snaps.append(w.flush())
    w.close()
    assert [s.step for s in snaps] == [3, 6, 9]
    checked = 0
    for k, snap in enumerate(snaps):
        steps = [3 * k, 3 * k + 1, 3 * k + 2]
        big = str(len(model) - 4)
        checked += _check(snap.stats, ref.window(steps), model,
                          _sampled_ratio(ref, big, steps))
    trained = 1 + (STACK_MIN + 1) + 3  # Linear layers with a gradient
    # five stats each, the frozen layer's weight norm
    assert checked == 3 * (trained * 5 + 1)


def test_nonfinite_gradient_counted_on_a_sampled_step_from_the_same_pack(kernels):
    # the max-abs of the packed gradients flags an Inf gradient exactly (its norm would too,
    # but an L2 norm of finite values can overflow): the window counts the step non-finite
    model = _model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    w = gradwatch.watch(model, tensorboard=False, every=2, sample_every=1, on_alert="ignore")
    layer = model[4]  # a stacked one
    for i in range(2):
        loss = model(torch.randn(4, 6)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if i == 1:
            layer.weight.grad[0, 0] = float("inf")
        opt.step()
    snap = w.flush()
    w.close()
    assert snap.stats["4"]["nonfinite"] >= 1
    assert snap.stats["2"]["nonfinite"] == 0 and snap.stats["6"]["nonfinite"] == 0


def test_light_steps_reuse_one_kernel_output_and_a_nonfinite_step_keeps_its_own():
    # On CPU the C kernel writes a step's gradient norms into a vector made once and handed
    # back at the step's commit. The window values stay exact over the reuse, and a step
    # with a non-finite gradient keeps its vector: the next step does not write over what
    # was read of it.
    from gradwatch import cpukernels

    assert cpukernels.AVAILABLE, "gradwatch._kernels was not built"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    w = gradwatch.watch(model, tensorboard=False, every=4, sample_every=10**6,
                        on_alert="ignore")
    params = w._engine.params
    read = params.grad_stats
    outs: list = []

    def spy(*args, **kwargs):
        got = read(*args, **kwargs)
        outs.append(got.out)
        return got

    params.grad_stats = spy
    want: dict[str, list[float]] = {"0": [], "2": []}
    g = torch.Generator().manual_seed(1)
    snaps = []
    for i in range(7):
        loss = model(torch.randn(5, 6, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if i == 5:
            model[0].weight.grad[0, 0] = float("nan")
        for name in want:
            m = model[int(name)]
            want[name].append(math.sqrt(sum(float((p.grad.double() ** 2).sum())
                                            for p in m.parameters())))
        opt.step()
        if i == 3:
            snaps.append(w.flush())
    w.close()
    # steps 0 and 4 are sampled (another vector, the first of each window); the light
    # steps 1-3 and 5 share one
    assert outs[1] is outs[2] is outs[3] is outs[5] and outs[0] is not outs[1]
    assert outs[4] is outs[0]
    # the non-finite step 5 keeps its own: step 6 writes another, step 5's NaN stays
    assert outs[6] is not outs[5]
    assert math.isnan(outs[5].parts[0][0].item()) and math.isnan(outs[5].parts[1][0].item())
    for name, norms in want.items():
        numel = sum(p.numel() for p in model[int(name)].parameters())
        got = snaps[0].stats[name]
        assert close(got["grad_norm"], sum(norms[:4]) / 4, rel=1e-5), name
        assert close(got["grad_rms"], sum(norms[:4]) / 4 / math.sqrt(numel), rel=1e-5), name
