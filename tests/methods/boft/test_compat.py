"""BOFT adapters move both ways between peftkit and HF PEFT (the oracle), with identical outputs.

Saved keys and shapes (``boft_R`` (factors, blocks, bs, bs); ``boft_s`` (out, 1) for Linear,
(1, out) for Conv2d), configs round-trip, ``bias="boft_only"`` saves the same biases. PEFT on
CPU has no CUDA extension and trains one butterfly factor whatever its config says; such a file
loads in peftkit (with a warning) and gives PEFT's outputs.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import peftkit

from .helpers import (
    DIRECTION_IDS, DIRECTIONS, adapter_state, base_of, load, make, merged_weights, norm, out, perturb,
    quiet_call, read_config, save, saved_shapes,
)

CONFIGS = {
    "block_size": {"boft_block_size": 4},
    "block_num": {"boft_block_size": 0, "boft_block_num": 2},
    "boft_only": {"boft_block_size": 2, "bias": "boft_only"},
}
MODELS = ["llama", "bert", "net"]


def _expected_shapes(model, cfg: dict) -> dict:
    shapes = {}
    for name, mod in model.get_base_model().named_modules():
        if isinstance(mod, peftkit.BOFTLayer):
            n = mod.fan_in
            bs = cfg["boft_block_size"] or n // cfg["boft_block_num"]
            conv = isinstance(mod.base_layer, torch.nn.Conv2d)
            out_f = mod.base_layer.weight.shape[0]
            shapes[f"base_model.model.{name}.boft_R"] = (1, n // bs, bs, bs)
            shapes[f"base_model.model.{name}.boft_s"] = (1, out_f) if conv else (out_f, 1)
    return shapes


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
def test_same_seed_same_tensors_same_outputs(name, cfg):
    ref = make("peft", name, **CONFIGS[cfg])
    kit = make("peftkit", name, **CONFIGS[cfg])
    s_ref, s_kit = adapter_state("boft_", ref), adapter_state("boft_", kit)
    assert sorted(s_ref) == sorted(s_kit) and s_ref
    for k, v in s_ref.items():
        assert s_kit[k].shape == v.shape, k
        assert_close(s_kit[k], v, atol=1e-6, rtol=0, msg=k)
    expected = out(ref, name)
    assert not torch.allclose(expected, out(base_of(name), name), atol=1e-6, rtol=0)
    assert_close(out(kit, name), expected, atol=1e-5, rtol=1e-5)
    m_ref, m_kit = merged_weights(ref), merged_weights(kit)
    assert sorted(m_ref) == sorted(m_kit)
    for k in m_ref:
        assert_close(m_kit[k], m_ref[k], atol=1e-5, rtol=1e-5, msg=k)


@pytest.mark.parametrize("src,dst", DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
def test_adapter_loads_in_other_library(src, dst, name, cfg, tmp_path):
    model = make(src, name, **CONFIGS[cfg])
    perturb(model, "boft_")
    if CONFIGS[cfg].get("bias") == "boft_only":
        perturb(model, "bias", seed=5)  # the trained biases travel with the adapter
    expected = out(model, name)
    save(model, tmp_path)
    shapes = saved_shapes(tmp_path)
    boft = {k: v for k, v in shapes.items() if ".boft_" in k}
    assert boft == _expected_shapes(make("peftkit", name, **CONFIGS[cfg]), CONFIGS[cfg])
    if CONFIGS[cfg].get("bias") == "boft_only" and name == "bert":
        biases = {k for k in shapes if k.endswith("base_layer.bias")}
        assert biases == {k.replace(".boft_R", ".base_layer.bias") for k in boft if k.endswith("boft_R")}
    loaded = load(dst, base_of(name), tmp_path)
    assert_close(out(loaded, name), expected, atol=1e-5, rtol=1e-5)
    save(loaded, tmp_path / "again")
    assert saved_shapes(tmp_path / "again") == shapes


@pytest.mark.parametrize("src,dst", DIRECTIONS, ids=DIRECTION_IDS)
def test_config_round_trips(src, dst, tmp_path):
    # PEFT on CPU cannot load a file with 2 factors (it builds 1), so peftkit -> peft uses factor 1
    cfg = {"boft_block_size": 0, "boft_block_num": 4, "boft_n_butterfly_factor": 2 if dst == "peftkit" else 1,
           "boft_dropout": 0.1, "bias": "boft_only"}
    save(make(src, "llama", **cfg), tmp_path)
    written = read_config(tmp_path)
    assert written["peft_type"] == "BOFT"
    for k, v in cfg.items():
        assert written[k] == v, k
    loaded = load(dst, base_of("llama"), tmp_path)
    for k, v in cfg.items():
        assert getattr(loaded.peft_config["default"], k) == v, k
    save(loaded, tmp_path / "again")
    again = read_config(tmp_path / "again")
    for k in set(written) - {"peft_version", "inference_mode"}:
        assert norm(again.get(k)) == norm(written[k]), k


@pytest.mark.parametrize("name", ["llama", "net"])
def test_peft_cpu_factor2_file_loads_with_warning(name, tmp_path):
    """PEFT without its CUDA extension saves factor 2 in the config but one factor in boft_R."""
    ref = make("peft", name, boft_block_size=2, boft_n_butterfly_factor=2)
    perturb(ref, "boft_")
    expected = out(ref, name)
    save(ref, tmp_path)
    assert read_config(tmp_path)["boft_n_butterfly_factor"] == 2
    assert all(v[0] == 1 for k, v in saved_shapes(tmp_path).items() if k.endswith("boft_R"))
    with pytest.warns(UserWarning, match="butterfly factor"):
        kit = peftkit.PeftModel.from_pretrained(base_of(name), str(tmp_path)).eval()
    assert all(kit_layer.factors("default") == 1 for kit_layer in kit.get_base_model().modules()
               if isinstance(kit_layer, peftkit.BOFTLayer))
    assert_close(out(kit, name), expected, atol=1e-5, rtol=1e-5)
    # and the merged weights agree as well
    m_ref, m_kit = merged_weights(ref), merged_weights(kit)
    for k in m_ref:
        assert_close(m_kit[k], m_ref[k], atol=1e-5, rtol=1e-5, msg=k)


def test_several_active_adapters_agree_with_peft():
    models = {}
    for lib in ("peft", "peftkit"):
        m = make(lib, "net", boft_block_size=4)
        torch.manual_seed(7)
        quiet_call(m.add_adapter, "b", getattr(__import__(lib), "BOFTConfig")(
            boft_block_size=2, target_modules=["lin", "conv"], init_weights=False))
        m.base_model.set_adapter(["default", "b"])
        models[lib] = m.eval()
    s_ref, s_kit = adapter_state("boft_", models["peft"]), adapter_state("boft_", models["peftkit"])
    assert sorted(s_ref) == sorted(s_kit)
    with torch.no_grad():  # the same tensors in both (the draws may differ in the last bits)
        for k, v in s_kit.items():
            v.copy_(s_ref[k])
    # both libraries rotate by M_b M_a and scale by s_a s_b (Linear and Conv2d)
    assert_close(out(models["peftkit"], "net"), out(models["peft"], "net"), atol=1e-5, rtol=1e-5)
    expected = out(models["peftkit"], "net")
    quiet_call(models["peftkit"].merge_adapter)
    quiet_call(models["peft"].merge_adapter)
    assert_close(out(models["peftkit"], "net"), expected, atol=1e-5, rtol=1e-5)
    assert_close(out(models["peft"], "net"), expected, atol=1e-5, rtol=1e-5)
