"""The same config selects the same modules, with the same rank and scaling, in both libraries."""

from __future__ import annotations

import warnings

import pytest

import peft
import peftkit
from _helpers import MODELS, build, lora_config, lora_modules, lora_ranks

LIBS = {"peft": peft, "peftkit": peftkit}


def _selected(name: str, **overrides) -> dict[str, dict[str, tuple[int, float]]]:
    out = {}
    for lib_name, lib in LIBS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.get_peft_model(build(name), lora_config(lib, name, **overrides))
        out[lib_name] = lora_ranks(model)
        assert set(lora_modules(model)) == set(out[lib_name])
    return out


def _assert_same(name: str, expect_some: bool = True, **overrides) -> dict[str, tuple[int, float]]:
    sel = _selected(name, **overrides)
    only_peft = sorted(set(sel["peft"]) - set(sel["peftkit"]))
    only_kit = sorted(set(sel["peftkit"]) - set(sel["peft"]))
    assert not only_peft and not only_kit, f"only in peft: {only_peft}; only in peftkit: {only_kit}"
    assert sel["peftkit"] == sel["peft"]  # same (r, scaling) per module
    if expect_some:
        assert sel["peft"]
    return sel["peft"]


CASES = {
    "llama": {
        "list": {"target_modules": ["q_proj", "v_proj"]},
        "full_name": {"target_modules": ["model.layers.1.self_attn.k_proj", "gate_proj"]},
        "regex": {"target_modules": r".*layers\.1\.self_attn\.(q|k)_proj"},
        "regex_mlp": {"target_modules": r"model\.layers\.\d+\.mlp\..*_proj"},
        "all_linear": {"target_modules": "all-linear"},
        "ALL_LINEAR_upper": {"target_modules": "ALL-LINEAR"},
        "exclude_list": {"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["model.layers.0.self_attn.q_proj"]},
        "exclude_suffix": {"target_modules": "all-linear", "exclude_modules": ["down_proj", "o_proj"]},
        "exclude_regex": {"target_modules": "all-linear", "exclude_modules": r".*\.mlp\..*"},
        "layers_pattern": {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
        "layers_pattern_list": {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": ["h", "layers"]},
        "layers_int": {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": 0},
        "layers_no_pattern": {"target_modules": ["v_proj", "down_proj"], "layers_to_transform": [1]},
        "layers_empty": {"target_modules": ["v_proj"], "layers_to_transform": []},
        "rank_alpha": {"target_modules": "all-linear", "rank_pattern": {"q_proj": 2, r"layers\.1\.mlp\.down_proj": 7},
                       "alpha_pattern": {"v_proj": 3, r"model\.layers\.0\..*": 11}},
        "rank_first_key_wins": {"target_modules": ["v_proj", "o_proj"],
                                "rank_pattern": {"v_proj": 2, r"layers\.1\.self_attn\.v_proj": 6, r".*_proj": 5}},
        "rank_rslora": {"target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 16}, "use_rslora": True},
        "default_targets": {"target_modules": None},
        "dotted_suffix": {"target_modules": ["self_attn.q_proj", "mlp.down_proj", "layers.0.mlp.up_proj"]},
        "partial_suffix_no_match": {"target_modules": ["proj", "_proj"]},  # neither is a whole name segment
        "layers_pattern_absent": {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "blocks"},
        "layers_out_of_range": {"target_modules": ["q_proj"], "layers_to_transform": [5]},
        "exclude_everything": {"target_modules": ["q_proj"], "exclude_modules": ["q_proj"]},
    },
    "gpt2": {
        "list": {"target_modules": ["c_attn", "c_fc"]},
        "regex": {"target_modules": r"transformer\.h\.0\..*c_proj"},
        "all_linear": {"target_modules": "all-linear"},
        "exclude_list": {"target_modules": ["c_proj"], "exclude_modules": ["mlp.c_proj"]},
        "layers_pattern": {"target_modules": ["c_attn", "c_proj"], "layers_to_transform": [1], "layers_pattern": "h"},
        "layers_no_pattern": {"target_modules": ["c_attn"], "layers_to_transform": [0]},
        "rank_alpha": {"target_modules": "all-linear", "rank_pattern": {r"mlp\.c_proj": 3}, "alpha_pattern": {"c_attn": 1}},
        "default_targets": {"target_modules": None},
    },
    "bert": {
        "list": {"target_modules": ["query", "key", "dense"]},
        "regex": {"target_modules": r"bert\.encoder\.layer\.1\.attention\.self\.(query|key)"},
        "all_linear": {"target_modules": "all-linear"},
        "exclude_regex": {"target_modules": ["dense"], "exclude_modules": r".*\.output\.dense"},
        "layers_pattern": {"target_modules": ["query", "dense"], "layers_to_transform": [0], "layers_pattern": "layer"},
        "layers_no_pattern": {"target_modules": ["value"], "layers_to_transform": [1]},
        "modules_to_save_excludes": {"target_modules": ["dense"], "modules_to_save": ["pooler"]},
        "rank_alpha": {"target_modules": ["query", "value"], "rank_pattern": {"value": 6}, "alpha_pattern": {r"layer\.0\..*": 2}},
        "default_targets": {"target_modules": None},
    },
    "t5": {
        "list": {"target_modules": ["q", "v", "wi"]},
        "regex": {"target_modules": r"decoder\.block\.\d+\.layer\.1\.EncDecAttention\.(k|v)"},
        "all_linear": {"target_modules": "all-linear"},
        "exclude_list": {"target_modules": ["q", "k", "v"], "exclude_modules": ["EncDecAttention.q", "EncDecAttention.k"]},
        "layers_pattern": {"target_modules": ["q", "o"], "layers_to_transform": [1], "layers_pattern": "block"},
        "layers_pattern_inner": {"target_modules": ["q", "o"], "layers_to_transform": [1], "layers_pattern": "layer"},
        "layers_no_pattern": {"target_modules": ["q", "wo"], "layers_to_transform": [0]},
        "rank_alpha": {"target_modules": ["q", "v", "wo"], "rank_pattern": {r"encoder.*\.q": 2, "wo": 3},
                       "alpha_pattern": {"v": 5}},
        "default_targets": {"target_modules": None},
    },
    "custom": {
        "list": {"target_modules": ["emb", "conv", "lin"]},
        "regex": {"target_modules": r"conv.*"},
        "regex_no_partial": {"target_modules": r"con"},  # fullmatch: selects nothing
        "exclude_regex": {"target_modules": ["emb", "conv", "conv_s", "lin"], "exclude_modules": r"conv(_s)?"},
        "rank_alpha": {"target_modules": ["emb", "conv", "conv_s", "lin"], "rank_pattern": {"conv": 2, "emb": 5},
                       "alpha_pattern": {"conv_s": 7}},
    },
}


def _params():
    return [pytest.param(m, kw, id=f"{m}-{case}") for m, cases in CASES.items() for case, kw in cases.items()]


@pytest.mark.parametrize("name,kw", _params())
def test_same_modules_selected(name, kw):
    """Where PEFT rejects the config (it selects nothing), peftkit rejects it as well."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft.get_peft_model(build(name), lora_config(peft, name, **kw))
    except ValueError:
        with pytest.raises(ValueError), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peftkit.get_peft_model(build(name), lora_config(peftkit, name, **kw))
        return
    _assert_same(name, **kw)


def test_rank_pattern_first_key_wins():
    ranks = _assert_same("llama", target_modules=["v_proj"],
                         rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.v_proj": 6})
    assert {r for r, _ in ranks.values()} == {2}
    ranks = _assert_same("llama", target_modules=["v_proj"],
                         rank_pattern={r"layers\.1\.self_attn\.v_proj": 6, "v_proj": 2})
    assert ranks["model.layers.1.self_attn.v_proj"][0] == 6 and ranks["model.layers.0.self_attn.v_proj"][0] == 2


def test_all_linear_excludes_output_head():
    for name, head in (("llama", "lm_head"), ("gpt2", "lm_head"), ("t5", "lm_head"), ("bert", "classifier")):
        ranks = _assert_same(name, target_modules="all-linear")
        assert not any(k == head or k.startswith(head + ".") for k in ranks), name


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_injected_layers_follow_training_mode_and_trainability(name):
    """Only adapter tensors (and modules_to_save copies) are trainable, in both libraries alike."""
    trainable = {}
    for lib_name, lib in LIBS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.get_peft_model(build(name), lora_config(lib, name))
        trainable[lib_name] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        counts = model.get_nb_trainable_parameters()
        trainable[lib_name + "_counts"] = counts
    assert trainable["peftkit"] == trainable["peft"]
    assert trainable["peftkit_counts"] == trainable["peft_counts"]


@pytest.mark.parametrize("name", list(MODELS))
def test_in_memory_state_dict_keys_equal(name):
    """The PeftModel's own state_dict uses PEFT's in-memory names (lora_A.default.weight, base_layer...)."""
    keys = {}
    for lib_name, lib in LIBS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.get_peft_model(build(name), lora_config(lib, name))
        keys[lib_name] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(keys["peft"]) ^ set(keys["peftkit"])) == []
    assert keys["peft"] == keys["peftkit"]


def test_print_trainable_parameters_same(capsys):
    for lib in LIBS.values():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.get_peft_model(build("bert"), lora_config(lib, "bert"))
        model.print_trainable_parameters()
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and out[0] == out[1]
