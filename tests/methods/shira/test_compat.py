"""SHiRA adapters move both ways between peftkit and HF PEFT (the oracle), with identical outputs.

PEFT adapts nn.Linear only, so the oracle runs on llama and bert; GPT-2 (Conv1D) is covered in
``test_conv1d.py`` (peftkit alone).
"""

from __future__ import annotations

import json
import os

import peft
import pytest
import torch
from torch.testing import assert_close

import peftkit
import peftkit.methods.shira.layer as shira_layer_mod

from .helpers import (
    TARGETS, build, inputs, load, make, read_config, run, save, saved_tensors, shira_config, shira_layers,
)

NAMES = ["llama", "bert"]
DIRECTIONS = [("peft", "peftkit"), ("peftkit", "peft")]


@pytest.fixture
def forbid_masks(monkeypatch):
    """Call it to make peftkit fail if it draws or checks a mask from then on (loading reads the file)."""

    def boom(*args, **kwargs):
        raise AssertionError("a SHiRA mask was computed while loading an adapter")

    def forbid():
        monkeypatch.setattr(shira_layer_mod, "random_indices", boom)
        monkeypatch.setattr(shira_layer_mod, "positions_from_mask", boom)
        monkeypatch.setattr(shira_layer_mod, "layer_seed", boom)

    return forbid


@pytest.mark.parametrize("src,dst", DIRECTIONS, ids=["peft_to_peftkit", "peftkit_to_peft"])
@pytest.mark.parametrize("name", NAMES)
def test_adapter_loads_in_other_library(src, dst, name, tmp_path, forbid_masks):
    model = make(src, name)
    expected = run(model, name)
    assert not torch.allclose(expected, run(build(name), name), atol=1e-4)  # the adapter does something
    save(model, tmp_path)
    if dst == "peftkit":
        forbid_masks()
    loaded = load(dst, name, tmp_path)
    assert isinstance(loaded, (peft.PeftModel if dst == "peft" else peftkit.PeftModel))
    assert_close(run(loaded, name), expected)
    # same positions and values, layer by layer
    src_layers, dst_layers = shira_layers(model), shira_layers(loaded)
    assert sorted(src_layers) == sorted(dst_layers) and src_layers
    for key, layer in src_layers.items():
        other = dst_layers[key]
        assert torch.equal(other.shira_indices["default"].cpu().int(), layer.shira_indices["default"].cpu().int())
        assert torch.equal(other.shira_weight["default"].detach(), layer.shira_weight["default"].detach())


@pytest.mark.parametrize("name", NAMES)
def test_same_file_format(name, tmp_path):
    kit = save(make("peftkit", name), tmp_path / "kit")
    ref = save(make("peft", name), tmp_path / "ref")
    t_kit, t_ref = saved_tensors(str(kit)), saved_tensors(str(ref))
    assert sorted(t_kit) == sorted(t_ref)
    base = build(name)
    n_layers = 0
    for key, v in t_ref.items():
        assert t_kit[key].dtype == v.dtype and t_kit[key].shape == v.shape, key
        if key.endswith("shira_indices"):
            n_layers += 1
            assert v.dtype == torch.int32
            values = t_kit[key[: -len("indices")] + "weight"]
            module = base.get_submodule(key[len("base_model.model.") : -len(".shira_indices")])
            nnz = 2 * (module.in_features + module.out_features)
            assert t_kit[key].shape == (2, nnz) and values.shape == (nnz,) and values.dtype == torch.float32
    assert n_layers == len(shira_layers(make("peftkit", name)))
    if name == "bert":  # the SEQ_CLS head travels with the adapter in both
        assert any("classifier" in k for k in t_kit)


@pytest.mark.parametrize("name", NAMES)
def test_config_json_loads_in_peft(name, tmp_path):
    save(make("peftkit", name, r=3, random_seed=11), tmp_path)
    raw = read_config(str(tmp_path))
    assert raw["peft_type"] == "SHIRA" and raw["r"] == 3 and raw["random_seed"] == 11
    assert raw["mask_type"] == "random" and "mask_fn" not in raw
    assert sorted(raw["target_modules"]) == sorted(TARGETS[name])
    cfg = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(cfg, peft.ShiraConfig)
    assert (cfg.r, cfg.random_seed, cfg.mask_type, cfg.init_weights) == (3, 11, "random", False)
    assert cfg.target_modules == set(TARGETS[name])
    # and back: peft's json loads in peftkit
    save(make("peft", name, r=3, random_seed=11), tmp_path / "ref")
    kcfg = peftkit.PeftConfig.from_pretrained(str(tmp_path / "ref"))
    assert isinstance(kcfg, peftkit.ShiraConfig)
    assert (kcfg.r, kcfg.random_seed, kcfg.mask_type) == (3, 11, "random")


def test_config_with_mask_fn_is_saved_without_it(tmp_path):
    cfg = shira_config(peftkit, "llama", mask_type="custom")
    cfg.mask_fn = lambda base, r, **kw: None
    cfg.save_pretrained(str(tmp_path))
    with open(os.path.join(tmp_path, "adapter_config.json"), encoding="utf-8") as fh:
        raw = json.load(fh)
    assert "mask_fn" not in raw and raw["mask_type"] == "custom"


