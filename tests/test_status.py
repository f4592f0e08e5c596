"""get_layer_status / get_model_status report what PEFT's report; cast_mixed_precision_params casts as PEFT's."""

from __future__ import annotations

import dataclasses

import peft
import pytest
import torch

import peftkit
from tests.models import tiny_llama

LIBS = {"peft": peft, "peftkit": peftkit}


def _model(lib):
    model = lib.get_peft_model(
        tiny_llama(), lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    )
    model.add_adapter("b", lib.LoraConfig(r=2, target_modules=["q_proj"]))
    return model


def _layers(model) -> list[dict]:
    # module_type names the library's own classes (PEFT: lora.Linear, peftkit: LoraLayer)
    return [{k: v for k, v in dataclasses.asdict(s).items() if k != "module_type"} for s in model.get_layer_status()]


STEPS = {
    "fresh": lambda m: None,
    "merged": lambda m: m.merge_adapter(["default"]),
    "other_active": lambda m: m.set_adapter("b"),
    "one_layer_switched": lambda m: m.base_model.model.model.layers[0].self_attn.q_proj.set_adapter("b"),
}


@pytest.mark.parametrize("step", list(STEPS))
def test_status_equals_peft(step):
    models = {name: _model(lib) for name, lib in LIBS.items()}
    for model in models.values():
        STEPS[step](model)
    assert _layers(models["peftkit"]) == _layers(models["peft"])
    ours, theirs = (dataclasses.asdict(models[n].get_model_status()) for n in ("peftkit", "peft"))
    assert ours == theirs
    assert peftkit.get_model_status(models["peftkit"]) == models["peftkit"].get_model_status()
    if step == "one_layer_switched":
        assert ours["active_adapters"] == "irregular"


def test_status_inside_disable_adapter_and_errors():
    model = _model(peftkit)
    with model.disable_adapter():
        status = model.get_model_status()
    assert status.enabled is False
    assert model.get_model_status().enabled is True
    with pytest.raises(ValueError, match="No adapter layers"):
        peftkit.get_layer_status(torch.nn.Linear(2, 2))
    config = peftkit.PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM")
    prompt = peftkit.get_peft_model(tiny_llama(), config)
    with pytest.raises(TypeError, match="prompt learning"):
        prompt.get_layer_status()


def test_cast_mixed_precision_params_equals_peft():
    dtypes = {}
    for name, lib in LIBS.items():
        model = _model(lib)
        lib.cast_mixed_precision_params(model, torch.bfloat16)
        dtypes[name] = {n.replace(".default", ""): p.dtype for n, p in model.named_parameters()}
    assert dtypes["peftkit"] == dtypes["peft"]
    assert {torch.bfloat16, torch.float32} == set(dtypes["peftkit"].values())
