"""Saving and loading: folders, several adapters, legacy .bin, AutoPeftModel, load_adapter."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from torch.testing import assert_close
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import peftkit
from peftkit import AutoPeftModel, AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model


def llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=64)
    ).eval()


def lora(**kw):
    kw = {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False, "task_type": "CAUSAL_LM", **kw}
    return LoraConfig(**kw)


X = torch.randint(0, 64, (2, 6))


def test_several_adapters_and_selected(tmp_path):
    model = get_peft_model(llama(), lora())
    model.add_adapter("second", lora(r=2))
    model.save_pretrained(tmp_path / "all")
    assert sorted(os.listdir(tmp_path / "all")) == ["adapter_config.json", "adapter_model.safetensors", "second"]
    with safe_open(tmp_path / "all" / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert all(k.startswith("base_model.model.") and ".default" not in k for k in f.keys())
    model.save_pretrained(tmp_path / "one", selected_adapters=["second"])
    assert os.listdir(tmp_path / "one") == ["second"]

    loaded = PeftModel.from_pretrained(llama(), tmp_path / "all")
    loaded.load_adapter(tmp_path / "all" / "second", adapter_name="second")
    for name in ("default", "second"):
        model.set_adapter(name)
        loaded.set_adapter(name)
        assert_close(loaded(input_ids=X).logits, model(input_ids=X).logits)


def test_legacy_bin_format(tmp_path):
    model = get_peft_model(llama(), lora())
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert "adapter_model.bin" in os.listdir(tmp_path)
    loaded = PeftModel.from_pretrained(llama(), tmp_path)
    assert_close(loaded(input_ids=X).logits, model(input_ids=X).logits)


def test_auto_peft_model_loads_base_from_config(tmp_path):
    base = llama()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base").eval(), lora())
    assert model.peft_config["default"].base_model_name_or_path == str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    for auto in (AutoPeftModelForCausalLM, AutoPeftModel):
        loaded = auto.from_pretrained(tmp_path / "adapter")
        assert isinstance(loaded, peftkit.PeftModelForCausalLM)
        assert_close(loaded(input_ids=X).logits, model(input_ids=X).logits)


def test_auto_mapping_for_bare_models(tmp_path):
    base = llama()
    model = get_peft_model(base.model, LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["task_type"] is None
    assert raw["auto_mapping"] == {"base_model_class": "LlamaModel", "parent_library": "transformers.models.llama.modeling_llama"}


def test_sequence_classification_head_is_saved(tmp_path):
    def bert(seed):
        torch.manual_seed(seed)
        return BertForSequenceClassification(
            BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       vocab_size=64, num_labels=3)
        ).eval()

    model = get_peft_model(bert(0), LoraConfig(r=2, task_type="SEQ_CLS", init_lora_weights=False))
    assert model.peft_config["default"].modules_to_save == ["classifier", "score"]
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(f.keys())
    fresh = bert(0)
    torch.nn.init.normal_(fresh.classifier.weight)  # a new, untrained head: the saved one must replace it
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert isinstance(loaded, peftkit.PeftModelForSequenceClassification)
    ids = torch.randint(0, 64, (2, 5))
    assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_from_pretrained_builds_no_random_tensors(tmp_path, monkeypatch):
    model = get_peft_model(llama(), lora())
    model.save_pretrained(tmp_path)
    calls = []
    base = llama()
    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", lambda t, *a, **k: calls.append(t.device.type != "meta"))
    PeftModel.from_pretrained(base, tmp_path)
    assert not any(calls)  # only meta-device placeholders, no real random draws


def test_load_peft_weights_equals_peft(tmp_path):
    """``load_peft_weights`` (top level and ``peftkit.utils``) reads what PEFT's reads: safetensors, .bin, sub-folders."""
    import peft

    model = get_peft_model(llama(), lora())
    model.add_adapter("second", lora(r=2))
    model.save_pretrained(tmp_path / "st")
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert peftkit.utils.load_peft_weights is peftkit.load_peft_weights
    for folder, kwargs in [("st", {}), ("bin", {}), ("st", {"subfolder": "second"}), ("bin", {"subfolder": "second"})]:
        ours = peftkit.load_peft_weights(str(tmp_path / folder), device="cpu", **kwargs)
        theirs = peft.load_peft_weights(str(tmp_path / folder), device="cpu", **kwargs)
        assert ours.keys() == theirs.keys() and ours
        for key in theirs:
            assert torch.equal(ours[key], theirs[key]), key
    default = peftkit.load_peft_weights(str(tmp_path / "st"))  # no accelerator here: the CPU
    assert {t.device.type for t in default.values()} == {"cuda" if torch.cuda.is_available() else "cpu"}
    mapping = {r"layers\.(\d+)\.self_attn": r"blocks.\1.attn"}
    ours = peftkit.load_peft_weights(str(tmp_path / "st"), device="cpu", key_mapping=mapping)
    theirs = peft.load_peft_weights(str(tmp_path / "st"), device="cpu", key_mapping=mapping)
    assert ours.keys() == theirs.keys() and any(".blocks.0.attn." in k for k in ours)
    with pytest.raises(FileNotFoundError, match="save the adapter with save_pretrained first"):
        peftkit.load_peft_weights(str(tmp_path), device="cpu")


