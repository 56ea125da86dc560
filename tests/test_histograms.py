import io
import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gradwatch
from gradwatch.histograms import HALF, LO_EXP, NBINS, PER_DECADE, bin_counts, bucket_limits
from tests.support.flowlog import HOSTILE, train


def expected_index(x: float) -> int | None:
    if math.isnan(x):
        return None
    a = abs(x)
    if a < 10.0**LO_EXP:
        return HALF
    u = (math.log10(a) - LO_EXP) * PER_DECADE if math.isfinite(a) else math.inf
    k = HALF - 1 if u >= HALF else int(math.floor(u))
    return HALF + 1 + k if x > 0 else HALF - 1 - k


def test_bins_match_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    mags = 10.0 ** (torch.rand(4000, generator=g, dtype=torch.float64) * 22 - 14)
    signs = torch.where(torch.rand(4000, generator=g) < 0.5, -1.0, 1.0).double()
    x = torch.cat([mags * signs, torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan,
                                              1e9, -1e9], dtype=torch.float64)])
    want = np.zeros(NBINS)
    for v in x.tolist():
        i = expected_index(v)
        if i is not None:
            want[i] += 1
    got = bin_counts(x.float()).numpy()  # binned in fp32, as in training
    assert got.sum() == len(x) - 1  # NaN left out
    # fp32 rounding may move a value sitting on a bin edge to the neighbour bin
    assert np.abs(got - want).sum() <= 8
    assert got[HALF] == want[HALF] > 2  # zeros and |x| < 1e-12
    assert bin_counts(torch.zeros(5))[HALF] == 5
    assert got[0] == want[0] and got[-1] == want[-1]


def test_bucket_limits_bracket_their_values():
    lim = bucket_limits()
    assert len(lim) == NBINS and np.all(np.diff(lim) > 0)
    for v in [3e-7, -3e-7, 0.02, -45.0, 5e-12, 2e5]:
        i = expected_index(v)
        assert lim[i - 1] < v <= lim[i]


class NoSync(TorchDispatchMode):
    """Fails on every op that reads a device value on the host."""

    BANNED = ("_local_scalar_dense", "nonzero", "equal", "item")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        masked = name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ())
        if name in self.BANNED or masked:
            raise AssertionError(f"host sync inside the step: {func}")
        return func(*args, **(kwargs or {}))


def test_hooks_with_histograms_do_not_sync(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = gradwatch.watch(model, optimizer=opt, logdir=str(tmp_path), every=1000,
                        histograms=True, on_alert="ignore")
    for _ in range(3):
        with NoSync():
            loss = model(torch.randn(4, 8)).pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    counts = w._pictures.hist.buf[:, :, :NBINS].sum(-1)
    w.close()
    assert counts[0].tolist() == [3 * (8 * 16 + 16), 0, 3 * (16 * 2 + 2)]  # grads per step
    assert counts[1].tolist() == [3 * 4 * 16, 3 * 4 * 16, 3 * 4 * 2]  # outputs per step


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    return train(str(tmp_path_factory.mktemp("pics")), histograms=True, images=True)


def _accumulator(written):
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(f"{written.logdir}/{written.run}",
                              size_guidance={ea.HISTOGRAMS: 0, ea.IMAGES: 0})
    acc.Reload()
    return acc


def test_histograms_read_back_with_counts_of_every_element(pictures):
    acc = _accumulator(pictures)
    tags = set(acc.Tags()["histograms"])
    assert {"gradwatch/grad_hist/inp", "gradwatch/act_hist/act",
            f"gradwatch/act_hist/{HOSTILE}"} <= tags
    assert "gradwatch/grad_hist/act" not in tags  # a Tanh has no parameters
    windows = pictures.steps // pictures.every
    grads = acc.Histograms("gradwatch/grad_hist/inp")
    assert [h.step for h in grads] == [pictures.every * (i + 1) for i in range(windows)]
    # parameters of inp: 16x8 weight + 16 bias, every step of the window
    assert all(h.histogram_value.num == pictures.every * (16 * 8 + 16) for h in grads)
    act = acc.Histograms("gradwatch/act_hist/act")[-1].histogram_value
    assert act.num == pictures.every * 32 * 16
    assert -1.0 <= act.min < 0 < act.max <= 1.0  # tanh outputs
    assert act.bucket_limit[-1] >= act.max and sum(act.bucket) == act.num
    dead = acc.Histograms(f"gradwatch/act_hist/{HOSTILE}")[-1].histogram_value
    assert dead.min == dead.max == 0.0 and list(dead.bucket) == [dead.num]  # all zeros


def test_flow_image_every_few_flushes(pictures):
    from PIL import Image

    from gradwatch.plot import Flow, default_size

    acc = _accumulator(pictures)
    images = acc.Images("gradwatch/flow")
    # the first flush, then every 5th: windows 1 and 6 of 6
    assert [im.step for im in images] == [pictures.every, pictures.steps]
    png = Image.open(io.BytesIO(images[-1].encoded_image_string))
    flow = Flow("x", ["inp", "deep", "out"], [1], [[1.0], [1.0], [1.0]])
    assert png.size == default_size([flow]) == (images[-1].width, images[-1].height)
    assert len(np.unique(np.asarray(png.convert("RGB")).reshape(-1, 3), axis=0)) > 50


def test_images_without_matplotlib_name_the_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'gradwatch\[plot\]'"):
        gradwatch.watch(torch.nn.Linear(2, 2), logdir=str(tmp_path), images=True)
