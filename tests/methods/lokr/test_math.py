"""LoKr's math, checked against dense references: the bypass forward (reshapes, no Kronecker
product) equals the base op run with ``W + ΔW``, for random shapes, on every base kind."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.tuners.lokr.layer import factorization as peft_factorization
from peft.tuners.lokr.layer import make_kron, make_weight_cp
from torch import nn
from torch.testing import assert_close

import peftkit
from peftkit.methods.lokr import LoKrConfig, LoKrLayer, factorization


def _layer(base: nn.Module, seed: int = 0, r: int = 2, alpha: float = 3.0, **cfg) -> LoKrLayer:
    layer = LoKrLayer(base)
    torch.manual_seed(seed)
    layer.add_adapter("default", LoKrConfig(r=r, alpha=alpha, target_modules=["x"], init_weights=False, **cfg), r=r, alpha=alpha)
    with torch.no_grad():  # make every factor (also the zero-init ones) clearly non-zero
        for p in layer.adapter_parameters("default"):
            p.add_(torch.randn_like(p) * 0.3)
    return layer.eval()


def _dense_kron(layer: LoKrLayer) -> torch.Tensor:
    """ΔW in the base weight's own shape, built independently: torch.kron of the two factors."""
    a, b, c, d = layer._sides["default"]
    w1 = layer.lokr_w1["default"] if "default" in layer.lokr_w1 else layer.lokr_w1_a["default"] @ layer.lokr_w1_b["default"]
    kernel = tuple(getattr(layer.base_layer, "kernel_size", ()))
    if "default" in layer.lokr_w2:
        w2 = layer.lokr_w2["default"]
    elif "default" in layer.lokr_t2:
        w2 = torch.einsum("ijkl,ip,jq->pqkl", layer.lokr_t2["default"], layer.lokr_w2_a["default"], layer.lokr_w2_b["default"])
        w2 = w2.reshape(b, d, *kernel)
    else:
        w2 = (layer.lokr_w2_a["default"] @ layer.lokr_w2_b["default"]).reshape(b, d, *kernel)
    # kron(W1, W2)[i·b + j, p·d + q, ...] = W1[i, p] · W2[j, q, ...]
    kron = (w1[:, None, :, None, None] * w2.reshape(1, b, 1, d, -1)).reshape(a * b, c * d, *kernel)
    return kron * layer.scaling["default"]  # (a·b, c·d, *k)


@settings(max_examples=60, deadline=None)
@given(
    out_f=st.integers(1, 48), in_f=st.integers(1, 48), r=st.integers(1, 10), batch=st.integers(1, 4),
    both=st.booleans(), factor=st.sampled_from([-1, -1, 2, 3, 4, 5]), seed=st.integers(0, 2**16),
)
def test_linear_bypass_equals_dense(out_f, in_f, r, batch, both, factor, seed):
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f)
    layer = _layer(base, seed, r=r, decompose_both=both, decompose_factor=factor)
    x = torch.randn(batch, 3, in_f)
    delta = _dense_kron(layer)
    with torch.no_grad():
        assert_close(layer(x), F.linear(x, base.weight + delta, base.bias), atol=1e-4, rtol=1e-4)
        assert_close(layer.delta_weight("default"), delta, atol=1e-5, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    out_c=st.integers(1, 12), in_c=st.integers(1, 12), k=st.sampled_from([(1, 1), (3, 3), (1, 3), (2, 3)]),
    stride=st.integers(1, 2), padding=st.integers(0, 2), dilation=st.integers(1, 2), r=st.integers(1, 6),
    effective=st.booleans(), both=st.booleans(), mode=st.sampled_from(["zeros", "zeros", "reflect", "circular"]),
    seed=st.integers(0, 2**16),
)
def test_conv2d_bypass_equals_dense(out_c, in_c, k, stride, padding, dilation, r, effective, both, mode, seed):
    torch.manual_seed(seed)
    base = nn.Conv2d(in_c, out_c, k, stride=stride, padding=padding, dilation=dilation, padding_mode=mode)
    layer = _layer(base, seed, r=r, use_effective_conv2d=effective, decompose_both=both)
    x = torch.randn(2, in_c, 7, 8)
    delta = _dense_kron(layer)
    with torch.no_grad():
        expected = base._conv_forward(x, base.weight + delta, base.bias)
        assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)
        assert_close(layer(x[0]), expected[0], atol=1e-4, rtol=1e-4)  # unbatched input


