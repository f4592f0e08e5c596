"""LoHa's math, checked against dense references: both forward paths (the face-splitting
bypass and ΔW folded into the base op) equal the base op run with ``W + ΔW``, for random
shapes, on every base kind, in forward and in backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.tuners.loha.layer import make_weight_cp
from torch import nn
from torch.testing import assert_close

import peftkit
from peftkit.methods.loha import LoHaConfig, LoHaLayer
from peftkit.methods.loha.layer import face_split_cols, face_split_rows

PATHS = ["bypass", "dense", None]


def _layer(base: nn.Module, seed: int = 0, r: int = 2, alpha: float = 3.0, **cfg) -> LoHaLayer:
    layer = LoHaLayer(base)
    torch.manual_seed(seed)
    layer.add_adapter("default", LoHaConfig(r=r, alpha=alpha, target_modules=["x"], init_weights=False, **cfg), r=r, alpha=alpha)
    return layer.eval()


def _dense_delta(layer: LoHaLayer) -> torch.Tensor:
    """ΔW in the base weight's own shape, built independently from the formula."""
    a = "default"
    w1a, w1b, w2a, w2b = (getattr(layer, f"hada_{n}")[a] for n in ("w1_a", "w1_b", "w2_a", "w2_b"))
    if a in layer.hada_t1:
        def rebuild(t, wa, wb):  # (r, r, k, l), (r, out), (r, in) -> (out, in, k, l)
            return torch.einsum("ijkl,ip,jq->pqkl", t, wa, wb)
        delta = rebuild(layer.hada_t1[a], w1a, w1b) * rebuild(layer.hada_t2[a], w2a, w2b)
    else:
        delta = (w1a @ w1b) * (w2a @ w2b)
    w = layer.base_layer.weight
    shape = w.t().shape if layer.ops.transposed else w.shape
    return delta.reshape(shape) * layer.scaling[a]


def test_face_splitting_identity():
    torch.manual_seed(0)
    w1a, w2a, w1b, w2b = torch.randn(7, 3), torch.randn(7, 3), torch.randn(3, 5), torch.randn(3, 5)
    u, v = face_split_rows(w1a, w2a), face_split_cols(w1b, w2b)
    assert u.shape == (7, 9) and v.shape == (9, 5)
    assert_close(u @ v, (w1a @ w1b) * (w2a @ w2b))
    assert torch.linalg.matrix_rank(u @ v) <= 9


@settings(max_examples=60, deadline=None)
@given(
    out_f=st.integers(1, 40), in_f=st.integers(1, 40), r=st.integers(1, 8), batch=st.integers(1, 4),
    mode=st.sampled_from(PATHS), adapt_only=st.booleans(), seed=st.integers(0, 2**16),
)
def test_linear_forward_equals_dense(out_f, in_f, r, batch, mode, adapt_only, seed):
    LoHaLayer.force_path = mode
    try:
        torch.manual_seed(seed)
        base = nn.Linear(in_f, out_f)
        layer = _layer(base, seed, r=r)
        if adapt_only:  # two adapters active: the engine adds each through adapt(), not the folded op
            layer.add_adapter("zero", LoHaConfig(r=1, target_modules=["x"]), r=1, alpha=1)
            layer.set_adapter(["default", "zero"])
        x = torch.randn(batch, 3, in_f)
        delta = _dense_delta(layer)
        with torch.no_grad():
            assert_close(layer(x), F.linear(x, base.weight + delta, base.bias), atol=1e-4, rtol=1e-4)
            assert_close(layer.delta_weight("default"), delta, atol=1e-5, rtol=1e-5)
    finally:
        LoHaLayer.force_path = None


@settings(max_examples=40, deadline=None)
@given(
    out_c=st.integers(1, 10), in_c=st.integers(1, 10), k=st.sampled_from([(1, 1), (3, 3), (1, 3), (2, 3)]),
    stride=st.integers(1, 2), padding=st.integers(0, 2), dilation=st.integers(1, 2), r=st.integers(1, 4),
    effective=st.booleans(), mode=st.sampled_from(PATHS), pad_mode=st.sampled_from(["zeros", "zeros", "reflect", "circular"]),
    seed=st.integers(0, 2**16),
)
def test_conv2d_forward_equals_dense(out_c, in_c, k, stride, padding, dilation, r, effective, mode, pad_mode, seed):
    LoHaLayer.force_path = mode
    try:
        torch.manual_seed(seed)
        base = nn.Conv2d(in_c, out_c, k, stride=stride, padding=padding, dilation=dilation, padding_mode=pad_mode)
        layer = _layer(base, seed, r=r, use_effective_conv2d=effective)
        x = torch.randn(2, in_c, 7, 8)
        delta = _dense_delta(layer)
        with torch.no_grad():
            expected = base._conv_forward(x, base.weight + delta, base.bias)
            assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)
            assert_close(layer(x[0]), expected[0], atol=1e-4, rtol=1e-4)  # unbatched input
    finally:
        LoHaLayer.force_path = None


