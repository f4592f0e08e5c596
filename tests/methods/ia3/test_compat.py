"""(IA)³ adapters move both ways between peftkit and HF PEFT (the oracle), with identical outputs."""

from __future__ import annotations

import peft
import pytest
import torch
from torch.testing import assert_close

import peftkit

from .helpers import NAMES, add, build, ia3_config, ia3_layers, load, make, read_config, run, save, saved_tensors

DIRECTIONS = [("peft", "peftkit"), ("peftkit", "peft")]


@pytest.mark.parametrize("name", NAMES)
def test_same_outputs_same_init(name):
    """Same seed, same config: both libraries draw the same vectors and compute the same outputs."""
    kit, ref = make("peftkit", name), make("peft", name)
    out = run(kit, name)
    assert not torch.allclose(out, run(build(name), name), atol=1e-4)  # the adapter does something
    assert_close(out, run(ref, name), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("src,dst", DIRECTIONS, ids=["peft_to_peftkit", "peftkit_to_peft"])
@pytest.mark.parametrize("name", NAMES)
def test_adapter_loads_in_other_library(src, dst, name, tmp_path):
    model = make(src, name)
    expected = run(model, name)
    save(model, tmp_path)
    loaded = load(dst, name, tmp_path)
    assert isinstance(loaded, (peft.PeftModel if dst == "peft" else peftkit.PeftModel))
    assert_close(run(loaded, name), expected, atol=1e-6, rtol=1e-6)
    src_layers, dst_layers = ia3_layers(model), ia3_layers(loaded)
    assert sorted(src_layers) == sorted(dst_layers) and src_layers
    for key, layer in src_layers.items():
        other = dst_layers[key]
        assert other.is_feedforward == layer.is_feedforward, key
        assert torch.equal(other.ia3_l["default"].detach(), layer.ia3_l["default"].detach())


@pytest.mark.parametrize("name", NAMES)
def test_same_file_format(name, tmp_path):
    t_kit = saved_tensors(str(save(make("peftkit", name), tmp_path / "kit")))
    t_ref = saved_tensors(str(save(make("peft", name), tmp_path / "ref")))
    assert sorted(t_kit) == sorted(t_ref) and t_ref
    for key, v in t_ref.items():
        assert t_kit[key].dtype == v.dtype and t_kit[key].shape == v.shape, key
        assert torch.equal(t_kit[key], v), key
    c_kit, c_ref = read_config(str(tmp_path / "kit")), read_config(str(tmp_path / "ref"))
    assert sorted(c_kit) == sorted(c_ref)
    for key in ("peft_type", "task_type", "target_modules", "feedforward_modules", "fan_in_fan_out", "exclude_modules",
                "init_ia3_weights", "modules_to_save", "inference_mode"):
        a, b = c_kit[key], c_ref[key]
        assert (sorted(a) == sorted(b)) if isinstance(a, list) and isinstance(b, list) else a == b, key


def test_shapes_per_kind(tmp_path):
    """(out, 1) for output scaling, (1, in) for feed-forward; convolutions (1, C, 1, 1)."""
    shapes = {k: tuple(v.shape) for k, v in saved_tensors(str(save(make("peftkit", "custom"), tmp_path))).items()}
    assert shapes == {
        "base_model.model.conv.ia3_l": (1, 4, 1, 1),  # Conv2d(2, 4): out channels
        "base_model.model.conv_s.ia3_l": (1, 4, 1, 1),  # feed-forward: in channels
        "base_model.model.lin.ia3_l": (8, 1),
    }
    shapes = {k: tuple(v.shape) for k, v in saved_tensors(str(save(make("peftkit", "llama"), tmp_path / "l"))).items()}
    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.ia3_l"] == (16, 1)
    assert shapes["base_model.model.model.layers.0.mlp.down_proj.ia3_l"] == (1, 32)
    shapes = {k: tuple(v.shape) for k, v in saved_tensors(str(save(make("peftkit", "gpt2"), tmp_path / "g"))).items()}
    assert shapes["base_model.model.transformer.h.0.attn.c_attn.ia3_l"] == (48, 1)  # Conv1D(16 -> 48)
    assert shapes["base_model.model.transformer.h.0.mlp.c_proj.ia3_l"] == (1, 64)  # feed-forward: input


@pytest.mark.parametrize("name", ["llama", "gpt2", "custom"])
def test_merge_and_unload_matches_peft(name):
    kit, ref = make("peftkit", name), make("peft", name)
    expected = run(kit, name)
    merged_kit = kit.merge_and_unload()
    merged_ref = ref.merge_and_unload()
    sd_kit, sd_ref = merged_kit.state_dict(), merged_ref.state_dict()
    assert sorted(sd_kit) == sorted(sd_ref)
    for key in sd_ref:  # weights and biases scaled the same way (biases only under output scaling)
        assert_close(sd_kit[key], sd_ref[key], atol=1e-6, rtol=1e-6, msg=key)
    assert_close(run(merged_kit, name), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama", "custom"])
def test_several_active_adapters_multiply_like_peft(name):
    kit, ref = make("peftkit", name), make("peft", name)
    add(kit, "peftkit", name, "b")
    add(ref, "peft", name, "b")
    for m in (kit, ref):
        m.base_model.set_adapter(["default", "b"])
    out = run(kit, name)
    assert_close(out, run(ref, name), atol=1e-6, rtol=1e-6)
    kit.merge_adapter()
    assert_close(run(kit, name), out, atol=1e-5, rtol=1e-5)


def test_multi_adapter_folder_both_ways(tmp_path):
    kit = make("peftkit", "llama")
    add(kit, "peftkit", "llama", "other")
    save(kit, tmp_path)
    ref = load("peft", "llama", tmp_path)
    ref.load_adapter(str(tmp_path / "other"), adapter_name="other")
    for adapter in ("default", "other"):
        kit.set_adapter(adapter)
        ref.set_adapter(adapter)
        assert_close(run(ref.eval(), "llama"), run(kit, "llama"), atol=1e-6, rtol=1e-6)


def test_config_roundtrip_with_peft(tmp_path):
    cfg = ia3_config(peftkit, "llama", exclude_modules=["model.layers.1.mlp.down_proj"], modules_to_save=["lm_head"])
    cfg.save_pretrained(tmp_path)
    ref = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(ref, peft.IA3Config)
    for field in ("target_modules", "exclude_modules", "feedforward_modules", "modules_to_save", "init_ia3_weights"):
        assert getattr(ref, field) == getattr(cfg, field), field
    ref.save_pretrained(str(tmp_path / "back"))
    back = peftkit.PeftConfig.from_pretrained(tmp_path / "back")
    assert isinstance(back, peftkit.IA3Config) and back.to_dict().keys() == cfg.to_dict().keys()
    for field in ("target_modules", "exclude_modules", "feedforward_modules", "modules_to_save", "init_ia3_weights"):
        assert getattr(back, field) == getattr(cfg, field), field


def test_config_fields_match_peft():
    import dataclasses

    ours = {f.name for f in dataclasses.fields(peftkit.IA3Config)}
    theirs = {f.name for f in dataclasses.fields(peft.IA3Config)}
    missing = {f for f in theirs - ours if not f.startswith("_")}
    assert not missing, f"PEFT fields peftkit's IA3Config lacks: {sorted(missing)}"
