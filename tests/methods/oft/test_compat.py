"""OFT adapters move both ways between peftkit and HF PEFT (the oracle), with identical outputs.

Saved keys and shapes (``oft_R.weight``: (r, bs·(bs−1)/2)), same seed -> same tensors, configs
round-trip. Conv2d: PEFT's unmerged OFT Conv2d forward unfolds and refolds the input (wrong even
at the identity), so peftkit's Conv2d forward is compared with PEFT's *merged* model.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import peftkit

from .helpers import (
    DIRECTION_IDS, DIRECTIONS, adapter_state, base_of, fresh_net, load, make, merged_weights, net_inputs, norm, out,
    perturb, quiet_call, read_config, save, saved_shapes,
)

CONFIGS = {
    "block_size": {"r": 0, "oft_block_size": 4},
    "r_given": {"r": 2, "oft_block_size": 0},
    "exact_cayley": {"r": 0, "oft_block_size": 4, "use_cayley_neumann": False},
    "neumann3": {"r": 0, "oft_block_size": 8, "num_cayley_neumann_terms": 3},
    "neumann5": {"r": 0, "oft_block_size": 8, "num_cayley_neumann_terms": 5},
    "block_share": {"r": 0, "oft_block_size": 4, "block_share": True},
    "coft": {"r": 0, "oft_block_size": 4, "coft": True, "eps": 1e-2},
}
HF = ["llama", "bert"]


def _expected_shapes(model, cfg: dict) -> dict:
    """Key -> (r, bs(bs-1)/2) for every targeted linear, from the config alone."""
    shapes = {}
    for name, mod in model.get_base_model().named_modules():
        if isinstance(mod, peftkit.OFTLayer):
            n = mod.base_layer.in_features
            if cfg.get("r"):
                r = cfg["r"]
                bs = n // r
            else:
                bs = cfg["oft_block_size"]
                r = n // bs
            shapes[f"base_model.model.{name}.oft_R.weight"] = (1 if cfg.get("block_share") else r, bs * (bs - 1) // 2)
    return shapes


@pytest.mark.parametrize("name", HF)
@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
def test_same_seed_same_tensors_same_outputs(name, cfg):
    ref = make("OFTConfig", "peft", name, **CONFIGS[cfg])
    kit = make("OFTConfig", "peftkit", name, **CONFIGS[cfg])
    s_ref, s_kit = adapter_state("oft_R", ref), adapter_state("oft_R", kit)
    assert sorted(s_ref) == sorted(s_kit) and s_ref
    for k, v in s_ref.items():
        assert s_kit[k].shape == v.shape, k
        assert_close(s_kit[k], v, atol=1e-7, rtol=0, msg=k)
    expected = out(ref, name)
    assert not torch.allclose(expected, out(base_of(name), name), atol=1e-6, rtol=0)
    assert_close(out(kit, name), expected, atol=1e-5, rtol=1e-5)
    # merged weights too
    m_ref, m_kit = merged_weights(ref), merged_weights(kit)
    assert sorted(m_ref) == sorted(m_kit)
    for k in m_ref:
        assert_close(m_kit[k], m_ref[k], atol=1e-5, rtol=1e-5, msg=k)


@pytest.mark.parametrize("src,dst", DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("name", HF)
@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
def test_adapter_loads_in_other_library(src, dst, name, cfg, tmp_path):
    model = make("OFTConfig", src, name, **CONFIGS[cfg])
    perturb(model, "oft_R")
    expected = out(model, name)
    save(model, tmp_path)
    shapes = saved_shapes(tmp_path)
    oft_keys = {k: v for k, v in shapes.items() if ".oft_R." in k}
    assert oft_keys == _expected_shapes(make("OFTConfig", "peftkit", name, **CONFIGS[cfg]), CONFIGS[cfg])
    assert all(".oft_R." in k or ".classifier." in k for k in shapes)  # + the SEQ_CLS head
    loaded = load(dst, base_of(name), tmp_path)
    assert_close(out(loaded, name), expected, atol=1e-5, rtol=1e-5)
    # and back: the destination writes the same keys, shapes and values
    save(loaded, tmp_path / "again")
    assert saved_shapes(tmp_path / "again") == shapes


@pytest.mark.parametrize("src,dst", DIRECTIONS, ids=DIRECTION_IDS)
def test_config_round_trips(src, dst, tmp_path):
    cfg = {"r": 0, "oft_block_size": 4, "use_cayley_neumann": False, "num_cayley_neumann_terms": 3, "coft": True,
           "eps": 1e-3, "block_share": False, "module_dropout": 0.1, "bias": "oft_only"}
    model = make("OFTConfig", src, "llama", **cfg)
    save(model, tmp_path)
    written = read_config(tmp_path)
    assert written["peft_type"] == "OFT"
    for k, v in cfg.items():
        assert written[k] == v, k
    loaded = load(dst, base_of("llama"), tmp_path)
    lib_cfg = loaded.peft_config["default"]
    for k, v in cfg.items():
        assert getattr(lib_cfg, k) == v, k
    save(loaded, tmp_path / "again")
    again = read_config(tmp_path / "again")
    for k in set(written) - {"peft_version", "inference_mode"}:
        assert norm(again.get(k)) == norm(written[k]), k


def test_oft_only_bias_saved_and_loaded(tmp_path):
    model = make("OFTConfig", "peftkit", "llama", oft_block_size=4, bias="oft_only",
                 target_modules=["q_proj"])  # llama linears have no bias: nothing extra to save
    save(model, tmp_path)
    ref_dir = tmp_path / "ref"
    save(make("OFTConfig", "peft", "llama", oft_block_size=4, bias="oft_only", target_modules=["q_proj"]), ref_dir)
    assert saved_shapes(tmp_path) == saved_shapes(ref_dir)
    # BERT's linears have biases: PEFT saves the adapted layers' biases
    kit = make("OFTConfig", "peftkit", "bert", oft_block_size=4, bias="oft_only")
    ref = make("OFTConfig", "peft", "bert", oft_block_size=4, bias="oft_only")
    save(kit, tmp_path / "kb")
    save(ref, tmp_path / "rb")
    assert saved_shapes(tmp_path / "kb") == saved_shapes(tmp_path / "rb")
    assert any(k.endswith(".bias") for k in saved_shapes(tmp_path / "kb"))


# ------------------------------------------------------------------ Conv2d: against PEFT's merged model
@pytest.mark.parametrize("neumann", [True, False])
def test_conv2d_forward_equals_peft_merged(neumann, tmp_path):
    ref = make("OFTConfig", "peft", "net", oft_block_size=4, use_cayley_neumann=neumann)
    perturb(ref, "oft_R")
    save(ref, tmp_path)
    shapes = saved_shapes(tmp_path)
    assert shapes == {"base_model.model.lin.oft_R.weight": (2, 6), "base_model.model.conv.oft_R.weight": (9, 6)}
    kit = load("peftkit", fresh_net(), tmp_path)
    merged_ref = quiet_call(ref.merge_and_unload)
    with torch.no_grad():
        expected = merged_ref(**net_inputs())
    assert_close(out(kit, "net"), expected, atol=1e-5, rtol=1e-5)
    for k, v in merged_ref.state_dict().items():
        assert_close(merged_weights(kit)[k], v, atol=1e-5, rtol=1e-5, msg=k)


def test_conv2d_peftkit_saved_loads_in_peft(tmp_path):
    kit = make("OFTConfig", "peftkit", "net", oft_block_size=4)
    perturb(kit, "oft_R")
    expected = out(kit, "net")
    save(kit, tmp_path)
    ref = load("peft", fresh_net(), tmp_path)
    merged = quiet_call(ref.merge_and_unload)
    with torch.no_grad():
        assert_close(merged(**net_inputs()), expected, atol=1e-5, rtol=1e-5)


def test_conv2d_identity_at_init_unlike_peft():
    """The intended difference: peftkit's init is the base model on Conv2d; PEFT's unmerged forward is not."""
    kit = make("OFTConfig", "peftkit", "net", oft_block_size=4, init_weights=True)
    assert_close(out(kit, "net"), out(fresh_net(), "net"), atol=1e-6, rtol=0)


def test_block_size_not_dividing_moves_to_divisor_like_peft():
    # bert in_features 16 and 32: block size 5 -> 4 (nearest divisor), with a warning
    with pytest.warns(UserWarning, match="does not divide"):
        torch.manual_seed(1)
        kit = peftkit.get_peft_model(base_of("bert"), peftkit.OFTConfig(oft_block_size=5, target_modules=["query"],
                                                                        init_weights=False, task_type="SEQ_CLS"))
    ref = make("OFTConfig", "peft", "bert", oft_block_size=5, target_modules=["query"])
    s_ref, s_kit = adapter_state("oft_R", ref), adapter_state("oft_R", kit)
    assert {k: v.shape for k, v in s_ref.items()} == {k: v.shape for k, v in s_kit.items()}
    assert all(v.shape == (4, 6) for v in s_kit.values())
    assert_close(out(kit.eval(), "bert"), out(ref, "bert"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama", "net"])
def test_several_active_adapters_equal_peft_merged(name):
    """peftkit's forward with [a, b] active is x M_b M_a: what both libraries write when merging a then b
    (PEFT's own unmerged forward applies the other order; that is the intended difference)."""
    models = {}
    for lib in ("peft", "peftkit"):
        m = make("OFTConfig", lib, name, oft_block_size=4, use_cayley_neumann=False)
        torch.manual_seed(7)
        quiet_call(m.add_adapter, "b", getattr(__import__(lib), "OFTConfig")(
            oft_block_size=2, target_modules=list(m.peft_config["default"].target_modules), init_weights=False,
            use_cayley_neumann=False))
        m.base_model.set_adapter(["default", "b"])
        models[lib] = m.eval()
    s_ref, s_kit = adapter_state("oft_R", models["peft"]), adapter_state("oft_R", models["peftkit"])
    assert sorted(s_ref) == sorted(s_kit)
    with torch.no_grad():
        for k, v in s_kit.items():
            v.copy_(s_ref[k])
    stacked = out(models["peftkit"], name)
    merged_ref = quiet_call(models["peft"].merge_and_unload)
    assert_close(out(merged_ref, name), stacked, atol=1e-5, rtol=1e-5)
    merged_kit = quiet_call(models["peftkit"].merge_and_unload)
    for k, v in merged_ref.state_dict().items():
        assert_close(merged_kit.state_dict()[k], v, atol=1e-5, rtol=1e-5, msg=k)