@settings(max_examples=30, deadline=None)
@given(
    out_c=st.integers(1, 12), in_c=st.integers(1, 12), k=st.integers(1, 4), r=st.integers(1, 6),
    effective=st.booleans(), padding=st.integers(0, 2), seed=st.integers(0, 2**16),
)
def test_conv1d_bypass_equals_base_with_delta(out_c, in_c, k, r, effective, padding, seed):
    torch.manual_seed(seed)
    base = nn.Conv1d(in_c, out_c, k, padding=padding)
    layer = _layer(base, seed, r=r, use_effective_conv2d=effective)
    x = torch.randn(2, in_c, 9)
    delta = layer.get_delta_weight("default")
    with torch.no_grad():
        assert_close(layer(x), F.conv1d(x, base.weight + delta, base.bias, padding=padding), atol=1e-4, rtol=1e-4)
    if "default" not in layer.lokr_w2:  # the layouts where PEFT's ΔW is the plain Kronecker product
        assert_close(delta, _dense_kron(layer).reshape(delta.shape), atol=1e-5, rtol=1e-5)


def test_conv1d_layouts_follow_peft():
    """A full 3-D w2 on a Conv1d: PEFT's kron broadcasts W1 as (1, a, c); its CP path is the plain
    Kronecker layout (PEFT's own forward fails there, so its helpers are called directly)."""
    base = nn.Conv1d(6, 10, 3)
    full = _layer(base, r=8)
    assert "default" in full.lokr_w2 and full.lokr_w2["default"].dim() == 3
    w1, w2 = full.lokr_w1["default"], full.lokr_w2["default"]
    expected = make_kron(w1, w2, full.scaling["default"]).reshape(base.weight.shape)
    assert_close(full.get_delta_weight("default"), expected)
    cp = _layer(base, r=1, use_effective_conv2d=True)
    t2, wa, wb = cp.lokr_t2["default"], cp.lokr_w2_a["default"], cp.lokr_w2_b["default"]
    assert t2.shape == (1, 1, 3, 1)
    with torch.no_grad():
        w2 = make_weight_cp(t2, wa, wb).clone(memory_format=torch.contiguous_format)
        w2 = torch.empty(w2.shape).copy_(w2)  # a fresh dense tensor: PEFT's torch.kron call fails on the einsum's strides
        expected = make_kron(cp.lokr_w1["default"].clone(), w2, cp.scaling["default"]).reshape(base.weight.shape)
    assert_close(cp.get_delta_weight("default"), expected)


def test_grouped_conv_materialises_and_matches():
    base = nn.Conv2d(8, 6, 3, groups=2, padding=1)
    layer = _layer(base, r=1)
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        expected = F.conv2d(x, base.weight + layer.get_delta_weight("default"), base.bias, padding=1, groups=2)
        assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert layer.lokr_w1["default"].shape[1] * layer._sides["default"][3] == 4  # in_channels // groups


@pytest.mark.parametrize(
    "base", [nn.Linear(12, 20), nn.Conv2d(6, 8, 3, padding=1), nn.Conv1d(6, 10, 3)], ids=["linear", "conv2d", "conv1d_lowrank"]
)
def test_forward_never_forms_the_kronecker_product(base, monkeypatch):
    layer = _layer(base, r=1, decompose_both=True)
    if isinstance(base, nn.Linear):
        x = torch.randn(2, 12)
        expected = F.linear(x, base.weight + _dense_kron(layer), base.bias)
    else:
        x = torch.randn(2, 6, 7) if isinstance(base, nn.Conv1d) else torch.randn(2, 6, 7, 7)
        expected = base._conv_forward(x, base.weight + _dense_kron(layer), base.bias)
    layer.train()

    def boom(*args, **kwargs):
        raise AssertionError("the Kronecker product was formed in forward")

    monkeypatch.setattr(torch, "kron", boom)
    monkeypatch.setattr(LoKrLayer, "delta_weight", boom)
    monkeypatch.setattr(LoKrLayer, "get_delta_weight", boom)
    out = layer(x)
    assert_close(out, expected.detach(), atol=1e-5, rtol=1e-5)
    out.square().sum().backward()  # backward through the reshapes, no ΔW either
    assert all(p.grad is not None for p in layer.adapter_parameters("default"))


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_gradients_equal_dense_reference(kind):
    base = nn.Linear(12, 20) if kind == "linear" else nn.Conv2d(6, 8, 3, padding=1)
    layer = _layer(base, r=1, decompose_both=True)
    x = torch.randn(3, 12) if kind == "linear" else torch.randn(2, 6, 5, 5)
    params = list(layer.adapter_parameters("default"))
    layer(x).square().sum().backward()
    bypass = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    delta = _dense_kron(layer)
    dense = F.linear(x, base.weight + delta, base.bias) if kind == "linear" else base._conv_forward(x, base.weight + delta, base.bias)
    dense.square().sum().backward()
    for got, p in zip(bypass, params):
        assert_close(got, p.grad, atol=1e-4, rtol=1e-4)


