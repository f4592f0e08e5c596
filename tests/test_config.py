"""Config JSON: PEFT's layout, unknown keys dropped with a warning, clear errors."""

from __future__ import annotations

import json

import pytest

import peftkit
from peftkit import LoraConfig, PeftConfig


def test_roundtrip_and_layout(tmp_path):
    c = LoraConfig(r=4, target_modules=["v", "q"], task_type="CAUSAL_LM", rank_pattern={"q": 2})
    c.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["task_type"] == "CAUSAL_LM"
    assert raw["inference_mode"] is True and raw["target_modules"] == ["q", "v"]
    assert list(raw) == sorted(raw)
    back = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(back, LoraConfig)
    assert back.r == 4 and back.target_modules == {"q", "v"} and back.rank_pattern == {"q": 2}


def test_only_peft_type_is_required(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    c = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(c, LoraConfig) and c.r == 8


def test_unknown_keys_warn(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "shiny_new_field": 1, "runtime_config": {}}))
    with pytest.warns(UserWarning, match="shiny_new_field") as caught:
        PeftConfig.from_pretrained(tmp_path)
    # PEFT's category (a UserWarning), so filters written for peft's warnings apply
    import peftkit

    assert all(issubclass(w.category, peftkit.PeftWarning) for w in caught)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"r": 0}, "positive"),
        ({"bias": "some"}, "bias"),
        ({"init_lora_weights": "nope"}, "init_lora_weights"),
        ({"target_modules": ".*q", "layers_to_transform": [0]}, "layers_to_transform"),
        ({"task_type": "TRANSLATE"}, "task_type"),
    ],
)
def test_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


def test_unsupported_field_is_named():
    with pytest.raises(NotImplementedError, match="layer_replication"):
        LoraConfig(layer_replication=[[0, 1]])


def test_types_match_peft_strings():
    assert peftkit.PeftType.LORA == "LORA" and peftkit.TaskType.SEQ_CLS.value == "SEQ_CLS"
