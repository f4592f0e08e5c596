"""Merging SHiRA adapters: exact unmerge, merged == unmerged, several adapters, swaps, safe merge, unload."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.testing import assert_close

import peftkit

from .helpers import add, assert_equal_tensors, base_weights, build, make, run, shira_layers

NAME = "llama"


@pytest.fixture
def two():
    """A llama with adapters "default" (seed 0) and "b" (seed 7): overlapping positions in every layer."""
    model = make("peftkit", NAME, random_seed=0)
    add(model, NAME, "b", random_seed=7)
    return model


def test_positions_of_the_two_adapters_overlap(two):
    for key, layer in shira_layers(two).items():
        w = layer.base_layer.weight
        fa = set((layer.shira_indices["default"][0].long() * w.shape[1] + layer.shira_indices["default"][1]).tolist())
        fb = set((layer.shira_indices["b"][0].long() * w.shape[1] + layer.shira_indices["b"][1]).tolist())
        assert fa & fb and fa != fb, key  # so that stacking and swapping test something


def test_merge_unmerge_is_exact_and_merged_equals_unmerged(two):
    before = base_weights(two)
    out = run(two, NAME)
    two.merge_adapter()
    merged = base_weights(two)
    assert any(not torch.equal(merged[k], before[k]) for k in before)
    assert_close(run(two, NAME), out, atol=1e-5, rtol=1e-5)
    two.unmerge_adapter()
    assert_equal_tensors(base_weights(two), before)
    assert_close(run(two, NAME), out)
    # merged weights are exactly W + v at the positions, nothing else
    for key, layer in shira_layers(two).items():
        w = before[key + ".weight"].clone()
        idx = layer.shira_indices["default"].long()
        w[idx[0], idx[1]] += layer.shira_weight["default"].detach()
        assert torch.equal(merged[key + ".weight"], w), key


def test_merging_several_adapters(two):
    before = base_weights(two)
    two.set_adapter(["default", "b"])
    out = run(two, NAME)
    two.merge_adapter()
    assert all(layer.merged_adapters == ["default", "b"] for layer in shira_layers(two).values())
    assert_close(run(two, NAME), out, atol=1e-5, rtol=1e-5)
    two.unmerge_adapter()
    assert_equal_tensors(base_weights(two), before)
    # one after the other, by name
    two.merge_adapter(adapter_names=["b"])
    two.merge_adapter(adapter_names=["default"])
    assert_close(run(two, NAME), out, atol=1e-5, rtol=1e-5)
    two.unmerge_adapter()
    assert_equal_tensors(base_weights(two), before)


def test_merge_with_scale(two):
    before = base_weights(two)
    for layer in shira_layers(two).values():
        layer.set_scale("default", 0.3)
    out = run(two, NAME)
    two.merge_adapter()
    assert_close(run(two, NAME), out, atol=1e-5, rtol=1e-5)
    two.unmerge_adapter()
    assert_equal_tensors(base_weights(two), before)


def test_swap_merged_adapter(two):
    before = base_weights(two)
    two.set_adapter("b")
    out_b = run(two, NAME)
    two.set_adapter("default")
    two.merge_adapter()
    merged_a = base_weights(two)
    # the reference: unmerge, set_adapter, merge on a copy
    ref = copy.deepcopy(two)
    ref.unmerge_adapter()
    ref.set_adapter("b")
    ref.merge_adapter()
    two.base_model.swap_merged_adapter("b")
    assert_equal_tensors(base_weights(two), base_weights(ref))
    assert two.active_adapters == ["b"]
    assert all(layer.merged_adapters == ["b"] for layer in shira_layers(two).values())
    assert_close(run(two, NAME), out_b, atol=1e-5, rtol=1e-5)
    two.base_model.swap_merged_adapter("default")
    assert_equal_tensors(base_weights(two), merged_a)  # exact on return
    two.unmerge_adapter()
    assert_equal_tensors(base_weights(two), before)


def test_swap_from_several_merged(two):
    before = base_weights(two)
    two.set_adapter(["default", "b"])
    two.merge_adapter()
    two.base_model.swap_merged_adapter("b")
    ref = copy.deepcopy(two)
    ref.unmerge_adapter()
    assert_equal_tensors(base_weights(ref), before)
    ref.merge_adapter()
    assert_equal_tensors(base_weights(two), base_weights(ref))


def test_safe_merge_with_nan_raises_and_changes_nothing(two):
    layer = next(iter(shira_layers(two).values()))
    with torch.no_grad():
        layer.shira_weight["b"][3] = float("nan")
    before = base_weights(two)
    two.set_adapter(["default", "b"])
    with pytest.raises(ValueError, match="NaN"):
        two.merge_adapter(safe_merge=True)
    assert_equal_tensors(base_weights(two), before)
    assert not any(layer.merged for layer in shira_layers(two).values())
    with pytest.raises(ValueError, match="NaN"):
        two.merge_and_unload(safe_merge=True)
    assert_equal_tensors(base_weights(two), before)
    assert len(shira_layers(two)) == 8  # still wrapped
    two.merge_adapter(adapter_names=["default"], safe_merge=True)  # the sound one merges
    assert all(layer.merged_adapters == ["default"] for layer in shira_layers(two).values())


def test_merge_and_unload_options(two):
    two.set_adapter("b")
    expected = run(two, NAME)
    two.set_adapter("default")
    plain = two.merge_and_unload(progressbar=True, safe_merge=True, adapter_names=["b"])
    assert not any(isinstance(m, peftkit.ShiraLayer) for m in plain.modules())
    assert not hasattr(plain, "peft_config")
    assert set(plain.state_dict()) == set(build(NAME).state_dict())
    assert_close(run(plain, NAME), expected, atol=1e-5, rtol=1e-5)


def test_merge_and_unload_default_and_unload():
    model = make("peftkit", NAME)
    expected = run(model, NAME)
    merged = copy.deepcopy(model).merge_and_unload()
    assert not any(isinstance(m, peftkit.ShiraLayer) for m in merged.modules())
    assert_close(run(merged, NAME), expected, atol=1e-5, rtol=1e-5)
    model.merge_adapter()
    plain = model.unload()  # unmerges first
    reference = build(NAME)
    assert not any(isinstance(m, peftkit.ShiraLayer) for m in plain.modules())
    assert_equal_tensors(dict(plain.state_dict()), dict(reference.state_dict()))


def test_delete_adapter_removes_every_trace(two, tmp_path):
    layers = shira_layers(two)
    two.set_adapter("b")
    two.merge_adapter()
    with pytest.raises(ValueError, match="unmerge"):
        two.delete_adapter("b")
    two.unmerge_adapter()
    two.set_adapter("default")
    out_default = run(two, NAME)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        two.delete_adapter("b")
    assert list(two.peft_config) == ["default"]
    for key, layer in layers.items():
        for attr in ("shira_weight", "shira_indices", "r", "scaling", "_patterns", "_merge_saved"):
            assert "b" not in getattr(layer, attr), (key, attr)
        assert layer.adapters == ["default"]
    assert not any(".b." in k or k.endswith(".b") for k in two.state_dict())
    assert not any(".b" in n for n, _ in two.named_buffers())
    assert_close(run(two, NAME), out_default)
    two.save_pretrained(str(tmp_path))
    assert not (tmp_path / "b").exists()
    two.delete_adapter("default")
    assert two.peft_config == {}
    assert not any(isinstance(m, peftkit.ShiraLayer) for m in two.modules())
    assert_close(run(two, NAME), run(build(NAME), NAME))


def test_disable_adapter_equals_base(two):
    base_out = run(build(NAME), NAME)
    with two.disable_adapter():
        assert torch.equal(run(two, NAME), base_out)
    assert not torch.allclose(run(two, NAME), base_out)
    # disabling a merged model unmerges it (exactly)
    before = base_weights(two)
    two.merge_adapter()
    with two.disable_adapter():
        assert torch.equal(run(two, NAME), base_out)
        assert_equal_tensors(base_weights(two), before)


def test_get_delta_weight_is_the_sparse_update(two):
    for key, layer in shira_layers(two).items():
        delta = layer.get_delta_weight("b")
        w = layer.base_layer.weight
        assert delta.shape == w.shape and delta.dtype == torch.float32
        idx = layer.shira_indices["b"].long()
        expected = torch.zeros_like(w).index_put_((idx[0], idx[1]), layer.shira_weight["b"].detach())
        assert torch.equal(delta, expected), key
