"""Property tests: for random shapes, ranks and alphas the engine's invariants hold."""

from __future__ import annotations

import copy

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close

import peftkit
from peftkit.core.base_ops import ops_for

shapes = st.tuples(st.integers(1, 24), st.integers(1, 24))


def _model(kind: str, fan_in: int, fan_out: int) -> nn.Module:
    if kind == "linear":
        layer = nn.Linear(fan_in, fan_out)
    elif kind == "conv1d":
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(fan_out, fan_in)
    else:
        layer = nn.Embedding(fan_in + 1, fan_out)
    return nn.Sequential(layer)


def _input(kind: str, fan_in: int) -> torch.Tensor:
    if kind == "embedding":
        return torch.randint(0, fan_in + 1, (2, 3))
    return torch.randn(2, 3, fan_in)


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["linear", "conv1d", "embedding"]),
    shape=shapes,
    r=st.integers(1, 8),
    alpha=st.floats(0.5, 32),
    rslora=st.booleans(),
    dora=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_merge_unmerge_and_merged_equals_unmerged(kind, shape, r, alpha, rslora, dora, seed):
    torch.manual_seed(seed)
    fan_in, fan_out = shape
    model = peftkit.get_peft_model(
        _model(kind, fan_in, fan_out),
        peftkit.LoraConfig(
            r=r, lora_alpha=alpha, use_rslora=rslora, use_dora=dora, target_modules=["0"], init_lora_weights=False
        ),
    )
    x = _input(kind, fan_in)
    layer = model.base_model.model[0]
    weight = layer.base_layer.weight.detach().clone()
    out = model(x)
    model.merge_adapter()
    assert_close(model(x), out, atol=1e-4, rtol=1e-4)
    model.unmerge_adapter()
    assert_close(layer.base_layer.weight, weight, atol=1e-5, rtol=1e-5)
    # the delta in the base layer's own layout is exactly what merging adds
    delta = layer.get_delta_weight("default")
    assert delta.shape == weight.shape
    scale = alpha / (r**0.5 if rslora else r)
    assert abs(layer.scaling["default"] - scale) < 1e-9
    assert ops_for(layer.base_layer) is not None


@settings(max_examples=15, deadline=None)
@given(kind=st.sampled_from(["linear", "conv1d", "embedding"]), shape=shapes, r=st.integers(1, 6), seed=st.integers(0, 999))
def test_save_load_roundtrip(tmp_path_factory, kind, shape, r, seed):
    torch.manual_seed(seed)
    fan_in, fan_out = shape
    base = _model(kind, fan_in, fan_out)
    fresh = copy.deepcopy(base)
    model = peftkit.get_peft_model(base, peftkit.LoraConfig(r=r, target_modules=["0"], init_lora_weights=False))
    x = _input(kind, fan_in)
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path)
    loaded = peftkit.PeftModel.from_pretrained(fresh, path)
    assert_close(loaded(x), model(x))


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(["linear", "conv1d"]),
    shape=shapes,
    r=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    random_seed=st.one_of(st.none(), st.integers(0, 2**31)),
    scale=st.sampled_from([1.0, 0.5, 2.0]),
)
def test_shira_merge_unmerge_exact_and_merged_equals_unmerged(kind, shape, r, seed, random_seed, scale):
    fan_in, fan_out = shape
    r = min(r, fan_in * fan_out // (fan_in + fan_out))  # r·(m+n) entries must fit in the weight
    assume(r >= 1)
    torch.manual_seed(seed)
    model = peftkit.get_peft_model(
        _model(kind, fan_in, fan_out),
        peftkit.ShiraConfig(r=r, random_seed=random_seed, target_modules=["0"], init_weights=False),
    )
    layer = model.base_model.model[0]
    layer.set_scale("default", scale)
    idx = layer.shira_indices["default"]
    weight = layer.base_layer.weight
    assert idx.shape == (2, r * (fan_in + fan_out))
    assert int(idx[0].max()) < weight.shape[0] and int(idx[1].max()) < weight.shape[1]
    flat = idx[0].long() * weight.shape[1] + idx[1].long()
    assert torch.equal(flat, torch.unique(flat))
    original = weight.detach().clone()
    x = _input(kind, fan_in)
    out = model(x)
    model.merge_adapter()
    assert_close(model(x), out, atol=1e-5, rtol=1e-5)
    delta = layer.get_delta_weight("default")
    assert delta.shape == weight.shape
    assert_close(weight.detach(), original + delta, atol=1e-6, rtol=1e-6)
    model.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight, original)  # exact, not W + d - d
    assert_close(model(x), out)
