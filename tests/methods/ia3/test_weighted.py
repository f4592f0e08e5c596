"""``add_weighted_adapter`` for (IA)³: the weighted sum of the vectors, as PEFT computes it."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import peftkit

from .helpers import add, ia3_layers, make, run


@pytest.mark.parametrize("name", ["llama", "custom"])
def test_weighted_adapter_matches_peft(name):
    kit, ref = make("peftkit", name), make("peft", name)
    add(kit, "peftkit", name, "b")
    add(ref, "peft", name, "b")
    kit.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix")
    ref.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix")
    for key, layer in ia3_layers(kit).items():
        other = ia3_layers(ref)[key]
        expected = 0.7 * layer.ia3_l["default"] - 0.4 * layer.ia3_l["b"]
        assert_close(layer.ia3_l["mix"], expected.detach())
        assert_close(layer.ia3_l["mix"], other.ia3_l["mix"].detach())
        assert not layer.ia3_l["mix"].requires_grad
    kit.set_adapter("mix")
    ref.set_adapter("mix")
    assert_close(run(kit, name), run(ref.eval(), name), atol=1e-6, rtol=1e-6)


def test_weighted_union_of_targets():
    kit = make("peftkit", "llama", target_modules=["q_proj"], feedforward_modules=[])
    add(kit, "peftkit", "llama", "b", target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"])
    kit.add_weighted_adapter(["default", "b"], [2.0, 3.0], "mix")
    cfg = kit.peft_config["mix"]
    assert cfg.target_modules == {"q_proj", "v_proj", "down_proj"} and cfg.feedforward_modules == {"down_proj"}
    for key, layer in ia3_layers(kit).items():
        source = "default" if key.endswith("q_proj") else "b"
        w = 2.0 if source == "default" else 3.0
        assert_close(layer.ia3_l["mix"], w * layer.ia3_l[source].detach())


def test_weighted_refuses_options_and_mismatched_kinds():
    kit = make("peftkit", "llama", target_modules=["q_proj"], feedforward_modules=[])
    add(kit, "peftkit", "llama", "b", target_modules=["q_proj"], feedforward_modules=["q_proj"])
    with pytest.raises(ValueError, match="do not apply"):
        kit.add_weighted_adapter(["default", "b"], [1.0, 1.0], "x", combination_type="svd")
    with pytest.raises(ValueError, match="cannot be combined"):
        kit.add_weighted_adapter(["default", "b"], [1.0, 1.0], "y")
    assert "y" not in kit.peft_config
    assert isinstance(kit.base_model, peftkit.AdapterModel)