def test_from_pretrained_and_load_adapter_apply_key_mapping(tmp_path):
    """An adapter saved under other module names loads with ``key_mapping`` (PEFT's argument), in both libraries."""
    import peft
    from safetensors.torch import load_file, save_file

    model = get_peft_model(llama(), lora())
    model.save_pretrained(tmp_path / "a")
    state = load_file(tmp_path / "a" / "adapter_model.safetensors")
    save_file({k.replace(".self_attn.", ".attention."): v for k, v in state.items()},
              tmp_path / "a" / "adapter_model.safetensors")
    mapping = {r"\.attention\.": ".self_attn."}
    model.eval()
    expected = model(input_ids=X).logits
    for lib in (peftkit, peft):
        loaded = lib.PeftModel.from_pretrained(llama(), str(tmp_path / "a"), key_mapping=mapping)
        assert_close(loaded(input_ids=X).logits, expected)
    other = PeftModel.from_pretrained(llama(), str(tmp_path / "a"), key_mapping=mapping)
    other.load_adapter(str(tmp_path / "a"), "second", key_mapping=mapping)
    other.set_adapter("second")
    assert_close(other(input_ids=X).logits, expected)


@pytest.mark.parametrize("method", ["lora", "loha"])
def test_autocast_adapter_dtype_false_keeps_base_dtype_as_peft(tmp_path, method):
    """``autocast_adapter_dtype=False`` over a bfloat16 base: adapters stay bfloat16, outputs equal PEFT's."""
    import peft

    def config(lib):
        if method == "loha":
            return lib.LoHaConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False)
        return lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)

    def bf16_llama():
        return llama().to(torch.bfloat16)

    torch.manual_seed(3)
    ref = peft.get_peft_model(bf16_llama(), config(peft), autocast_adapter_dtype=False)
    ref.save_pretrained(tmp_path / "a")
    ours = peftkit.get_peft_model(bf16_llama(), config(peftkit), autocast_adapter_dtype=False)
    assert {p.dtype for p in ours.parameters() if p.requires_grad} == {torch.bfloat16}
    loaded = PeftModel.from_pretrained(bf16_llama(), str(tmp_path / "a"), autocast_adapter_dtype=False, is_trainable=True)
    assert {p.dtype for p in loaded.parameters() if p.requires_grad} == {torch.bfloat16}
    ref.eval()
    loaded.eval()
    ours_logits, ref_logits = loaded(input_ids=X).logits.float(), ref(input_ids=X).logits.float()
    assert float((ours_logits - ref_logits).norm() / ref_logits.norm()) < 2e-2  # bfloat16 rounding, other op order
    loaded.train()
    loaded(input_ids=X, labels=X).loss.backward()  # trains in bfloat16
    assert all(p.grad.dtype == torch.bfloat16 for p in loaded.parameters() if p.requires_grad)
    loaded.add_adapter("more", config(peftkit))  # later adapters follow the model's choice
    assert {p.dtype for n, p in loaded.named_parameters() if ".more" in n} == {torch.bfloat16}
    default = peftkit.get_peft_model(bf16_llama(), config(peftkit))
    assert {p.dtype for p in default.parameters() if p.requires_grad} == {torch.float32}
