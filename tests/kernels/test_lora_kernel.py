"""The fused LoRA and DoRA linears match their plain-torch definitions, values and gradients.

In float64, so that a mismatch is a wrong formula, not a different summation order."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from peftkit.kernels.lora import lora_linear, lora_linear_reference


pytestmark = pytest.mark.usefixtures("float64")


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 6), t=st.integers(1, 5), fan_in=st.integers(1, 20), fan_out=st.integers(1, 20),
    r=st.integers(1, 6), scale=st.floats(0.1, 4.0), with_bias=st.booleans(), transposed=st.booleans(),
    seed=st.integers(0, 9999),
)
def test_matches_reference(n, t, fan_in, fan_out, r, scale, with_bias, transposed, seed):
    torch.manual_seed(seed)
    w = torch.randn(fan_in, fan_out).t() if transposed else torch.randn(fan_out, fan_in)
    bias = torch.randn(fan_out) if with_bias else None
    grads = []
    outs = []
    for fn in (lora_linear, lora_linear_reference):
        x = torch.randn(n, t, fan_in, generator=torch.Generator().manual_seed(seed)).requires_grad_()
        a = torch.randn(r, fan_in, generator=torch.Generator().manual_seed(seed + 1)).requires_grad_()
        b = torch.randn(fan_out, r, generator=torch.Generator().manual_seed(seed + 2)).requires_grad_()
        out = fn(x, w, bias, a, b, scale)
        out.backward(torch.ones_like(out))
        outs.append(out)
        grads.append((x.grad, a.grad, b.grad))
    assert_close(outs[0], outs[1], atol=1e-9, rtol=1e-9)
    for g0, g1 in zip(*grads):
        assert_close(g0, g1, atol=1e-9, rtol=1e-9)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 5), fan_in=st.integers(1, 16), fan_out=st.integers(1, 16), r=st.integers(1, 5),
    scale=st.floats(0.1, 4.0), with_bias=st.booleans(), seed=st.integers(0, 9999),
)
def test_dora_matches_reference(n, fan_in, fan_out, r, scale, with_bias, seed):
    from peftkit.kernels.lora import dora_linear, dora_linear_reference

    torch.manual_seed(seed)
    w = torch.randn(fan_out, fan_in)
    bias = torch.randn(fan_out) if with_bias else None
    norm = torch.rand(fan_out) + 0.5
    outs, grads = [], []
    for fn in (dora_linear, dora_linear_reference):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 3, fan_in, generator=g).requires_grad_()
        a = torch.randn(r, fan_in, generator=g).requires_grad_()
        b = torch.randn(fan_out, r, generator=g).requires_grad_()
        m = (torch.rand(fan_out, generator=g) + 0.5).requires_grad_()
        out = fn(x, w, bias, a, b, scale, m, norm)
        out.backward(torch.cos(out.detach()))
        outs.append(out)
        grads.append((x.grad, a.grad, b.grad, m.grad))
    assert_close(outs[0], outs[1], atol=1e-9, rtol=1e-9)
    for g0, g1 in zip(*grads):
        assert_close(g0, g1, atol=1e-9, rtol=1e-9)
