"""(IA)³ layer math: forward as a merged weight, merge/unmerge, several adapters, mixed batches, kinds."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close
from transformers.pytorch_utils import Conv1D

import peftkit

from .helpers import quiet


def _wrap(layer: nn.Module, feedforward: bool, init: bool = False, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    model = nn.Sequential(layer)
    reference = copy.deepcopy(model)
    torch.manual_seed(seed)
    cfg = peftkit.IA3Config(target_modules=["0"], feedforward_modules=["0"] if feedforward else [],
                            init_ia3_weights=init)
    return quiet(peftkit.get_peft_model, model, cfg).eval(), reference


def _vec(model: nn.Module, adapter: str = "default") -> torch.Tensor:
    return model.base_model.model[0].ia3_l[adapter].detach().reshape(-1)


# ---------------------------------------------------------------------------- property: forward == merged weight
@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["linear", "conv1d"]),
    fan_in=st.integers(1, 24),
    fan_out=st.integers(1, 24),
    feedforward=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_forward_equals_linear_with_scaled_weight(kind, fan_in, fan_out, feedforward, bias, seed):
    """``forward(x) == F.linear(x, W + ΔW, b')`` with ``W + ΔW = W ⊙ l`` (rows or columns) and b' = b ⊙ l
    for output scaling, b for input scaling."""
    torch.manual_seed(seed)
    layer = nn.Linear(fan_in, fan_out, bias=bias) if kind == "linear" else Conv1D(fan_out, fan_in)
    model, _ = _wrap(layer, feedforward, seed=seed)
    ia3 = model.base_model.model[0]
    w = ia3.ops.weight2d(ia3.base_layer).detach()  # canonical (out, in)
    b = getattr(ia3.base_layer, "bias", None)
    l = _vec(model)
    x = torch.randn(2, 3, fan_in)
    delta = ia3.delta_weight("default")
    if feedforward:
        assert_close(w + delta, w * l.view(1, -1))
        expected = F.linear(x, w + delta, b)
    else:
        assert_close(w + delta, w * l.view(-1, 1))
        expected = F.linear(x, w + delta, None if b is None else b * l)
    assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    # the same through the engine's merge, and back
    before = {k: v.clone() for k, v in ia3.base_layer.state_dict().items()}
    model.merge_adapter()
    assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    if bool((l.abs() > 1e-3).all()):
        model.unmerge_adapter()
        for k, v in ia3.base_layer.state_dict().items():
            assert_close(v, before[k], atol=1e-5, rtol=1e-4)


def test_get_delta_weight_in_base_layout():
    model, _ = _wrap(Conv1D(6, 4), feedforward=True)
    ia3 = model.base_model.model[0]
    w = ia3.base_layer.weight.detach()  # (in, out)
    assert_close(ia3.get_delta_weight("default"), w * _vec(model).view(-1, 1) - w)


# ---------------------------------------------------------------------------- convolutions
CONVS = {
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), (2, 4, 7)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1), (2, 4, 5, 5)),
    "conv2d_groups": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (2, 4, 5, 5)),
    "conv3d": (lambda: nn.Conv3d(4, 6, (1, 3, 3), bias=False), (2, 4, 2, 5, 5)),
}


@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "input"])
@pytest.mark.parametrize("conv", list(CONVS))
def test_conv_scaling_and_merge(conv, feedforward):
    build, shape = CONVS[conv]
    torch.manual_seed(0)
    model, reference = _wrap(build(), feedforward)
    ia3 = model.base_model.model[0]
    dim = ia3.ops.conv_dim
    channels = 4 if feedforward else 6
    assert tuple(ia3.ia3_l["default"].shape) == (1, channels) + (1,) * dim
    l = _vec(model).view(channels, *([1] * dim))
    x = torch.randn(shape)
    expected = reference(x * l) if feedforward else reference(x) * l
    out = model(x)
    assert_close(out, expected, atol=1e-5, rtol=1e-5)
    weights = {k: v.clone() for k, v in ia3.base_layer.state_dict().items()}
    model.merge_adapter()
    assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    quiet(model.unmerge_adapter)
    for k, v in ia3.base_layer.state_dict().items():
        assert_close(v, weights[k], atol=1e-6, rtol=1e-5)
    assert_close(model(x), out)


# ---------------------------------------------------------------------------- several adapters
def test_active_adapters_multiply_and_mix_kinds():
    """An output-scaling and an input-scaling adapter on one layer compose: ``l_out ⊙ W (l_in ⊙ x)``."""
    torch.manual_seed(0)
    layer = nn.Linear(5, 7)
    model, reference = _wrap(layer, feedforward=False)
    torch.manual_seed(3)
    quiet(model.add_adapter, "ff", peftkit.IA3Config(target_modules=["0"], feedforward_modules=["0"],
                                                     init_ia3_weights=False))
    torch.manual_seed(4)
    quiet(model.add_adapter, "out2", peftkit.IA3Config(target_modules=["0"], feedforward_modules=[],
                                                       init_ia3_weights=False))
    model.eval()
    model.base_model.set_adapter(["default", "ff", "out2"])
    x = torch.randn(3, 5)
    l_out = _vec(model, "default") * _vec(model, "out2")
    expected = reference(x * _vec(model, "ff")) * l_out
    assert_close(model(x), expected, atol=1e-6, rtol=1e-6)
    model.merge_adapter()
    assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    quiet(model.unmerge_adapter)
    assert_close(model(x), expected, atol=1e-6, rtol=1e-6)


def test_mixed_batch_vectorised_and_per_sample():
    torch.manual_seed(0)
    model, reference = _wrap(nn.Linear(5, 7), feedforward=False)
    torch.manual_seed(3)
    quiet(model.add_adapter, "ff", peftkit.IA3Config(target_modules=["0"], feedforward_modules=["0"],
                                                     init_ia3_weights=False))
    model.eval()
    x = torch.randn(4, 2, 5)
    names = ["ff", "default", "__base__", "ff"]
    out = model(x, adapter_names=names)
    expected = torch.stack([
        reference(x[0] * _vec(model, "ff")), reference(x[1]) * _vec(model, "default"), reference(x[2]),
        reference(x[3] * _vec(model, "ff")),
    ])
    assert_close(out, expected, atol=1e-6, rtol=1e-6)
    assert_close(out[2], reference(x[2]), atol=1e-6, rtol=1e-6)  # base rows: scaled by exact ones


def test_mixed_batch_refused_while_merged():
    model, _ = _wrap(nn.Linear(5, 7), feedforward=False)
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        model(torch.randn(2, 5), adapter_names=["default", "default"])


# ---------------------------------------------------------------------------- unmerge by ~0, safe merge
@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "input"])
def test_unmerge_by_zero_raises_and_keeps_model(feedforward):
    model, _ = _wrap(nn.Linear(5, 7), feedforward)
    ia3 = model.base_model.model[0]
    with torch.no_grad():
        ia3.ia3_l["default"].view(-1)[1] = 0.0
    x = torch.randn(3, 5)
    out = model(x)
    model.merge_adapter()
    merged = {k: v.clone() for k, v in ia3.base_layer.state_dict().items()}
    assert_close(model(x), out, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match=r"Cannot unmerge \(IA\)³ adapter 'default'.*inf/NaN"):
        model.unmerge_adapter()
    assert ia3.merged_adapters == ["default"]
    for k, v in ia3.base_layer.state_dict().items():
        assert torch.equal(v, merged[k])
        assert torch.isfinite(v).all()
    with pytest.raises(ValueError, match="Cannot unmerge"):
        model.disable_adapter_layers()
    merged_model = model.merge_and_unload()  # merging for good is fine
    assert_close(merged_model(x), out, atol=1e-6, rtol=1e-6)


def test_safe_merge_refuses_non_finite_and_changes_nothing():
    model, _ = _wrap(nn.Linear(5, 7), feedforward=False)
    ia3 = model.base_model.model[0]
    with torch.no_grad():
        ia3.ia3_l["default"].view(-1)[0] = float("inf")
    before = {k: v.clone() for k, v in ia3.base_layer.state_dict().items()}
    with pytest.raises(ValueError, match="NaN/inf"):
        model.merge_adapter(safe_merge=True)
    assert not ia3.merged_adapters
    for k, v in ia3.base_layer.state_dict().items():
        assert torch.equal(v, before[k])


def test_merge_unmerge_keeps_bias_for_input_scaling():
    model, _ = _wrap(nn.Linear(5, 7), feedforward=True)
    bias = model.base_model.model[0].base_layer.bias.detach().clone()
    model.merge_adapter()
    assert torch.equal(model.base_model.model[0].base_layer.bias, bias)


# ---------------------------------------------------------------------------- dtypes, training, kinds
def test_half_precision_base_follows_peft_dtypes():
    import peft

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)).to(torch.bfloat16)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    models = []
    for lib in (peftkit, peft):
        torch.manual_seed(1)
        cfg = lib.IA3Config(target_modules=["0", "2"], feedforward_modules=["2"], init_ia3_weights=False)
        model = quiet(lib.get_peft_model, copy.deepcopy(base), cfg).eval()
        assert model.base_model.model[0].ia3_l["default"].dtype == torch.float32
        models.append(model)
    # PEFT's random init passes through the base dtype; give both the same vectors
    models[0].load_state_dict(models[1].state_dict())
    outs = [m(x) for m in models]
    assert outs[0].dtype == torch.bfloat16
    assert torch.equal(outs[0], outs[1])


def test_gradients_reach_only_ia3_vectors():
    model, _ = _wrap(nn.Linear(5, 7), feedforward=True)
    model.train()
    model(torch.randn(3, 5)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert list(grads) == ["base_model.model.0.ia3_l.default"]
    assert grads["base_model.model.0.ia3_l.default"].abs().sum() > 0


def test_embedding_target_is_refused():
    model = nn.Sequential(nn.Embedding(10, 4))
    with pytest.raises(TypeError, match="Target module 0 is a Embedding"):
        quiet(peftkit.get_peft_model, model, peftkit.IA3Config(target_modules=["0"], feedforward_modules=[]))


def test_identity_at_init():
    model, reference = _wrap(nn.Linear(5, 7), feedforward=False, init=True)
    x = torch.randn(3, 5)
    assert torch.equal(model(x), reference(x))
