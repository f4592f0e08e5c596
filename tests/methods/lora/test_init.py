"""PiSSA / OLoRA / gaussian initialisations, and conversion to plain LoRA."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch.testing import assert_close

import peftkit

from .helpers import MODELS

TOL = {"atol": 1e-4, "rtol": 1e-4}


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_3", "olora", "gaussian", True])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_initial_output_equals_base(init, name):
    build, targets, run = MODELS[name]
    base = build()
    km = peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(r=4, target_modules=targets, init_lora_weights=init))
    assert_close(run(km), run(base), **TOL)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_same_factors_and_residual_as_peft(init):
    build, targets, _ = MODELS["llama"]
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": targets, "init_lora_weights": init}
    km = peftkit.get_peft_model(build(), peftkit.LoraConfig(**cfg))
    pm = peft.get_peft_model(build(), peft.LoraConfig(**cfg))
    for (k1, v1), (k2, v2) in zip(km.state_dict().items(), pm.state_dict().items()):
        assert k1 == k2
        assert_close(v1, v2, **TOL)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_saved_adapter_loads_on_original_base(init, tmp_path):
    build, targets, run = MODELS["llama"]
    pm = peft.get_peft_model(build(), peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=init))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(0.05)
    pm.save_pretrained(tmp_path)
    km = peftkit.PeftModel.from_pretrained(build(), tmp_path)
    assert_close(run(km), run(pm.eval()), **TOL)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
@pytest.mark.parametrize("rslora", [False, True])
def test_conversion_to_plain_lora(init, rslora, tmp_path):
    build, targets, run = MODELS["llama"]
    km = peftkit.get_peft_model(
        build(), peftkit.LoraConfig(r=4, target_modules=targets, init_lora_weights=init, use_rslora=rslora)
    ).eval()
    km.save_pretrained(tmp_path / "init")
    with torch.no_grad():  # stands in for training
        for n, p in km.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.05)
    trained = run(km)
    km.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "init")
    cfg = peftkit.PeftConfig.from_pretrained(tmp_path / "lora")
    assert cfg.r == 8 and cfg.init_lora_weights is True
    for lib in (peftkit, peft):
        loaded = lib.PeftModel.from_pretrained(build(), tmp_path / "lora").eval()
        assert_close(run(loaded), trained, **TOL)


def test_bad_pissa_spec():
    with pytest.raises(ValueError, match="pissa_niter"):
        peftkit.LoraConfig(init_lora_weights="pissa_niter_x")
