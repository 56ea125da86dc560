"""gradwatch.stats against float64 references: exact paths, sampled path, empty, non-finite."""

from __future__ import annotations

import math

import pytest
import torch

from gradwatch import stats as S
from gradwatch.buffers import WindowBuffers


def ref_activation(x: torch.Tensor, bounds: tuple[float, float] | None,
                   margin: float) -> list[float]:
    d = x.detach().double().reshape(-1)
    finite = torch.isfinite(d)
    if bounds is None:
        sat = 0.0
    else:
        lo, hi = bounds
        m = margin * (hi - lo)
        sat = float(((d <= lo + m) | (d >= hi - m)).sum())
    return [float(d.sum()), float(d.max()), float(d.min()), float((d * d).sum()),
            float((d != 0).sum()), float((~finite).sum()), sat]


def close(a: float, b: float, rel: float = 1e-3, abs_: float = 1e-3) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


@pytest.mark.parametrize("shape", [(1,), (7,), (128, 33), (4, 8, 16, 16)])
@pytest.mark.parametrize("bounds", [None, (-1.0, 1.0), (0.0, 6.0)])
def test_small_tensors_exact_against_float64(shape, bounds):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g) * 2
    x = torch.where(torch.rand(*shape, generator=g) < 0.3, torch.zeros(()), x)  # zeros
    if bounds is not None:
        x = x.clamp(*bounds)  # saturated elements exist
    assert x.numel() <= S.SAMPLE_ABOVE
    got = S.activation_sums(x, bounds, 0.01).tolist()
    want = ref_activation(x, bounds, 0.01)
    for j, (a, b) in enumerate(zip(got, want)):
        assert close(a, b), (j, a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes_accumulate_in_fp32(dtype):
    x = (torch.randn(4096) * 3).to(dtype)
    got = S.activation_sums(x, None, 0.01)
    assert got.dtype == torch.float32
    want = ref_activation(x, None, 0.01)
    for j, (a, b) in enumerate(zip(got.tolist(), want)):
        assert close(a, b, rel=2e-3), (j, a, b)


def test_non_contiguous_input():
    x = torch.randn(64, 96).t()[:, ::2]
    assert not x.is_contiguous()
    for a, b in zip(S.activation_sums(x, None, 0.01).tolist(), ref_activation(x, None, 0.01)):
        assert close(a, b)


def test_empty_inputs():
    e = torch.empty(0, 5)
    assert S.activation_sums(e, (-1.0, 1.0), 0.01).tolist() == [0.0] * S.ACT_VEC
    assert float(S.grad_sq_sum(e)) == 0.0
    assert float(S.nonfinite_sum(e)) == 0.0
    assert S.foreach_absmax([e, torch.ones(3)]).tolist() == [0.0, 1.0]


def test_non_finite_small_tensor_counts_exactly():
    x = torch.randn(1000)
    x[3] = math.nan
    x[10] = math.inf
    x[11] = -math.inf
    v = S.activation_sums(x, None, 0.01)
    assert v[S.A_NF].item() == 3.0
    assert math.isnan(v[S.A_S1].item())
    assert math.isnan(v[S.A_HI].item()) or math.isinf(v[S.A_HI].item())
    assert not math.isfinite(S.grad_sq_sum(x).item())


def test_sampled_tensor_sum_exact_rest_within_bounds():
    g = torch.Generator().manual_seed(2)
    x = torch.relu(torch.randn(32, 64, 16, 16, generator=g))
    x.view(-1)[12345] = 40.0  # one spike, most likely off the sample
    assert x.numel() > S.SAMPLE_ABOVE
    got = S.activation_sums(x, None, 0.01).tolist()
    want = ref_activation(x, None, 0.01)
    assert close(got[S.A_S1], want[S.A_S1])  # exact: every element
    assert abs(got[S.A_S2] / want[S.A_S2] - 1) < 0.1  # ~4 standard errors
    assert got[S.A_HI] <= want[S.A_HI] and got[S.A_LO] >= want[S.A_LO]
    # rotating the offset visits every element: the spike is seen within `stride` calls
    stride = S.sample_view(x.reshape(-1), S.SAMPLE_SIZE).stride()[0]
    seen = max(S.activation_sums(x, None, 0.01, phase=p)[S.A_HI].item()
               for p in range(stride))
    assert seen == 40.0


def test_sample_none_is_exact_for_large_tensors():
    x = torch.relu(torch.randn(300_000)).clamp(max=1.5)
    got = S.activation_sums(x, (0.0, 1.5), 0.01, sample=None).tolist()
    want = ref_activation(x, (0.0, 1.5), 0.01)
    for j, (a, b) in enumerate(zip(got, want)):
        assert close(a, b), (j, a, b)


@pytest.mark.parametrize("phase", [0, 1, 17, 1000])
def test_sampled_fractions_within_documented_bound(phase):
    """Zero and saturated fractions from the sample vs the exact ones: within 0.03
    (6 standard errors of 0.5/sqrt(4096)), also on a conv-like tensor whose zeros sit in
    whole channels and on image borders (structure aligned with powers of two)."""
    g = torch.Generator().manual_seed(3)
    conv = torch.randn(32, 64, 16, 16, generator=g)
    conv[:, ::4] = 0.0  # dead channels: 25%
    conv[:, :, 0, :] = 0.0  # zero top border
    mlp = torch.tanh(3 * torch.randn(256, 512, generator=g))
    for x, bounds in ((conv, None), (mlp, (-1.0, 1.0))):
        n = x.numel()
        got = S.activation_sums(x, bounds, 0.02, phase=phase).tolist()
        want = ref_activation(x, bounds, 0.02)
        assert abs(got[S.A_NNZ] / n - want[S.A_NNZ] / n) < 0.03
        assert abs(got[S.A_SAT] / n - want[S.A_SAT] / n) < 0.03
        # the cases are not trivial: many zeros in one, many saturated in the other
        assert want[S.A_NNZ] / n < 0.75 or want[S.A_SAT] / n > 0.2


def test_sample_view_is_odd_strided_and_covers_everything_over_phases():
    flat = torch.arange(10 * 1024 + 37, dtype=torch.float32)
    n = 1024
    seen = set()
    stride = None
    for phase in range(64):
        v = S.sample_view(flat, n, phase)
        assert v.numel() == n and v.stride()[0] % 2 == 1
        stride = v.stride()[0]
        seen.update(int(i) for i in v.tolist())
    assert stride is not None and stride * n <= flat.numel()
    assert seen == set(range(stride * n))  # each start offset once over `stride` phases


def test_non_finite_off_the_sample_is_still_flagged_by_the_buffers():
    x = torch.randn(2 * S.SAMPLE_ABOVE)
    x.view(-1)[77_777] = math.inf
    v = S.activation_sums(x, None, 0.01)
    assert not math.isfinite(v[S.A_S1].item()) and v[S.A_NF].item() == 0.0  # off the sample
    buf = WindowBuffers(2, torch.device("cpu"))
    buf.add_activation(0, v, x.numel())
    buf.add_activation(1, S.activation_sums(torch.randn(2 * S.SAMPLE_ABOVE), None, 0.01), x.numel())
    buf.add_out_grad(1, S.grad_sq_sum(torch.full((5,), math.nan)), 5)
    flags = buf.step_flags(None)
    assert flags[0, 0].item() >= 1.0 and flags[1, 0].item() == 0.0
    assert flags[0, 1].item() == 0.0 and flags[1, 1].item() == 1.0
    buf.commit_step(None, None, None)
    assert buf.stage.abs().sum().item() == 0.0


def test_grad_sq_sum_and_foreach_against_float64():
    g = torch.Generator().manual_seed(4)
    ts = [torch.randn(300, 7, generator=g), torch.randn(5, generator=g).to(torch.bfloat16),
          torch.randn(40, 40, generator=g).t()]
    for t in ts:
        assert close(S.grad_sq_sum(t).item(), float((t.double() ** 2).sum()))
    norms = S.foreach_norms(ts, 2.0).tolist()
    maxes = S.foreach_absmax(ts).tolist()
    for t, n, m in zip(ts, norms, maxes):
        assert close(n, float(t.double().norm()))
        assert close(m, float(t.double().abs().max()))
    sp = torch.sparse_coo_tensor([[0, 3]], [3.0, -4.0], (10,), check_invariants=True)
    assert close(S.grad_sq_sum(sp).item(), 25.0)
    assert S.foreach_absmax([sp]).tolist() == [4.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_norm_plan_stacked_and_one_by_one_against_float64(dtype):
    # groups of >= STACK_MIN same-shape tensors up to STACK_MAX elements are stacked on CPU,
    # the rest (too big, too few, another shape) go one by one: every norm, max |x| and the
    # norm of a difference of two packs must equal float64 in the original order
    g = torch.Generator().manual_seed(0)
    side = int(S.STACK_MAX ** 0.5)
    shapes = ([(8, 4)] * S.STACK_MIN + [(side, side)] * S.STACK_MIN  # two stacked groups
              + [(side + 1, side)] * S.STACK_MIN  # above STACK_MAX: one by one
              + [(3,)] * (S.STACK_MIN - 1) + [(5, 5)])  # too few of one shape
    order = torch.randperm(len(shapes), generator=g).tolist()
    ts = [(torch.randn(*shapes[i], generator=g) * 10 ** (k % 5 - 2)).to(dtype)
          for k, i in enumerate(order)]
    plan = S.NormPlan(ts)
    if dtype in S.UPCAST:
        assert [len(idx) for idx, _ in plan.groups] == [S.STACK_MIN] * 2
        assert len(plan.rest) == S.STACK_MIN + S.STACK_MIN
    else:  # float64 stays float64 per tensor: one by one
        assert plan.groups == [] and len(plan.rest) == len(ts)
    ref = [t.double() for t in ts]
    for got, want in ((plan.norms(ts), [r.norm().item() for r in ref]),
                      (plan.norms(plan.pack(ts)), [r.norm().item() for r in ref]),
                      (plan.absmax(ts), [r.abs().max().item() for r in ref])):
        assert got.dtype == torch.float32 and got.shape == (len(ts),)
        for a, b in zip(got.tolist(), want):
            assert math.isclose(a, b, rel_tol=1e-5 if dtype != torch.bfloat16 else 1e-2)
    before = plan.pack(ts, copy=True)
    after = [t * 2 for t in ts]
    d = plan.norms(plan.pack(after) - before)
    for a, r in zip(d.tolist(), ref):
        assert math.isclose(a, r.norm().item(), rel_tol=1e-5 if dtype != torch.bfloat16 else 1e-2)
