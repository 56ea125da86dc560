"""The core contract: stats against float64, TensorBoard round trip, observe-only hooks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import gradwatch
from tests.support.events import event_files, scalars
from tests.support.reference import Float64Reference, close, small_mlp


def test_small_outputs_stacked_in_kept_buffers_match_float64_when_batch_size_changes(kernels):
    """Small outputs of one shape are reduced stacked, in buffers kept from one sampled step
    to the next: steps whose batch size changes (new shapes, then the old ones again) and a
    model of many same-shape layers still give every value of a float64 reference."""
    torch.manual_seed(3)
    model = nn.Sequential(*[m for _ in range(5) for m in (nn.Linear(16, 16), nn.Tanh())],
                          nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    names = {n: m for n, m in model.named_modules() if n}
    bounds = {n: (-1.0, 1.0) for n, m in names.items() if isinstance(m, nn.Tanh)}
    ref = Float64Reference(names, bounds=bounds)
    w = gradwatch.watch(model, optimizer=opt, tensorboard=False, every=1, sample_every=1)
    for k, batch in enumerate([32, 32, 8, 32, 64]):
        ref.train_step(model, opt, torch.randn(batch, 16) * (1 + 3 * (k % 2)))
        snap = w.flush()
        exp = ref.window([k])
        for layer, expected in exp.items():
            for stat, want in expected.items():
                assert close(snap.stats[layer][stat], want), (k, layer, stat, want)
            assert snap.stats[layer]["nonfinite"] == 0
        assert snap.stats["10"]["act_zero_frac"] > 0.2  # the ReLU's zeros are counted
        assert snap.stats["1"]["act_sat_frac"] > 0 or k % 2 == 0  # x4: saturated units
    w.close()
@pytest.mark.parametrize("sample_every", [1, 3])
def test_every_stat_matches_float64_reference(sample_every, kernels):
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    names = {n: m for n, m in model.named_modules() if n}
    ref = Float64Reference(names, bounds={"1": (-1.0, 1.0)})
    steps = 9
    w = gradwatch.watch(model, optimizer=opt, tensorboard=False, every=steps,
                        sample_every=sample_every)
    for _ in range(steps):
        ref.train_step(model, opt, torch.randn(32, 6) * 2)
    w.close()  # the auto-flush at step 9 is processed on the worker; close joins it
    snap = w.latest
    assert snap is not None and snap.step == steps
    sampled = [k for k in range(steps) if k % sample_every == 0]
    every_step = list(range(steps))
    exp_sampled = ref.window(sampled)
    exp_all = ref.window(every_step)
    checked = 0
    for layer, expected in exp_sampled.items():
        got = snap.stats[layer]
        for stat, want in expected.items():
            # parameter-gradient norms are taken on every step, the rest on sampled steps
            if stat in ("grad_norm", "grad_rms"):
                want = exp_all[layer][stat]
            assert close(got[stat], want), (layer, stat, got[stat], want)
            checked += 1
        assert got["nonfinite"] == 0
    # every stat of API.md was compared for at least one layer
    assert checked == 3 * 10 + 6 + 5  # Linear x3, Tanh (with act_sat_frac), ReLU
    assert set(snap.stats["0"]) == {
        "grad_norm", "grad_rms", "grad_max", "weight_norm", "update_ratio", "act_mean",
        "act_std", "act_max", "act_zero_frac", "out_grad_rms", "nonfinite"}
    assert "act_sat_frac" in snap.stats["1"] and "grad_norm" not in snap.stats["1"]
    assert snap.stats["3"]["act_zero_frac"] > 0.2  # a ReLU's real sparsity


def test_watcher_step_without_optimizer_and_windows():
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    names = {n: m for n, m in model.named_modules() if n}
    ref = Float64Reference(names, bounds={"1": (-1.0, 1.0)})
    w = gradwatch.watch(model, tensorboard=False, every=4)
    snaps = []
    for i in range(8):
        ref.train_step(model, opt, torch.randn(16, 6))
        w.step()
        if i == 3:
            snaps.append(w.flush())
    snaps.append(w.flush())
    w.close()
    assert [s.step for s in snaps] == [4, 8]
    exp = ref.window([4, 5, 6, 7])
    got = snaps[1].stats
    assert close(got["2"]["grad_norm"], exp["2"]["grad_norm"])
    assert close(got["2"]["act_std"], exp["2"]["act_std"])
    # the loop steps a torch optimizer: found without optimizer=, its update ratios measured
    assert close(got["2"]["update_ratio"], exp["2"]["update_ratio"])
    # weight norm without an optimizer is read at step(): after the update here
    assert close(got["0"]["weight_norm"], exp["0"]["weight_norm"])


def test_tensorboard_round_trip(tmp_path):
    model = small_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    snaps = []
    with gradwatch.watch(model, optimizer=opt, logdir=tmp_path, every=5) as w:
        for _ in range(15):
            loss = model(torch.randn(8, 6)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if w.latest is not None and (not snaps or snaps[-1] is not w.latest):
                snaps.append(w.latest)
        w.flush()
    assert len(event_files(tmp_path)) == 1
    tb = scalars(tmp_path)
    final = w.latest
    assert final is not None and final.step == 15
    expected_tags = {f"gradwatch/{s}/{layer}" for layer, st in final.stats.items()
                     for s, v in st.items() if not math.isnan(v)}
    got_tags = {t for t in tb if t.startswith("gradwatch/") and "alert" not in t
                and t != "gradwatch/amp_skipped"}
    assert got_tags == expected_tags
    for tag in expected_tags:
        assert sorted(tb[tag]) == [5, 10, 15], tag
        _, stat, layer = tag.split("/", 2)
        assert tb[tag][15] == pytest.approx(final.stats[layer][stat], rel=1e-6), tag


def test_custom_scalars_layout_written_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    model = small_mlp()
    with gradwatch.watch(model, logdir=tmp_path, every=2) as w:
        for _ in range(6):
            model(torch.randn(4, 6)).sum().backward()
            w.step()
    acc = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    acc.Reload()
    events = acc.Tensors(metadata.CONFIG_SUMMARY_TAG)
    assert len(events) == 1
    lay = layout_pb2.Layout()
    lay.ParseFromString(events[0].tensor_proto.string_val[0])
    (cat,) = lay.category
    assert cat.title == "gradwatch"
    titles = [c.title for c in cat.chart]
    for stat in ("grad_norm", "grad_rms", "act_mean", "out_grad_rms", "nonfinite"):
        assert stat in titles
    chart = next(c for c in cat.chart if c.title == "grad_rms")
    assert list(chart.multiline.tag) == ["^gradwatch/grad_rms/"]


def _train(model, steps, watch_kwargs=None, seed=1):
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    w = gradwatch.watch(model, optimizer=opt, **watch_kwargs) if watch_kwargs is not None else None
    outs, grads = [], []
    for _ in range(steps):
        x = torch.randn(8, 6)
        y = model(x)
        y.pow(2).mean().backward()
        outs.append(y.detach().clone())
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
        opt.zero_grad()
    if w is not None:
        w.close()
    return outs, grads


def test_outputs_and_gradients_bit_identical():
    torch.manual_seed(3)
    m1 = small_mlp()
    m2 = small_mlp()
    m2.load_state_dict(m1.state_dict())
    o1, g1 = _train(m1, 12)
    o2, g2 = _train(m2, 12, dict(tensorboard=False, every=4, sample_every=1))
    for a, b in zip(o1, o2):
        assert torch.equal(a, b)
    for ga, gb in zip(g1, g2):
        for a, b in zip(ga, gb):
            assert torch.equal(a, b)


def test_layers_in_forward_order():
    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            self.late = nn.Linear(4, 2)
            self.early = nn.Linear(3, 4)

        def forward(self, x):
            return self.late(self.early(x))

    m = Reversed()
    w = gradwatch.watch(m, tensorboard=False)
    assert set(w.layers) == {"late", "early"}
    m(torch.randn(2, 3)).sum().backward()
    w.step()
    assert w.layers == ["early", "late"]
    w.close()