@settings(max_examples=30, deadline=None)
@given(
    out_c=st.integers(1, 10), in_c=st.integers(1, 10), k=st.integers(1, 4), r=st.integers(1, 4),
    effective=st.booleans(), padding=st.integers(0, 2), mode=st.sampled_from(PATHS), seed=st.integers(0, 2**16),
)
def test_conv1d_forward_equals_dense(out_c, in_c, k, r, effective, padding, mode, seed):
    LoHaLayer.force_path = mode
    try:
        torch.manual_seed(seed)
        base = nn.Conv1d(in_c, out_c, k, padding=padding)
        layer = _layer(base, seed, r=r, use_effective_conv2d=effective)
        x = torch.randn(2, in_c, 9)
        delta = _dense_delta(layer)
        assert_close(layer.get_delta_weight("default"), delta, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            assert_close(layer(x), F.conv1d(x, base.weight + delta, base.bias, padding=padding), atol=1e-4, rtol=1e-4)
    finally:
        LoHaLayer.force_path = None


def test_grouped_conv_forms_delta_and_matches():
    base = nn.Conv2d(8, 6, 3, groups=2, padding=1)
    layer = _layer(base, r=2)
    assert layer.hada_w1_b["default"].shape == (2, 4 * 9)  # in_channels // groups
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        expected = F.conv2d(x, base.weight + _dense_delta(layer), base.bias, padding=1, groups=2)
        assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


KINDS = {
    "linear": (lambda: nn.Linear(12, 20), lambda: torch.randn(3, 4, 12), {}),
    "conv2d": (lambda: nn.Conv2d(6, 8, 3, padding=1, stride=2), lambda: torch.randn(2, 6, 5, 5), {}),
    "conv2d_cp": (lambda: nn.Conv2d(6, 8, 3, padding=1), lambda: torch.randn(2, 6, 5, 5), {"use_effective_conv2d": True}),
    "conv1d_cp": (lambda: nn.Conv1d(6, 10, 3, padding=1), lambda: torch.randn(2, 6, 7), {"use_effective_conv2d": True}),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_gradients_equal_dense_reference(kind, path):
    make_base, make_x, cfg = KINDS[kind]
    torch.manual_seed(0)
    base = make_base()
    base.weight.requires_grad_(True)  # the folded path also returns W's gradient
    layer = _layer(base, r=2, **cfg).train()
    x = make_x().requires_grad_(True)
    params = list(layer.adapter_parameters("default")) + [base.weight, base.bias]
    layer(x).square().sum().backward()
    got = [p.grad.clone() for p in params] + [x.grad.clone()]
    for p in params + [x]:
        p.grad = None
    delta = _dense_delta(layer)
    if kind == "linear":
        ref = F.linear(x, base.weight + delta, base.bias)
    else:
        ref = base._conv_forward(x, base.weight + delta, base.bias)
    ref.square().sum().backward()
    for g, p in zip(got, params + [x]):
        assert_close(g, p.grad, atol=1e-4, rtol=1e-4)


def test_peft_cp_backward_differs_from_autograd():
    """PEFT's hand-written CP backward gets the ``_a`` factors' gradients wrong; peftkit follows autograd."""
    torch.manual_seed(0)
    layer = _layer(nn.Conv2d(6, 8, 3, padding=1), r=2, use_effective_conv2d=True)
    names = ("hada_t1", "hada_w1_a", "hada_w1_b", "hada_t2", "hada_w2_a", "hada_w2_b")
    ps = [getattr(layer, n)["default"] for n in names]
    g = torch.randn(8, 6, 3, 3)
    (make_weight_cp(*ps, scale=torch.tensor(1.5)) * g).sum().backward()
    peft_grads = [p.grad.clone() for p in ps]
    for p in ps:
        p.grad = None
    (layer.delta_weight("default").view(8, 6, 3, 3) * g).sum().backward()
    for n, pg, p in zip(names, peft_grads, ps):
        if n.endswith("_a"):
            assert not torch.allclose(pg, p.grad, atol=1e-3)
        else:
            assert_close(pg, p.grad, atol=1e-4, rtol=1e-4)


def test_dense_path_keeps_no_out_by_in_tensor_for_backward(monkeypatch):
    """The folded forward saves x and the factors only: nothing of the weight's size waits for backward."""
    monkeypatch.setattr(LoHaLayer, "force_path", "dense")
    base = nn.Linear(64, 96)
    layer = _layer(base, r=2).train()
    x = torch.randn(5, 64)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    # (the base weight itself is referenced, not copied: it lives on anyway)
    new = [t.shape for t in saved if t.untyped_storage().data_ptr() != base.weight.untyped_storage().data_ptr()]
    assert new and all(s.numel() < 64 * 96 for s in new), new
    out.sum().backward()
    assert all(p.grad is not None for p in layer.adapter_parameters("default"))


def test_bypass_never_forms_delta(monkeypatch):
    monkeypatch.setattr(LoHaLayer, "force_path", "bypass")
    for make_base, make_x, cfg in KINDS.values():
        layer = _layer(make_base(), r=2, **cfg).train()

        def boom(*args, **kwargs):
            raise AssertionError("ΔW was formed in the bypass forward")

        with monkeypatch.context() as m:
            m.setattr(LoHaLayer, "delta_weight", boom)
            m.setattr(LoHaLayer, "_kernel_delta", boom)
            layer(make_x()).square().sum().backward()
        assert all(p.grad is not None for p in layer.adapter_parameters("default"))


def test_path_choice_by_cost():
    """Many tokens: folding ΔW into the base GEMM wins; a few (decoding): the thin products win."""
    layer = _layer(nn.Linear(512, 512), r=16)
    with torch.no_grad():
        assert not layer._bypass_is_cheaper("default", torch.zeros(512, 512), folded=True)
        assert layer._bypass_is_cheaper("default", torch.zeros(4, 512), folded=True)
    assert not layer._bypass_is_cheaper("default", torch.zeros(512, 512), folded=True)  # training
    small = _layer(nn.Linear(512, 1376), r=2)
    assert small._bypass_is_cheaper("default", torch.zeros(512, 512), folded=True)  # r² ≪ sizes


def test_transformers_conv1d_is_supported(path):
    from transformers.pytorch_utils import Conv1D

    base = Conv1D(20, 12)  # in 12 -> out 20, weight stored (12, 20)
    layer = _layer(base, r=2)
    x = torch.randn(2, 3, 12)
    delta = _dense_delta(layer)  # canonical (out, in)
    with torch.no_grad():
        assert_close(layer(x), x @ (base.weight + delta.t()) + base.bias, atol=1e-5, rtol=1e-5)
    assert layer.get_delta_weight("default").shape == base.weight.shape


def test_half_base_keeps_float32_adapter_and_output_dtype(path):
    base = nn.Linear(12, 20).to(torch.bfloat16)
    layer = _layer(base, r=2)
    assert all(p.dtype == torch.float32 for p in layer.adapter_parameters("default"))
    x = torch.randn(2, 12, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    expected = F.linear(x.float(), base.weight.float() + _dense_delta(layer), base.bias.float())
    assert_close(out.float(), expected, atol=0.1, rtol=0.05)


def test_rank_and_module_dropout_semantics(path):
    base = nn.Linear(12, 20)
    x = torch.randn(4, 12)
    layer = _layer(base, r=2, module_dropout=1.0).train()
    with torch.no_grad():
        assert_close(layer(x), base(x))
    # rank dropout keeps a feature's whole update or none of it, the kept ones scaled by 1 / kept fraction
    layer = _layer(base, r=2, rank_dropout=0.5)
    with torch.no_grad():
        full = layer(x) - base(x)
        layer.train()
        torch.manual_seed(3)
        dropped = layer(x) - base(x)
    torch.manual_seed(3)
    torch.rand(1)  # the module-dropout draw
    keep = (torch.rand(20) > 0.5).float()
    assert_close(dropped, full * keep / keep.mean(), atol=1e-5, rtol=1e-5)
    layer = _layer(base, r=2, rank_dropout=1.0).train()
    with torch.no_grad():
        assert_close(layer(x), base(x))  # all dropped: no update (PEFT: NaN)


def test_config_errors():
    with pytest.raises(ValueError, match="r must be a positive integer"):
        LoHaConfig(r=0)
    with pytest.raises(ValueError, match="init_weights"):
        LoHaConfig(init_weights="gaussian")
    with pytest.raises(ValueError, match="rank_dropout"):
        LoHaConfig(rank_dropout=1.5)
    with pytest.raises(ValueError, match="layers_pattern"):
        LoHaConfig(layers_pattern="layers")


def test_unsupported_bases_raise():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.c3 = nn.Conv3d(2, 2, 1)

    with pytest.raises(TypeError, match="emb"):
        peftkit.get_peft_model(M(), LoHaConfig(target_modules=["emb"]))
    with pytest.raises(TypeError, match="Conv3d"):
        peftkit.get_peft_model(M(), LoHaConfig(target_modules=["c3"]))


def test_rank_and_alpha_patterns_per_layer():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(16, 16)
            self.v = nn.Linear(16, 16)

    model = peftkit.get_peft_model(M(), LoHaConfig(r=1, alpha=2, target_modules=["q", "v"], rank_pattern={"v": 4}, alpha_pattern={"q": 6}))
    q, v = model.base_model.model.q, model.base_model.model.v
    assert (q.r["default"], q.scaling["default"]) == (1, 6.0)
    assert (v.r["default"], v.scaling["default"]) == (4, 0.5)
    assert q.hada_w1_a["default"].shape == (16, 1) and v.hada_w2_b["default"].shape == (4, 16)
