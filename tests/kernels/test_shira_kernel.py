"""The SHiRA kernels match the dense-delta definition (values and gradients) and never change the base weight.

``shira_linear`` patches the adapter's values into the frozen weight for the base GEMM and
writes the originals back; ``sparse_delta`` computes ``x Sᵀ`` alone. Both are checked against
``shira_linear_reference`` in float64, for an (out, in) nn.Linear weight and for a weight
stored (in, out) as GPT-2's Conv1D (the kernels then see a transposed view), with positions
in an arbitrary file order.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from peftkit.kernels.shira import SparsePattern, shira_linear, shira_linear_reference, sparse_delta


def _setup(fan_in, fan_out, nnz_frac, transposed, seed, dtype=torch.float64, shuffle=True):
    """A weight as stored, its (out, in) view, a pattern, the canonical (rows, cols) and the storage positions."""
    g = torch.Generator().manual_seed(seed)
    stored_shape = (fan_in, fan_out) if transposed else (fan_out, fan_in)
    weight = torch.randn(stored_shape, generator=g, dtype=torch.float64).to(dtype)
    w2d = weight.t() if transposed else weight
    numel = fan_in * fan_out
    nnz = max(1, int(numel * nnz_frac))
    flat = torch.randperm(numel, generator=g)[:nnz]
    if not shuffle:
        flat = flat.sort().values
    r0, r1 = flat // stored_shape[1], flat % stored_shape[1]  # (row, col) in the stored layout, file order
    rows, cols = (r1, r0) if transposed else (r0, r1)  # canonical (out, in)
    pattern = SparsePattern(rows, cols, flat, (fan_out, fan_in))
    return weight, w2d, pattern, rows, cols


CASES = st.fixed_dictionaries({
    "n": st.integers(1, 4), "t": st.integers(1, 4), "fan_in": st.integers(1, 17), "fan_out": st.integers(1, 17),
    "frac": st.floats(0.01, 1.0), "transposed": st.booleans(), "with_bias": st.booleans(),
    "scale": st.sampled_from([1.0, 0.5, -2.0]), "shuffle": st.booleans(), "seed": st.integers(0, 9999),
})


@settings(max_examples=40, deadline=None)
@given(case=CASES)
def test_shira_linear_matches_reference(case):
    weight, w2d, pattern, rows, cols = _setup(case["fan_in"], case["fan_out"], case["frac"], case["transposed"],
                                              case["seed"], shuffle=case["shuffle"])
    original = weight.clone()
    g = torch.Generator().manual_seed(case["seed"] + 1)
    bias = torch.randn(case["fan_out"], generator=g, dtype=torch.float64) if case["with_bias"] else None
    x0 = torch.randn(case["n"], case["t"], case["fan_in"], generator=g, dtype=torch.float64)
    v0 = torch.randn(rows.numel(), generator=g, dtype=torch.float64)
    upstream = torch.randn(case["n"], case["t"], case["fan_out"], generator=g, dtype=torch.float64)
    outs, grads = [], []
    for fn in ("kernel", "reference"):
        x, v = x0.clone().requires_grad_(), v0.clone().requires_grad_()
        if fn == "kernel":
            out = shira_linear(x, weight, w2d, bias, v, pattern, case["scale"])
        else:
            out = shira_linear_reference(x, w2d, bias, v, rows, cols, case["scale"])
        out.backward(upstream)
        outs.append(out)
        grads.append((x.grad, v.grad))
        assert torch.equal(weight, original), "the base weight changed"
    assert_close(outs[0], outs[1], atol=1e-10, rtol=1e-10)
    assert_close(grads[0][0], grads[1][0], atol=1e-10, rtol=1e-10)
    assert_close(grads[0][1], grads[1][1], atol=1e-10, rtol=1e-10)


@settings(max_examples=40, deadline=None)
@given(case=CASES)
def test_sparse_delta_matches_reference(case):
    weight, w2d, pattern, rows, cols = _setup(case["fan_in"], case["fan_out"], case["frac"], case["transposed"],
                                              case["seed"], shuffle=case["shuffle"])
    g = torch.Generator().manual_seed(case["seed"] + 2)
    x0 = torch.randn(case["n"], case["t"], case["fan_in"], generator=g, dtype=torch.float64)
    v0 = torch.randn(rows.numel(), generator=g, dtype=torch.float64)
    upstream = torch.randn(case["n"], case["t"], case["fan_out"], generator=g, dtype=torch.float64)
    zero = torch.zeros_like(w2d)
    results = []
    for fn in ("kernel", "reference"):
        x, v = x0.clone().requires_grad_(), v0.clone().requires_grad_()
        out = sparse_delta(x, v, pattern) if fn == "kernel" else shira_linear_reference(x, zero, None, v, rows, cols)
        out.backward(upstream)
        results.append((out, x.grad, v.grad))
    for a, b in zip(*results):
        assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d_layout"])
def test_pattern_positions_and_delta(transposed):
    weight, w2d, pattern, rows, cols = _setup(7, 5, 0.4, transposed, seed=3)
    v = torch.randn(rows.numel(), dtype=torch.float64)
    # CSR order + values() reproduce the dense delta
    dense = torch.zeros(5, 7, dtype=torch.float64).index_put_(pattern.coo(), pattern.values(v))
    expected = torch.zeros(5, 7, dtype=torch.float64).index_put_((rows, cols), v)
    assert torch.equal(dense, expected)
    assert torch.equal(pattern.csr(v).to_dense(), expected)
    assert torch.equal(pattern.csr(v, transposed=True).to_dense(), expected.t())
    # flat indexes the stored weight at the same entries
    storage = weight.reshape(-1)
    assert torch.equal(storage[pattern.flat], w2d[rows, cols])


def test_no_grad_inputs_and_values_only():
    weight, w2d, pattern, rows, cols = _setup(6, 4, 0.5, False, seed=1)
    x = torch.randn(3, 6, dtype=torch.float64)
    v = torch.randn(rows.numel(), dtype=torch.float64, requires_grad=True)
    out = shira_linear(x, weight, w2d, None, v, pattern)
    out.sum().backward()
    expected = (torch.ones(3, 4, dtype=torch.float64).t() @ x)[rows, cols]
    assert_close(v.grad, expected)
    with torch.no_grad():
        assert_close(shira_linear(x, weight, w2d, None, v, pattern),
                     shira_linear_reference(x, w2d, None, v.detach(), rows, cols))


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d_layout"])
def test_bf16_weight_fp32_values(transposed):
    weight, w2d, pattern, rows, cols = _setup(24, 16, 0.2, transposed, seed=5, dtype=torch.bfloat16)
    original = weight.clone()
    x = torch.randn(2, 3, 24).to(torch.bfloat16).requires_grad_()
    v = (torch.randn(rows.numel()) * 0.5).requires_grad_()
    bias = torch.randn(16).to(torch.bfloat16)
    out = shira_linear(x, weight, w2d, bias, v, pattern, 0.5)
    assert out.dtype == torch.bfloat16
    out.float().pow(2).sum().backward()
    assert torch.equal(weight, original), "the base weight changed"
    assert v.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    # against float32 math on the same numbers
    x32, v32 = x.detach().float().requires_grad_(), v.detach().clone().requires_grad_()
    ref = shira_linear_reference(x32, w2d.float(), bias.float(), v32, rows, cols, 0.5)
    ref.pow(2).sum().backward()
    assert_close(out.float(), ref, atol=0.1, rtol=0.05)
    assert_close(v.grad, v32.grad, atol=0.5, rtol=0.05)
    assert_close(x.grad.float(), x32.grad, atol=0.5, rtol=0.05)
    # sparse_delta takes a bf16 input with fp32 values too
    y = sparse_delta(x.detach(), v.detach(), pattern)
    ref_d = F.linear(x.detach().float(), torch.zeros(16, 24).index_put_((rows, cols), v.detach()))
    assert y.dtype == torch.bfloat16
    assert_close(y.float(), ref_d, atol=0.05, rtol=0.02)


def test_threads_sharing_one_weight():
    """Patch, GEMM and restore are atomic: threads with different values on one weight do not mix."""
    from concurrent.futures import ThreadPoolExecutor

    weight, w2d, pattern, rows, cols = _setup(32, 24, 0.2, False, seed=6, dtype=torch.float32)
    original = weight.clone()
    x = torch.randn(16, 32)
    values = [torch.randn(rows.numel()) for _ in range(4)]
    expected = [shira_linear_reference(x, w2d, None, v, rows, cols) for v in values]

    def work(i):
        return [shira_linear(x, weight, w2d, None, values[i % 4], pattern) for _ in range(25)]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, range(8)))
    for i, outs in enumerate(results):
        for out in outs:
            assert_close(out, expected[i % 4], atol=1e-5, rtol=1e-5)
    assert torch.equal(weight, original)


def test_base_weight_restored_when_forward_raises():
    weight, w2d, pattern, rows, cols = _setup(6, 4, 0.5, False, seed=2, dtype=torch.float32)
    original = weight.clone()
    with pytest.raises(RuntimeError):
        shira_linear(torch.randn(3, 5), weight, w2d, None, torch.randn(rows.numel()), pattern)  # wrong in-size
    assert torch.equal(weight, original)
    # the lock was released: a second call works
    shira_linear(torch.randn(3, 6), weight, w2d, None, torch.randn(rows.numel()), pattern)
    assert torch.equal(weight, original)


@pytest.fixture
def nan_filled_empty():
    """Deterministic mode fills ``torch.empty`` with NaN: a kernel reading uninitialised memory shows it."""
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(old)


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d_layout"])
def test_gradients_never_read_uninitialised_memory(transposed, nan_filled_empty):
    assert torch.utils.deterministic.fill_uninitialized_memory
    weight, w2d, pattern, rows, cols = _setup(9, 7, 0.3, transposed, seed=4, dtype=torch.float32)
    x0, v0 = torch.randn(5, 9), torch.randn(rows.numel())
    results = []
    for fn in ("fused", "delta", "reference"):
        x, v = x0.clone().requires_grad_(), v0.clone().requires_grad_()
        if fn == "fused":
            out = shira_linear(x, weight, w2d, None, v, pattern)
        elif fn == "delta":
            out = F.linear(x, w2d) + sparse_delta(x, v, pattern)
        else:
            out = shira_linear_reference(x, w2d, None, v, rows, cols)
        out.backward(torch.cos(out.detach()))
        assert torch.isfinite(v.grad).all() and torch.isfinite(x.grad).all(), fn
        results.append((out, x.grad, v.grad))
    for got in results[:2]:
        for a, b in zip(got, results[2]):
            assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_layers_reading_one_input_share_its_token_major_copy():
    """q, k and v read the same tensor: the transposed input the values' gradient needs is made once,
    and every layer's gradients still equal the dense definition's."""
    from peftkit.kernels import shira as kernel

    made = []
    real = torch.Tensor.contiguous

    def counting(t, *a, **kw):
        out = real(t, *a, **kw)
        if out.data_ptr() != t.data_ptr():
            made.append(tuple(out.shape))
        return out

    x0 = torch.randn(2, 5, 6, dtype=torch.float64)
    layers = [_setup(6, 4, 0.3, False, seed, shuffle=False) for seed in range(3)]
    values = [torch.randn(p.flat.numel(), dtype=torch.float64, requires_grad=True) for _, _, p, _, _ in layers]
    x = x0.clone().requires_grad_()
    h = x * 1.0  # one tensor, read by three layers
    torch.Tensor.contiguous = counting
    try:
        outs = [shira_linear(h, w, w2d, None, v, p) for (w, w2d, p, _, _), v in zip(layers, values)]
    finally:
        torch.Tensor.contiguous = real
    assert made.count((6, 10)) == 1  # one (in, N) copy for the three layers
    sum(o.sum() for o in outs).backward()
    for (w, w2d, p, rows, cols), v in zip(layers, values):
        v_ref = v.detach().clone().requires_grad_()
        shira_linear_reference(x0, w2d, None, v_ref, rows, cols).sum().backward()
        assert_close(v.grad, v_ref.grad)
    y = torch.randn(3, 4)
    first = kernel._token_major(y)
    assert kernel._token_major(y) is first  # the same tensor at the same version: reused
    y.add_(1.0)  # changed in place: not the same input any more
    again = kernel._token_major(y)
    assert again is not first and torch.equal(again, y.t())
