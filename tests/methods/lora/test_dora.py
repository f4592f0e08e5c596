"""DoRA against the oracle: outputs, merges and files, on every base-layer kind."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch.testing import assert_close

import peftkit
from peftkit.methods.lora.dora import row_norm_of_sum

from .helpers import MODELS

TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.mark.parametrize("name", list(MODELS))
def test_dora_matches_peft_both_ways(name, tmp_path):
    build, targets, run = MODELS[name]
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": targets, "use_dora": True, "init_lora_weights": False}
    pm = peft.get_peft_model(build(), peft.LoraConfig(**cfg)).eval()
    pm.save_pretrained(tmp_path / "peft")
    km = peftkit.PeftModel.from_pretrained(build(), tmp_path / "peft")
    assert_close(run(km), run(pm), **TOL)
    km.save_pretrained(tmp_path / "kit")
    back = peft.PeftModel.from_pretrained(build(), tmp_path / "kit").eval()
    assert_close(run(back), run(km), **TOL)
    merged_k = copy.deepcopy(km).merge_and_unload()
    merged_p = copy.deepcopy(pm).merge_and_unload()
    for (k1, v1), (k2, v2) in zip(merged_k.state_dict().items(), merged_p.state_dict().items()):
        assert k1 == k2
        assert_close(v1, v2, **TOL)


@pytest.mark.parametrize("name", list(MODELS))
def test_dora_starts_at_base_and_merge_roundtrips(name):
    build, targets, run = MODELS[name]
    base = build()
    km = peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(r=4, target_modules=targets, use_dora=True))
    assert_close(run(km), run(base), **TOL)
    km = peftkit.get_peft_model(
        copy.deepcopy(base), peftkit.LoraConfig(r=4, target_modules=targets, use_dora=True, init_lora_weights=False)
    ).eval()
    out = run(km)
    weights = {k: v.clone() for k, v in km.state_dict().items()}
    km.merge_adapter()
    assert_close(run(km), out, **TOL)
    km.unmerge_adapter()
    for k, v in km.state_dict().items():
        assert_close(v, weights[k], atol=1e-6, rtol=1e-5)


def test_dora_trains_like_peft():
    build, targets, run = MODELS["llama"]
    grads = []
    for lib in (peft, peftkit):
        torch.manual_seed(3)
        m = lib.get_peft_model(build(), lib.LoraConfig(r=4, target_modules=targets, use_dora=True, init_lora_weights=False))
        m.train()
        run(m).pow(2).mean().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4)


def test_norm_is_cached_until_weights_change():
    build, targets, run = MODELS["llama"]
    km = peftkit.get_peft_model(build(), peftkit.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)).eval()
    layer = km.base_model.model.model.layers[0].self_attn.q_proj
    mag = layer.lora_magnitude_vector["default"]
    run(km)
    first = mag._norm_cache[1]
    run(km)
    assert mag._norm_cache[1] is first  # inference reuses the norm
    with torch.no_grad():
        layer.lora_B["default"].weight.add_(1.0)
    run(km)
    assert mag._norm_cache[1] is not first


def test_expanded_norm_equals_direct_norm():
    torch.manual_seed(0)
    w, a, b = torch.randn(7, 5), torch.randn(3, 5), torch.randn(7, 3)
    direct = torch.linalg.vector_norm(w + 0.7 * b @ a, dim=1)
    assert_close(row_norm_of_sum(w.pow(2).sum(1), w, a, b, 0.7), direct, atol=1e-5, rtol=1e-5)
