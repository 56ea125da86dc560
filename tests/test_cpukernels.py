"""The C kernels of the CPU sampled statistics (``gradwatch.cpukernels``) against the
PyTorch ops they replace and against float64: maxima, minima and counts equal, sums as
close to float64 as the ops'; NaN and Inf handed back to the ops; tensors they do not take
refused."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradwatch import cpukernels as K
from gradwatch import stats as S
from gradwatch.buffers import STAGE_COLS

pytestmark = pytest.mark.skipif(not K.AVAILABLE, reason="gradwatch._kernels not built")

MARGIN = 0.02


def test_built_here_from_the_current_source() -> None:
    # CI builds the package from a clean clone: the kernels must be there, not silently
    # replaced by the ops; and built from the C source as it is (the extension is
    # optional: a failed rebuild would leave the last one in place)
    assert K.AVAILABLE
    built = Path(K._kernels.__file__)
    source = Path(K.__file__).with_name("_kernels.c")
    assert built.stat().st_mtime >= source.stat().st_mtime, "rebuild: pip install -e ."


def ops_row(t: torch.Tensor, bounds: tuple[float, float] | None) -> list[float]:
    """The row the hooks log from the PyTorch ops (``hooks.Collector._stats``)."""
    s1, hi, lo, s2, nnz, nf, sat = S.activation_parts(t, bounds, MARGIN, None)
    if bounds is not None:
        stuck, units = S.stuck_units(t, bounds, MARGIN).item(), float(S.units_of(t))
    else:
        stuck = units = 0.0
    return [float(t.numel()), s1.item(), s2.item(), nnz.item(), nf.item(), sat.item(),
            stuck, units, hi.item(), lo.item()]


def kernel_row(t: torch.Tensor, bounds: tuple[float, float] | None) -> list[float] | None:
    """The kernel's call added into a stage row, given as the ops' row: max |x| (the
    stage's max column) in place of max and min."""
    row = torch.zeros(STAGE_COLS)
    row[8] = 0.25  # a max from an earlier call of the layer
    kind = K.kind_of(t)
    assert kind >= 0
    units = t.numel() // t.shape[0] if t.dim() >= 2 else t.numel()
    if not K.act_row(t, kind, units, bounds, MARGIN, row.data_ptr()):
        assert row.tolist() == [0.0] * 8 + [0.25] + [0.0] * 3  # untouched
        return None
    assert row[9:].tolist() == [0.0, 0.0, 0.0]  # the gradient columns are not its
    return row[:9].tolist()


def check_row(t: torch.Tensor, bounds: tuple[float, float] | None) -> None:
    got = kernel_row(t, bounds)
    assert got is not None
    want = ops_row(t, bounds)
    # counts: equal; max |x|: equal, maxed with the row's earlier 0.25
    for k in (0, 3, 4, 5, 6, 7):
        assert got[k] == want[k], (k, got, want)
    assert got[8] == max(0.25, want[8], -want[9])
    # sums: at least as close to float64 as the ops' fp32 sums (plus one rounding)
    x = t.double()
    for k, ref in ((1, x.sum().item()), (2, (x * x).sum().item())):
        scale = x.abs().sum().item() if k == 1 else ref
        tol = 1e-6 * max(scale, 1e-30) + 1e-30
        assert abs(got[k] - ref) <= max(tol, 2 * abs(want[k] - ref)), (k, got[k], want[k], ref)


def test_output_gradient_adds_into_its_stage_columns() -> None:
    cols = torch.tensor([3.0, 1.5, 0.0])  # an earlier call of the layer
    g = torch.randn(7, 33)
    assert K.sq_row(g, 0, cols.data_ptr())
    want = (g.double() ** 2).sum().item()
    assert cols[0] == 3 + 231 and abs(cols[1].item() - (1.5 + want)) <= 1e-6 * want
    assert cols[2] == 0
    g[2, 2] = math.nan
    assert K.sq_row(g.bfloat16(), 1, cols.data_ptr())
    assert cols[0] == 3 + 2 * 231 and math.isnan(cols[1]) and cols[2] == 1


@pytest.mark.parametrize("shape", [(32, 640), (32, 64), (7, 13), (1000,), (4, 3, 5, 5),
                                   (1, 17), (33,), (3, 1)])
@pytest.mark.parametrize("bounds", [None, (-1.0, 1.0), (0.0, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_row_matches_the_ops(shape: tuple[int, ...], bounds: tuple[float, float]
                                        | None, dtype: torch.dtype) -> None:
    x = torch.randn(shape)
    if bounds is not None:
        x = torch.tanh(3 * x) if bounds[0] < 0 else torch.sigmoid(3 * x)
    flat = x.view(-1)
    flat[: flat.numel() // 5] = 0.0  # zeros to count
    if x.dim() >= 2 and bounds is not None:
        x[:, 0] = bounds[1]  # a unit stuck at the upper bound for the whole batch
    check_row(x.to(dtype), bounds)


@settings(max_examples=150, deadline=None)
@given(rows=st.integers(1, 40), units=st.integers(1, 70),
       values=st.sampled_from(["normal", "tanh", "relu", "tiny", "huge"]),
       bounded=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_activation_row_matches_the_ops_on_any_shape(rows: int, units: int, values: str,
                                                     bounded: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, units, generator=g)
    x = {"normal": x, "tanh": torch.tanh(4 * x), "relu": torch.relu(x),
         "tiny": x * 1e-30, "huge": x * 1e15}[values]
    check_row(x, (-1.0, 1.0) if bounded else None)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 3e19])
def test_nan_inf_and_overflow_go_to_the_ops(bad: float) -> None:
    # the ops' NaN semantics are the reference: the kernel writes no row and says so
    for bounds in (None, (-1.0, 1.0)):
        x = torch.randn(16, 40)
        x[5, 7] = bad
        assert kernel_row(x, bounds) is None


def test_tensors_the_kernels_do_not_take() -> None:
    x = torch.randn(8, 6)
    assert K.kind_of(x) == 0 and K.kind_of(x.bfloat16()) == 1
    assert K.kind_of(x.t()) == -1  # strided
    assert K.kind_of(x.double()) == -1 and K.kind_of(x.half()) == -1
    assert K.kind_of(torch.nn.Parameter(x)) == 0  # a parameter's memory is its values

    class Sub(torch.Tensor):
        pass

    assert K.kind_of(x.as_subclass(Sub)) == -1  # other subclasses keep the ops
    assert K.kind_of(x.to_sparse()) == -1
    assert K.kind_of(torch.empty(3, device="meta")) == -1


def layer_norms(ts: list[torch.Tensor], layers: list[int], L: int, with_max: bool,
                kind: int = 0, empty: float = 0.0) -> list[torch.Tensor] | None:
    out = torch.full((len(ts) + (4 if with_max else 2) * L,), 7.0)
    total = K.layer_norms(ts, kind, [t.numel() for t in ts], layers, L, with_max, out,
                          empty)
    if total is None:
        return None
    parts = list(out.split([len(ts), L, L] + ([L, L] if with_max else [])))
    want = parts[0].double().sum().item()  # the sum of the norms, on the host
    assert total == want or (math.isnan(total) and math.isnan(want)) or abs(
        total - want) <= 1e-6 * abs(want)
    return parts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_max", [True, False])
@pytest.mark.parametrize("empty", [0.0, math.nan])  # gradients' and weight norms' value
def test_layer_norms_match_float64(dtype: torch.dtype, with_max: bool, empty: float) -> None:
    shapes = [(64, 64), (64,), (3,), (17, 5), (512, 512), (1,), (1000, 3)]
    ts = [torch.randn(s).to(dtype) * (k + 1) for k, s in enumerate(shapes)]
    layers = [0, 0, 2, 3, 3, 3, 1]  # layer 4 has no tensor
    L = 5
    kind = K.list_kind(ts)
    assert kind == K.kind_of(ts[0])
    got = layer_norms(ts, layers, L, with_max, kind, empty)
    assert got is not None
    for k, t in enumerate(ts):
        ref = t.double().norm().item()
        assert abs(got[0][k].item() - ref) <= 1e-6 * ref
    for layer in range(L):
        mine = [t.double() for t, i in zip(ts, layers) if i == layer]
        if not mine:  # a layer without a tensor: its norm and RMS are the value given
            assert got[1][layer].item() == pytest.approx(empty, nan_ok=True)
            assert got[2][layer].item() == pytest.approx(empty, nan_ok=True)
            if with_max:
                assert got[3][layer].item() == 0.0 and got[4][layer].item() == 0.0
            continue
        sq = sum((t * t).sum().item() for t in mine)
        n = sum(t.numel() for t in mine)
        assert abs(got[1][layer].item() - math.sqrt(sq)) <= 1e-6 * math.sqrt(sq)
        rms = math.sqrt(sq / max(n, 1))
        assert abs(got[2][layer].item() - rms) <= 1e-6 * rms
        if with_max:
            want = max((t.abs().max().item() for t in mine), default=0.0)
            assert got[3][layer].item() == want  # exact: a max of the stored values
            assert got[4][layer].item() == 0.0


def test_layer_norms_nan_inf_and_what_they_refuse() -> None:
    a, b, c, d = torch.randn(100), torch.randn(50), torch.randn(9), torch.randn(30)
    a[3], b[49], c[0] = math.nan, math.inf, -math.inf
    got = layer_norms([a, b, c, d], [0, 1, 1, 2], 3, True)
    assert got is not None
    norms, lnorm, lrms, lmax, lnf = got
    assert math.isnan(norms[0]) and norms[1] == math.inf and norms[2] == math.inf
    assert math.isnan(lnorm[0]) and math.isnan(lmax[0])  # as torch's amax gives NaN
    assert lnorm[1] == math.inf and lmax[1] == math.inf
    assert lnf.tolist() == [1.0, 2.0, 0.0]
    assert math.isfinite(lrms[2]) and lmax[2].item() == d.abs().max().item()
    # finite values whose squares overflow fp32: the norm is still the true one
    big = torch.full((4,), 1e20)
    got = layer_norms([big], [0], 1, False)
    assert got is not None and abs(got[1][0].item() - 2e20) <= 2e20 * 1e-6
    # element type or layout changed since the list's kind was found: the ops take it
    assert layer_norms([a.double()], [0], 1, True) is None
    assert layer_norms([torch.randn(4, 5).t()], [0], 1, True) is None
    # a tensor of another size than the list was laid out with (a parameter whose .data
    # was replaced): not read past its end
    assert K.layer_norms([a], 0, [101], [0], 1, True, torch.empty(5)) is None
    with pytest.raises(ValueError, match="out: 4 elements for 1 tensors"):
        K.layer_norms([a], 0, [100], [0], 1, True, torch.empty(4))
    assert K.list_kind([a, a.double()]) == -1 and K.list_kind([a, torch.empty(0)]) == -1


def test_add_columns_is_index_add_of_the_stack() -> None:
    dst = torch.randn(6, 9)
    want = dst.clone()
    srcs = [torch.randn(6) for _ in range(3)]
    cols = (4, 0, 8)
    want.index_add_(1, torch.tensor(cols), torch.stack(srcs, 1))
    assert K.add_columns(dst, cols, srcs)
    assert torch.equal(dst, want)
    # what it does not take: nothing added
    for bad in ([srcs[0].double()], [torch.randn(12)[::2]], [torch.randn(5)]):
        assert not K.add_columns(dst, (1,), bad)
    assert torch.equal(dst, want)


def test_update_views_snapshot_and_ratios_against_float64() -> None:
    # whole small parameters, and large ones read as 8 runs of 512 (params._Weights.views)
    ps = [torch.randn(64, 64), torch.randn(64), torch.randn(600, 40), torch.randn(3)]
    layers = [0, 0, 1, 3]  # layer 2 has none
    v = K.UpdateViews(ps, layers, 0, 4096, 8)
    assert v.snapshot()
    before = [p.double().clone() for p in ps]
    for k, p in enumerate(ps):
        p.add_(torch.randn_like(p) * 10.0 ** -(k + 1))
    got = v.ratios(4)
    assert got is not None

    def sampled(t: torch.Tensor) -> torch.Tensor:
        flat = t.reshape(-1)
        n = flat.numel()
        if n <= 4096:
            return flat
        return torch.cat([flat[r * (n // 8): r * (n // 8) + 512] for r in range(8)])

    for layer in range(4):
        idx = [k for k, i in enumerate(layers) if i == layer]
        d = sum((sampled(ps[k].double()) - sampled(before[k])).pow(2).sum().item() for k in idx)
        a = sum(sampled(ps[k].double()).pow(2).sum().item() for k in idx)
        if not idx:
            assert math.isnan(got[layer])
        else:
            want = math.sqrt(d) / math.sqrt(a)
            assert abs(got[layer].item() - want) <= 1e-5 * want
    # a parameter replaced by one of another size or kind: nothing read
    ps[1].data = torch.randn(65)
    assert v.ratios(4) is None and not v.snapshot()
    ps[1].data = torch.randn(64).double()
    assert v.ratios(4) is None


def _commit_both(stage: torch.Tensor, params: object, weights: torch.Tensor | None,
                 updates: torch.Tensor | None, sampled: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One step committed by the C call and by the ops, from the same stage and window."""
    from gradwatch.buffers import W, WindowBuffers

    out = []
    window = torch.randn(stage.shape[0], 22, generator=torch.Generator().manual_seed(1)).abs()
    # the one column several values add into holds counts, which any order adds exactly
    window[:, W["nonfinite"]] = window[:, W["nonfinite"]].mul(10).round()
    for in_place in (True, False):
        buf = WindowBuffers(stage.shape[0], torch.device("cpu"))
        buf.rows_in_place = in_place  # False: the ops' path (CUDA, no C compiler)
        buf.stage.copy_(stage)
        buf.window.copy_(window)
        buf._direct = True  # the kernels staged this step
        buf.commit_step(params, weights, updates, sampled)  # type: ignore[arg-type]
        assert not buf.stage.any()
        out.append(buf.window)
    return out[0], out[1]


@settings(max_examples=120, deadline=None)
@given(layers=st.integers(1, 12), seed=st.integers(0, 2**31 - 1),
       odd=st.sampled_from([0.0, math.nan, math.inf, -math.inf]),
       sampled=st.booleans(), parts=st.sampled_from(["none", "grads", "all"]))
def test_commit_kernel_is_the_ops_commit(layers: int, seed: int, odd: float, sampled: bool,
                                         parts: str) -> None:
    from gradwatch.buffers import (
        ST_GN,
        ST_GNF,
        ST_MAX,
        ST_N,
        ST_NF,
        ST_NNZ,
        ST_SAT,
        ST_STUCK,
        ST_UNITS,
        ParamStepStats,
        W,
    )

    g = torch.Generator().manual_seed(seed)
    st_ = torch.randn(layers, STAGE_COLS, generator=g) * 10
    counts = torch.randint(0, 50, (layers, STAGE_COLS), generator=g).float()
    for c in (ST_N, ST_NNZ, ST_NF, ST_SAT, ST_STUCK, ST_UNITS, ST_GN, ST_GNF):
        st_[:, c] = counts[:, c]
    st_[0, ST_N] = 0.0  # a layer not called this step
    st_[:, ST_MAX] = st_[:, ST_MAX].abs()
    st_[-1, 1 + seed % 3] = odd  # a sum (Σx, Σx² or nonzeros) holds a NaN/Inf
    params = weights = updates = None
    if parts != "none":
        v = [torch.rand(layers, generator=g) for _ in range(4)]
        v[1][0] = odd
        present = (torch.rand(layers, generator=g) > 0.3).float()
        params = ParamStepStats(v[0], v[1], v[2] if sampled else None, present,
                                counts[:, 0].clone())
    if parts == "all":
        weights = torch.rand(layers, generator=g)
        updates = torch.rand(layers, generator=g)
        weights[layers // 2] = math.nan  # not measured for this layer
        updates[0] = math.nan
    c_win, ops_win = _commit_both(st_, params, weights, updates, sampled)
    assert torch.equal(c_win.isnan(), ops_win.isnan())
    c_win, ops_win = c_win.nan_to_num(), ops_win.nan_to_num()
    # the two square roots: the kernel's is correctly rounded, torch's vectorised fp32
    # sqrt is 1 ulp off for about 1 value in 160; bit for bit everywhere else
    roots = [W["act_std"], W["out_grad_rms"]]
    torch.testing.assert_close(c_win[:, roots], ops_win[:, roots], rtol=2.5e-7, atol=0)
    c_win[:, roots] = ops_win[:, roots]
    assert torch.equal(c_win, ops_win)


def test_commit_refuses_what_it_does_not_take() -> None:
    dst = torch.zeros(4, 22)
    vec = torch.ones(4)
    for bad in (vec.double(), torch.ones(8)[::2].double(), torch.ones(5), torch.ones(4, 1)):
        assert not K.commit(dst, [(K.ADD, 0, vec), (K.ADD, 0, bad)], (), None, ())
    assert not dst.any()
    with pytest.raises(ValueError):  # a column out of range: the window untouched
        K.commit(dst, [(K.ADD, 0, vec), (K.ADD, 22, vec)], (), None, ())
    with pytest.raises(ValueError):  # a mode it does not know
        K.commit(dst, [(7, 0, vec)], (), None, ())
    assert not dst.any()
    # a strided vector (a column of a matrix) is read with its stride
    col = torch.arange(12.0).reshape(4, 3)[:, 1]
    assert K.commit(dst, [(K.ADD, 3, vec), (K.COUNT_KNOWN, 3, vec), (K.MAX, 5, col)], (),
                    None, ())
    assert dst[:, 3].tolist() == [2.0] * 4 and dst[:, 5].tolist() == [1.0, 4.0, 7.0, 10.0]
    assert dst.sum().item() == 30.0


def test_trace_rows_summed_and_zeroed_in_place(kernels):
    # the trace's rows (record.Rows): summed in double on the host at the optimizer's
    # pre-step (a NaN or Inf makes the sum so), their gradient rows zeroed after; by the C
    # kernels, and by numpy and an op without them; the address follows a grown log
    from gradwatch.record import Rows

    rows = Rows(torch.device("cpu"), cap=8)
    rows.t[:5] = torch.tensor([1.0, 2.0, 3.0, 4.0, 1e-8])
    assert rows.host_sum(0) == 0.0 and rows.host_sum(3) == 6.0
    assert rows.host_sum(5) == 10.0 + float(torch.tensor(1e-8))  # in double, as stored
    rows.t[1] = math.nan
    assert math.isnan(rows.host_sum(3)) and rows.host_sum(1) == 1.0
    rows.t[1] = -math.inf
    assert rows.host_sum(3) == -math.inf
    rows.zero(2)
    assert rows.t[:4].tolist() == [0.0, 0.0, 3.0, 4.0]
    rows.row(20).fill_(7.0)  # grows the log: a new tensor, its address taken again
    assert rows.t.numel() >= 21 and rows.addr == rows.t.data_ptr()
    assert rows.host_sum(21) == 3.0 + 4.0 + float(torch.tensor(1e-8)) + 7.0
    rows.zero(21)
    assert rows.host_sum(rows.t.numel()) == 0.0
    if kernels != "PyTorch ops":  # the C calls read raw memory: never past the log
        n = rows.t.numel()
        with pytest.raises(ValueError, match=f"rows: {n + 1} of a log of {n}"):
            rows.host_sum(n + 1)
        with pytest.raises(ValueError, match=f"rows: -1 of a log of {n}"):
            rows.zero(-1)


def _check_cases() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    big = torch.randn(5000, generator=g)  # past one block of the kernel's fp32 sums
    cases = [("finite", torch.randn(32, 640, generator=g)), ("odd size", torch.randn(7, 13)),
             ("empty", torch.zeros(0, 4)), ("0-d", torch.tensor(2.5)), ("long", big),
             ("bf16", torch.randn(33, 65, generator=g).bfloat16()),
             ("fp16 (the op)", torch.randn(9, 9, generator=g).half()),
             ("fp64 (the op)", torch.randn(9, 9, generator=g).double()),
             ("transposed (the op)", torch.randn(40, 30, generator=g).t()),
             ("requires grad", torch.randn(6, 70, generator=g).requires_grad_()),
             ("overflow", torch.full((300,), 3e38))]
    for name, at, v in [("nan", 4999, math.nan), ("+inf", 0, math.inf), ("-inf", 77, -math.inf)]:
        t = big.clone()
        t[at] = v
        cases.append((name, t))
    both = big.clone()
    both[3], both[4000] = math.inf, -math.inf  # infinities of both signs: NaN
    cases.append(("+inf and -inf", both))
    return cases


@pytest.mark.parametrize("case", range(len(_check_cases())))
def test_trace_check_sum_is_torch_sum(kernels, case: int) -> None:
    # record.Rows.put_sum, the non-finite trace's check of one tensor: the row is NaN,
    # +-Inf or finite as torch.sum(dtype=float32) makes it, finite sums as close to float64
    # as fp32 allows; by one C call where the kernels take the tensor, else by the op; a row
    # past the log grows it (the C call writes at the new address)
    from gradwatch.record import Rows

    name, t = _check_cases()[case]
    rows = Rows(torch.device("cpu"), cap=4)
    rows.put_sum(1, t)
    rows.put_sum(9, t)
    ref = torch.sum(t.detach(), dtype=torch.float32).item()
    f64 = t.detach().double().sum().item()
    assert rows.t.numel() >= 10 and rows.addr == rows.t.data_ptr()
    for got in (rows.t[1].item(), rows.t[9].item()):
        if math.isnan(ref):
            assert math.isnan(got), name
        elif math.isinf(ref):
            assert got == ref, name
        else:
            assert got == pytest.approx(f64, rel=1e-5, abs=1e-4), name
    assert rows.t[[0, 2, 3]].tolist() == [0.0, 0.0, 0.0]
    out = torch.full((1,), 7.0)
    took = K.sum_into(t, out.data_ptr())
    if kernels == "PyTorch ops":
        assert not took and out.item() == 7.0
    else:
        assert took == (name not in ("fp16 (the op)", "fp64 (the op)", "transposed (the op)"))
        if took:
            assert out.item() == rows.t[1].item() or math.isnan(out.item()) and math.isnan(ref)