@pytest.mark.parametrize("src", ["peft", "peftkit"])
def test_loading_never_draws_a_mask(src, tmp_path, forbid_masks):
    """from_pretrained and load_adapter take positions from the file, even for mask types needing a mask_fn."""
    model = make(src, "llama", random_seed=None)
    save(model, tmp_path / "a")
    expected = run(model, "llama")
    forbid_masks()
    base = build("llama")
    rng = torch.get_rng_state()
    loaded = peftkit.PeftModel.from_pretrained(base, str(tmp_path / "a")).eval()
    assert torch.equal(torch.get_rng_state(), rng)  # random_seed=None did not consume the global generator
    assert_close(run(loaded, "llama"), expected)
    loaded.load_adapter(str(tmp_path / "a"), adapter_name="again")
    loaded.set_adapter("again")
    assert_close(run(loaded, "llama"), expected)
    # a config whose mask comes from a user function still loads without one
    cfg_path = tmp_path / "a" / "adapter_config.json"
    raw = json.loads(cfg_path.read_text())
    raw["mask_type"] = "my_own"
    cfg_path.write_text(json.dumps(raw))
    assert_close(run(load("peftkit", "llama", tmp_path / "a"), "llama"), expected)


@pytest.mark.parametrize("name", NAMES)
def test_value_gradients_equal_oracle(name, tmp_path):
    """Same adapter (PEFT's file) in both libraries: same loss, same gradient of every value."""
    ref = make("peft", name)
    save(ref, tmp_path)
    kit = load("peftkit", name, tmp_path, is_trainable=True)
    batch = dict(inputs(name))
    batch["labels"] = batch["input_ids"] if name == "llama" else torch.tensor([0, 2])
    losses = []
    for m in (ref, kit):
        m.zero_grad()
        loss = m(**batch).loss
        loss.backward()
        losses.append(loss.detach())
    assert_close(losses[1], losses[0])
    ref_layers, kit_layers = shira_layers(ref), shira_layers(kit)
    for key, layer in ref_layers.items():
        g_ref = layer.shira_weight["default"].grad
        g_kit = kit_layers[key].shira_weight["default"].grad
        assert g_ref is not None and g_kit is not None, key
        atol = 1e-5 * float(g_ref.abs().max()) + 1e-7  # float32 sums in another order
        assert_close(g_kit, g_ref, atol=atol, rtol=1e-4, msg=lambda m, key=key: f"{key}: {m}")
    for n, p in kit.named_parameters():  # only the values (and the SEQ_CLS head) train
        assert p.requires_grad == ("shira_weight" in n or "modules_to_save" in n), n


def test_custom_mask_positions_match_oracle():
    """The same mask function gives the same ``shira_indices`` (row-major order) in both libraries."""

    def diagonal_bands(base_layer, r, **kwargs):
        w = base_layer.weight
        m, n = w.shape
        k = r * (m + n)
        score = (torch.arange(m)[:, None] * 7 + torch.arange(n)[None, :] * 3) % (m * n + 1)
        flat = torch.argsort(score.flatten() + torch.arange(m * n) * 1e-6)[:k]
        mask = torch.zeros(m * n, dtype=w.dtype, device=w.device)
        mask[flat] = 1
        return mask.view(m, n)

    models = {}
    for lib_name, lib in (("peft", peft), ("peftkit", peftkit)):
        cfg = shira_config(lib, "llama", mask_type="bands")
        cfg.mask_fn = diagonal_bands
        torch.manual_seed(0)
        models[lib_name] = lib.get_peft_model(build("llama"), cfg)
    ref, kit = shira_layers(models["peft"]), shira_layers(models["peftkit"])
    for key, layer in ref.items():
        assert torch.equal(kit[key].shira_indices["default"], layer.shira_indices["default"]), key


def test_state_dict_functions_match_oracle():
    """``get_peft_model_state_dict`` carries the positions as PEFT's does; setting it replaces them."""
    kit, ref = make("peftkit", "llama"), make("peft", "llama")
    s_kit, s_ref = peftkit.get_peft_model_state_dict(kit), peft.get_peft_model_state_dict(ref)
    assert sorted(s_kit) == sorted(s_ref)
    for key, v in s_ref.items():
        assert (s_kit[key].dtype, s_kit[key].shape) == (v.dtype, v.shape), key
    assert not any("shira_indices" in k for k in kit.state_dict())  # positions are not module state
    other = make("peftkit", "llama", random_seed=99)  # its own mask, replaced by PEFT's
    result = peftkit.set_peft_model_state_dict(other, s_ref)
    assert not result.missing_keys and not result.unexpected_keys
    assert_close(run(other, "llama"), run(ref, "llama"))
    for key, layer in shira_layers(ref).items():
        assert torch.equal(shira_layers(other)[key].shira_indices["default"], layer.shira_indices["default"])