def test_transformers_conv1d_is_supported():
    from transformers.pytorch_utils import Conv1D

    base = Conv1D(20, 12)  # in 12 -> out 20, weight stored (12, 20)
    layer = _layer(base, r=1)
    x = torch.randn(2, 3, 12)
    delta = _dense_kron(layer)  # canonical (out, in)
    with torch.no_grad():
        assert_close(layer(x), x @ (base.weight + delta.t()) + base.bias, atol=1e-5, rtol=1e-5)
    assert layer.get_delta_weight("default").shape == base.weight.shape


def test_half_base_keeps_float32_adapter_and_output_dtype():
    base = nn.Linear(12, 20).to(torch.bfloat16)
    layer = _layer(base, r=1)
    assert all(p.dtype == torch.float32 for p in layer.adapter_parameters("default"))
    x = torch.randn(2, 12, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    expected = F.linear(x.float(), base.weight.float() + _dense_kron(layer), base.bias.float())
    assert_close(out.float(), expected, atol=0.1, rtol=0.05)


def test_factorization_matches_peft():
    for n in range(1, 300):
        for f in (-1, -3, 0, 1, 2, 3, 4, 6, 8, 16, 64, 1000):
            assert factorization(n, f) == peft_factorization(n, f), (n, f)
    assert factorization(256) == (16, 16) and factorization(128, 4) == (4, 32) and factorization(127) == (1, 127)


@pytest.mark.parametrize(
    "r,both,expected",
    [
        (1, False, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
        (1, True, {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}),
        (3, True, {"lokr_w1", "lokr_w2"}),  # 20 = 4·5, 12 = 3·4: r ≥ max/2 everywhere
    ],
)
def test_which_factors_are_low_rank(r, both, expected):
    layer = _layer(nn.Linear(12, 20), r=r, decompose_both=both)
    have = {attr for attr in LoKrLayer.adapter_attrs if "default" in getattr(layer, attr)}
    assert have == expected
    assert layer._sides["default"] == (4, 5, 3, 4)
    assert layer.scaling["default"] == pytest.approx(3.0 / r)


def test_rank_and_module_dropout_semantics():
    base = nn.Linear(12, 20)
    x = torch.randn(4, 12)
    layer = _layer(base, r=1, rank_dropout=1.0)
    layer.train()
    with torch.no_grad():
        assert_close(layer(x), base(x))  # every output feature of the update dropped
        layer.eval()
        assert not torch.allclose(layer(x), base(x))  # eval: no dropout
    layer = _layer(base, r=1, module_dropout=1.0)
    layer.train()
    with torch.no_grad():
        assert_close(layer(x), base(x))
    # rank dropout keeps a feature's whole update or none of it; with the scale the kept ones grow
    layer = _layer(base, r=1, rank_dropout=0.5, rank_dropout_scale=True)
    with torch.no_grad():
        full = layer(x) - base(x)
        layer.train()
        torch.manual_seed(3)
        dropped = layer(x) - base(x)
    torch.manual_seed(3)
    torch.rand(1)  # the module-dropout draw
    keep = (torch.rand(20) > 0.5).float()
    assert_close(dropped, full * keep / keep.mean(), atol=1e-5, rtol=1e-5)


def test_config_errors():
    with pytest.raises(ValueError, match="r must be a positive integer"):
        LoKrConfig(r=0)
    with pytest.raises(ValueError, match="init_weights"):
        LoKrConfig(init_weights="gaussian")
    with pytest.raises(ValueError, match="rank_dropout"):
        LoKrConfig(rank_dropout=1.5)
    with pytest.raises(ValueError, match="layers_pattern"):
        LoKrConfig(layers_pattern="layers")


def test_unsupported_bases_raise():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.c3 = nn.Conv3d(2, 2, 1)

    with pytest.raises(TypeError, match="emb"):
        peftkit.get_peft_model(M(), LoKrConfig(target_modules=["emb"]))
    with pytest.raises(TypeError, match="Conv3d"):
        peftkit.get_peft_model(M(), LoKrConfig(target_modules=["c3"]))


def test_rank_and_alpha_patterns_per_layer():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(16, 16)
            self.v = nn.Linear(16, 16)

    model = peftkit.get_peft_model(M(), LoKrConfig(r=1, alpha=2, target_modules=["q", "v"], rank_pattern={"v": 4}, alpha_pattern={"q": 6}))
    q, v = model.base_model.model.q, model.base_model.model.v
    assert (q.r["default"], q.scaling["default"]) == (1, 6.0)
    assert (v.r["default"], v.scaling["default"]) == (4, 0.5)
    assert "default" in q.lokr_w2_a and "default" in v.lokr_w2  # 16 = 4·4: r=1 low-rank, r=4 full
    assert q.lokr_w2_a["default"].shape == (4, 1)
