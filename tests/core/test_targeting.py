"""Target matching follows PEFT's rules."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit
from peftkit.core.targeting import is_target, pattern_value


def cfg(**kw):
    return peftkit.LoraConfig(**kw)


@pytest.mark.parametrize(
    "targets,key,expected",
    [
        (["q_proj"], "model.layers.0.self_attn.q_proj", True),
        (["q_proj"], "q_proj", True),
        (["q_proj"], "model.layers.0.self_attn.xq_proj", False),
        (["self_attn.q_proj"], "model.layers.0.self_attn.q_proj", True),
        (r".*\.0\..*q_proj", "model.layers.0.self_attn.q_proj", True),
        (r".*\.0\..*q_proj", "model.layers.1.self_attn.q_proj", False),
        ("q_proj", "model.layers.0.self_attn.q_proj", False),  # a string is a full-match regex
    ],
)
def test_target_forms(targets, key, expected):
    assert is_target(cfg(target_modules=targets), key) is expected


def test_exclude_and_modules_to_save_win():
    c = cfg(target_modules=["q_proj", "score"], exclude_modules=["layers.1.self_attn.q_proj"], modules_to_save=["score"])
    assert is_target(c, "model.layers.0.self_attn.q_proj")
    assert not is_target(c, "model.layers.1.self_attn.q_proj")
    assert not is_target(c, "score")
    assert not is_target(cfg(target_modules=["q_proj"], exclude_modules=r".*layers\.0.*"), "model.layers.0.self_attn.q_proj")


def test_layers_to_transform_and_pattern():
    c = cfg(target_modules=["q_proj"], layers_to_transform=[1])
    assert not is_target(c, "model.layers.0.self_attn.q_proj")
    assert is_target(c, "model.layers.1.self_attn.q_proj")
    c = cfg(target_modules=["q_proj"], layers_to_transform=0, layers_pattern="layers")
    assert is_target(c, "model.layers.0.experts.3.q_proj")
    assert not is_target(c, "model.layers.2.experts.0.q_proj")


def test_pattern_first_match_wins():
    pattern = {"q_proj": 2, r"layers\.0\.self_attn\.q_proj": 16}
    assert pattern_value(pattern, "model.layers.0.self_attn.q_proj", 8) == 2
    assert pattern_value(pattern, "model.layers.0.self_attn.v_proj", 8) == 8


def test_all_linear_skips_the_head_and_default_targets():
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32)
    model = peftkit.get_peft_model(LlamaForCausalLM(config), cfg(target_modules="all-linear"))
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, peftkit.LoraLayer)}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    model = peftkit.get_peft_model(LlamaForCausalLM(config), cfg())
    assert model.peft_config["default"].target_modules == {"q_proj", "v_proj"}


def test_rank_pattern_sets_per_layer_rank():
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=32)
    model = peftkit.get_peft_model(
        LlamaForCausalLM(config),
        cfg(r=4, target_modules=["q_proj"], rank_pattern={r"layers\.1\.self_attn\.q_proj": 2}, alpha_pattern={"q_proj": 3}),
    )
    layers = model.base_model.model.model.layers
    assert layers[0].self_attn.q_proj.r["default"] == 4
    assert layers[1].self_attn.q_proj.r["default"] == 2
    assert layers[1].self_attn.q_proj.scaling["default"] == 3 / 2
