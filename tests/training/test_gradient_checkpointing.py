"""Gradient checkpointing on a PeftModel, and prepare_model_for_kbit_training against PEFT's."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from transformers import ViTConfig, ViTForImageClassification

import peftkit
from tests.models import tiny_llama


def tiny_vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64, num_labels=3)
    return ViTForImageClassification(cfg)


def adapter_grads(model: peftkit.PeftModel, **inputs) -> dict[str, torch.Tensor]:
    model.train()
    out = model(**inputs)
    loss = out.loss if out.loss is not None else out.logits.square().mean()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def compare(make_base, config_kwargs: dict, inputs: dict, reentrant: bool) -> None:
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(1)
        model = peftkit.get_peft_model(make_base(), peftkit.LoraConfig(init_lora_weights=False, **config_kwargs))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            assert model.get_base_model().is_gradient_checkpointing
        grads.append(adapter_grads(model, **inputs))
    n_adapter = sum(1 for n, p in model.named_parameters() if p.requires_grad)
    assert len(grads[1]) == len(grads[0]) == n_adapter  # every adapter tensor got a gradient
    for name, g in grads[0].items():
        assert_close(grads[1][name], g, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_llama_gradients_reach_adapters(reentrant):
    ids = torch.randint(0, 64, (2, 12))
    compare(tiny_llama, {"r": 4, "target_modules": "all-linear"}, {"input_ids": ids, "labels": ids}, reentrant)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_vit_gradients_reach_adapters(reentrant):
    """ViT's main input is pixel_values: transformers does not make its inputs require grad, peftkit must."""
    pixels = torch.randn(2, 3, 16, 16)
    compare(tiny_vit, {"r": 4, "target_modules": ["q_proj", "v_proj"]}, {"pixel_values": pixels}, reentrant)


def test_checkpointing_enabled_before_wrapping_gets_input_grads():
    base = tiny_vit()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model = peftkit.get_peft_model(base, peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                            init_lora_weights=False))
    grads = adapter_grads(model, pixel_values=torch.randn(2, 3, 16, 16))
    assert len(grads) == sum(1 for p in model.parameters() if p.requires_grad)


def _state(model: torch.nn.Module) -> dict:
    return {
        "dtypes": {n: p.dtype for n, p in model.named_parameters()},
        "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
        "checkpointing": model.is_gradient_checkpointing,
    }


@pytest.mark.parametrize("quantized", [False, True], ids=["plain", "kbit-flag"])
@pytest.mark.parametrize("gc_kwargs", [None, {"use_reentrant": False}], ids=["default", "non-reentrant"])
def test_prepare_model_for_kbit_training_matches_peft(quantized, gc_kwargs):
    from peft import prepare_model_for_kbit_training as peft_prepare

    models = []
    for prepare in (peftkit.prepare_model_for_kbit_training, peft_prepare):
        model = tiny_llama(dtype=torch.bfloat16)
        model.lm_head.weight.data = model.lm_head.weight.data.to(torch.float16)
        if quantized:  # what a k-bit load sets; the upcast and checkpointing rules follow from it
            model.is_loaded_in_8bit = True
        out = prepare(model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs=gc_kwargs)
        assert out is model
        models.append(model)
    mine, ref = (_state(m) for m in models)
    assert mine == ref
    assert set(mine["dtypes"].values()) == {torch.float32} and mine["trainable"] == []
    assert mine["checkpointing"] is quantized  # as PEFT: checkpointing only for quantized models

    # the LoRA model built on top trains: its adapters get gradients under checkpointing
    model = peftkit.get_peft_model(models[0], peftkit.LoraConfig(r=4, target_modules="all-linear",
                                                                 init_lora_weights=False))
    ids = torch.randint(0, 64, (2, 8))
    grads = adapter_grads(model, input_ids=ids, labels=ids)
    assert len(grads) == sum(1 for p in model.parameters() if p.requires_grad) > 0


def test_prepare_keeps_dtype_of_schemes_that_store_their_own():
    model = tiny_llama(dtype=torch.bfloat16)
    model.quantization_method = "gptq"
    peftkit.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters())


def test_trainer_activation_checkpointing_trains_adapters(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = peftkit.get_peft_model(tiny_vit(), peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                 init_lora_weights=False))
    g = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": torch.tensor(i % 3)} for i in range(8)]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", activation_checkpointing=True,
                             activation_checkpointing_kwargs={"use_reentrant": True}, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data).train()
    assert checkpointing_on(model.get_base_model())
    after = dict(model.named_parameters())
    assert all(not torch.equal(after[n], p) for n, p in before.items())  # every adapter tensor was trained


def checkpointing_on(model: torch.nn.Module) -> bool:
    from peftkit.utils.training import checkpointing_is_on

    return checkpointing_is_on(model)
