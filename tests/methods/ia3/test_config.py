"""``IA3Config``: PEFT's fields and checks, and the feed-forward defaults."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

import peftkit
from peftkit.methods.ia3 import DEFAULT_FEEDFORWARD, DEFAULT_TARGETS

from .helpers import build, quiet


def test_lists_become_sets_and_peft_type():
    cfg = peftkit.IA3Config(target_modules=["a", "b"], exclude_modules=["c"], feedforward_modules=["b"])
    assert cfg.peft_type == "IA3"
    assert cfg.target_modules == {"a", "b"} and cfg.exclude_modules == {"c"} and cfg.feedforward_modules == {"b"}


def test_feedforward_must_be_subset_of_targets():
    with pytest.raises(ValueError, match="subset of target_modules"):
        peftkit.IA3Config(target_modules=["a"], feedforward_modules=["b"])
    with pytest.raises(ValueError):  # the oracle agrees
        peft.IA3Config(target_modules=["a"], feedforward_modules=["b"])
    peftkit.IA3Config(target_modules="a|b", feedforward_modules=["b"])  # regex targets: not checked, as PEFT


def test_init_weights_must_be_bool():
    with pytest.raises(ValueError, match="init_ia3_weights"):
        peftkit.IA3Config(target_modules=["a"], init_ia3_weights="ones")


def test_default_tables_match_peft():
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as PEFT_FF,
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as PEFT_TARGETS,
    )

    assert {k: sorted(v) for k, v in DEFAULT_TARGETS.items()} == {k: sorted(v) for k, v in PEFT_TARGETS.items()}
    assert {k: sorted(v) for k, v in DEFAULT_FEEDFORWARD.items()} == {
        k: sorted(v) for k, v in PEFT_FF.items() if k in PEFT_TARGETS
    }


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "t5"])
def test_defaults_fill_targets_and_feedforward_like_peft(name):
    kit = quiet(peftkit.get_peft_model, build(name), peftkit.IA3Config())
    ref = quiet(peft.get_peft_model, build(name), peft.IA3Config())
    for field in ("target_modules", "feedforward_modules"):
        assert set(getattr(kit.peft_config["default"], field)) == set(getattr(ref.peft_config["default"], field))
    kit_ff = {n: m.is_feedforward for n, m in kit.get_base_model().named_modules() if isinstance(m, peftkit.IA3Layer)}
    ref_ff = {n: m.is_feedforward for n, m in ref.get_base_model().named_modules()
              if isinstance(m, peft.tuners.ia3.IA3Layer)}
    assert kit_ff == ref_ff and any(kit_ff.values())


def test_missing_feedforward_without_default_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4))
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="feedforward_modules is not set"):
        quiet(peftkit.get_peft_model, model, peftkit.IA3Config(target_modules=["0"]))
    assert isinstance(model[0], nn.Linear)  # left as it was
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="feedforward_modules"):  # PEFT refuses too
        quiet(peft.get_peft_model, nn.Sequential(nn.Linear(4, 4)), peft.IA3Config(target_modules=["0"]))


def test_feedforward_regex_is_a_full_match():
    model = quiet(peftkit.get_peft_model, build("llama"),
                  peftkit.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=r".*\.mlp\.down_proj"))
    flags = {n.rsplit(".", 1)[-1]: m.is_feedforward for n, m in model.get_base_model().named_modules()
             if isinstance(m, peftkit.IA3Layer)}
    assert flags == {"q_proj": False, "down_proj": True}


def test_exclude_modules():
    model = quiet(peftkit.get_peft_model, build("llama"),
                  peftkit.IA3Config(target_modules=["q_proj"], feedforward_modules=[],
                                    exclude_modules=["model.layers.1.self_attn.q_proj"]))
    names = [n for n, m in model.get_base_model().named_modules() if isinstance(m, peftkit.IA3Layer)]
    assert names == ["model.layers.0.self_attn.q_proj"]


def test_explicit_targets_take_the_model_types_feedforward_default_like_peft():
    cfg = {"target_modules": ["k_proj", "v_proj", "down_proj"]}
    kit = quiet(peftkit.get_peft_model, build("llama"), peftkit.IA3Config(**cfg))
    ref = quiet(peft.get_peft_model, build("llama"), peft.IA3Config(**cfg))
    assert set(kit.peft_config["default"].feedforward_modules) == set(ref.peft_config["default"].feedforward_modules)
