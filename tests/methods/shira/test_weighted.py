"""``add_weighted_adapter`` for SHiRA: the sparse deltas add up over the union of positions."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import peftkit

from .helpers import add, dense_reference, load, make, run, save, shira_config, shira_layers

NAME = "llama"
W = [0.7, -0.4]


@pytest.fixture
def two():
    model = make("peftkit", NAME, random_seed=0)
    add(model, NAME, "b", random_seed=7)
    for layer in shira_layers(model).values():
        layer.set_scale("b", 1.5)  # the scale is part of what is combined
    return model


def test_linear_combination_is_the_weighted_sum(two):
    two.add_weighted_adapter(["default", "b"], W, "c", combination_type="linear")
    assert "c" in two.peft_config
    deltas = {}
    for key, layer in shira_layers(two).items():
        expected = W[0] * layer.get_delta_weight("default") + W[1] * layer.get_delta_weight("b")
        got = layer.get_delta_weight("c")
        assert_close(got, expected, atol=1e-6, rtol=1e-6)
        # positions are the union of the two, in row-major order
        cols = layer.base_layer.weight.shape[1]
        union = torch.unique(torch.cat([
            layer.shira_indices[a][0].long() * cols + layer.shira_indices[a][1].long() for a in ("default", "b")
        ]))
        idx = layer.shira_indices["c"]
        assert idx.dtype == torch.int32 and torch.equal(idx[0].long() * cols + idx[1].long(), union), key
        assert layer.shira_weight["c"].shape == (union.numel(),)
        assert not layer.shira_weight["c"].requires_grad
        deltas[key] = expected
    two.set_adapter("c")
    assert_close(run(two, NAME), dense_reference(two, NAME, deltas), atol=1e-5, rtol=1e-5)


def test_combined_adapter_saves_and_loads(two, tmp_path):
    two.add_weighted_adapter(["default", "b"], W, "c")
    two.set_adapter("c")
    expected = run(two, NAME)
    save(two, tmp_path, selected_adapters=["c"])
    loaded = load("peftkit", NAME, tmp_path / "c")
    assert_close(run(loaded, NAME), expected)
    for key, layer in shira_layers(loaded).items():
        src = shira_layers(two)[key]
        assert torch.equal(layer.shira_indices["default"], src.shira_indices["c"])
        assert torch.equal(layer.shira_weight["default"], src.shira_weight["c"])
        m, n = layer.base_layer.weight.shape
        assert layer.shira_weight["default"].numel() != 2 * (m + n)  # the file decides the size
    # and into a model holding other adapters
    loaded.load_adapter(str(tmp_path / "c"), adapter_name="again")
    loaded.set_adapter("again")
    assert_close(run(loaded, NAME), expected)
    # merge of the combined adapter is exact too
    before = {k: v.clone() for k, v in loaded.get_base_model().state_dict().items()}
    loaded.merge_adapter()
    assert_close(run(loaded, NAME), expected, atol=1e-5, rtol=1e-5)
    loaded.unmerge_adapter()
    assert all(torch.equal(v, before[k]) for k, v in loaded.get_base_model().state_dict().items())


def test_one_adapter_and_repeated_adapters(two):
    two.add_weighted_adapter(["b"], [2.0], "twice_b")
    two.add_weighted_adapter(["default", "default"], [0.5, 0.5], "same")
    for layer in shira_layers(two).values():
        assert_close(layer.get_delta_weight("twice_b"), 2.0 * layer.get_delta_weight("b"))
        assert torch.equal(layer.shira_indices["same"], layer.shira_indices["default"])
        assert_close(layer.get_delta_weight("same"), layer.get_delta_weight("default"))


def test_bad_options_raise(two):
    with pytest.raises(ValueError, match="combination_type='linear'"):
        two.add_weighted_adapter(["default", "b"], W, "c", combination_type="svd")
    with pytest.raises(ValueError, match="do not apply"):
        two.add_weighted_adapter(["default", "b"], W, "c", density=0.5)
    with pytest.raises(ValueError):
        two.add_weighted_adapter(["default", "b"], [1.0], "c")
    with pytest.raises(ValueError, match="already exists"):
        two.add_weighted_adapter(["default", "b"], W, "b")
    two.add_adapter("other_targets", shira_config(peftkit, NAME, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="same target_modules"):
        two.add_weighted_adapter(["default", "other_targets"], W, "c")
    assert "c" not in two.peft_config
    assert all("c" not in layer.adapters for layer in shira_layers(two).values())


def test_combination_never_draws_a_mask(two, monkeypatch):
    import peftkit.methods.shira.layer as layer_mod

    def boom(*a, **k):
        raise AssertionError("mask drawn")

    monkeypatch.setattr(layer_mod, "random_indices", boom)
    rng = torch.get_rng_state()
    two.add_weighted_adapter(["default", "b"], W, "c")
    assert torch.equal(torch.get_rng_state(), rng)
