"""Hot-swapping equals loading the adapter fresh, and a compiled model does not recompile."""

from __future__ import annotations

import peft
import pytest
import torch
from torch.testing import assert_close

import peftkit
from peftkit.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

from .helpers import MODELS


def _save(tmp_path, name, lib=peftkit, **cfg):
    build, targets, _ = MODELS["llama"]
    torch.manual_seed(hash(name) % 1000)
    cfg = {"r": 4, "target_modules": targets, "init_lora_weights": False, **cfg}
    model = lib.get_peft_model(build(), lib.LoraConfig(**cfg))
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("second", [{}, {"r": 2, "lora_alpha": 7}, {"target_modules": ["q_proj"]}, {"peft": True}])
def test_hotswap_equals_fresh_load(tmp_path, second):
    build, _, run = MODELS["llama"]
    first = _save(tmp_path, "a", lora_alpha=3)
    lib = peft if second.pop("peft", False) else peftkit
    other = _save(tmp_path, "b", lib=lib, **second)
    model = peftkit.PeftModel.from_pretrained(build(), first)
    layer_ids = [id(m) for m in model.modules()]
    hotswap_adapter(model, other, adapter_name="default")
    assert [id(m) for m in model.modules()] == layer_ids  # nothing re-injected
    fresh = peftkit.PeftModel.from_pretrained(build(), other)
    assert_close(run(model), run(fresh), atol=1e-5, rtol=1e-5)


def test_hotswap_errors_leave_model_unchanged(tmp_path):
    build, _, run = MODELS["llama"]
    model = peftkit.PeftModel.from_pretrained(build(), _save(tmp_path, "a", target_modules=["q_proj"]))
    before = run(model)
    with pytest.raises(RuntimeError, match="lacks"):
        hotswap_adapter(model, _save(tmp_path, "b", target_modules=["q_proj", "k_proj"]))
    with pytest.raises(ValueError, match="does not fit"):
        hotswap_adapter(model, _save(tmp_path, "c", r=8, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="use_dora"):
        hotswap_adapter(model, _save(tmp_path, "d", use_dora=True, target_modules=["q_proj"]))
    assert_close(run(model), before)


def test_compiled_model_does_not_recompile(tmp_path):
    build, _, run = MODELS["llama"]
    model = peftkit.PeftModel.from_pretrained(build(), _save(tmp_path, "a"))
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    before = run(model)
    compiled = torch.compile(model, backend="eager")
    assert_close(run(compiled), before, atol=1e-5, rtol=1e-5)
    other = _save(tmp_path, "b", r=2, lora_alpha=5)
    hotswap_adapter(compiled, other)
    with torch.compiler.set_stance("fail_on_recompile"):
        out = run(compiled)
    assert_close(out, run(peftkit.PeftModel.from_pretrained(build(), other)), atol=1e-5, rtol=1e-5)
