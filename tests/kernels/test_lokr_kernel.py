"""The fused LoKr linear matches its definition (base + x kron(W1, W2)ᵀ), values and gradients, in both orders.

In float64, so that a mismatch is a wrong formula, not a different summation order."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close

from peftkit import LoKrConfig, get_peft_model
from peftkit.kernels.lokr import lokr_linear, lokr_linear_reference


pytestmark = pytest.mark.usefixtures("float64")


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 5), t=st.integers(1, 4), a=st.integers(1, 5), b=st.integers(1, 5), c=st.integers(1, 5),
    d=st.integers(1, 5), w2_first=st.booleans(), with_bias=st.booleans(), transposed=st.booleans(),
    seed=st.integers(0, 9999),
)
def test_matches_reference(n, t, a, b, c, d, w2_first, with_bias, transposed, seed):
    torch.manual_seed(seed)
    w = torch.randn(c * d, a * b).t() if transposed else torch.randn(a * b, c * d)
    bias = torch.randn(a * b) if with_bias else None
    outs, grads = [], []
    for fn in (lokr_linear, lokr_linear_reference):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(n, t, c * d, generator=gen).requires_grad_()
        w1 = torch.randn(a, c, generator=gen).requires_grad_()
        w2 = torch.randn(b, d, generator=gen).requires_grad_()
        out = fn(x, w, bias, w1, w2, w2_first)
        out.backward(torch.randn(out.shape, generator=gen))
        outs.append(out)
        grads.append((x.grad, w1.grad, w2.grad))
    assert_close(outs[0], outs[1], atol=1e-9, rtol=1e-9)
    for g0, g1 in zip(*grads):
        assert_close(g0, g1, atol=1e-9, rtol=1e-9)


def test_non_contiguous_input_and_gradient():
    x = torch.randn(6, 4, requires_grad=True)
    w, w1, w2 = torch.randn(6, 6), torch.randn(2, 3, requires_grad=True), torch.randn(3, 2, requires_grad=True)
    xt = x.t()  # (4, 6), not contiguous
    out = lokr_linear(xt, w, None, w1, w2, True)
    out.t().sum().backward()  # the gradient reaching the kernel is a transposed view too
    ref_x = x.detach().clone().requires_grad_()
    ref = lokr_linear_reference(ref_x.t(), w, None, w1.detach(), w2.detach())
    ref.t().sum().backward()
    assert_close(out, ref)
    assert_close(x.grad, ref_x.grad)


@pytest.mark.parametrize("r, decompose_both", [(1, True), (2, False), (3, False)])  # W1 = w1_a w1_b; W2 low-rank; full
def test_layer_fused_path_equals_general_path(monkeypatch, r, decompose_both):
    """A LoKr layer in training takes the fused kernel; its loss and gradients equal the general path's."""
    from peftkit.methods.lokr.layer import LoKrLayer

    def run(fused: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 12))
        cfg = LoKrConfig(r=r, alpha=4, target_modules=["0", "2"], init_weights=False, decompose_both=decompose_both)
        pm = get_peft_model(model, cfg)
        pm.train()
        if not fused:
            monkeypatch.setattr(LoKrLayer, "fused_forward", lambda self, adapter, x: None)
        x = torch.randn(3, 5, 12)
        loss = pm(x).square().mean()
        loss.backward()
        monkeypatch.undo()
        return loss.detach(), {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}

    calls = []
    real = LoKrLayer.fused_forward
    monkeypatch.setattr(LoKrLayer, "fused_forward", lambda self, a, x: calls.append(a) or real(self, a, x))
    fused_loss, fused_grads = run(True)
    assert calls, "the fused kernel was not used"
    plain_loss, plain_grads = run(False)
    assert_close(fused_loss, plain_loss)
    assert fused_grads.keys() == plain_grads.keys()
    for name in fused_grads:
        assert_close(fused_grads[name], plain_grads[name], msg=name)
