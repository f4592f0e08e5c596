"""LoRA trains: plain loops, transformers.Trainer, gradient checkpointing, and generate()."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

import peftkit
from tests.models import tiny_llama


def lora(**kw) -> peftkit.LoraConfig:
    return peftkit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM", **kw)


def test_training_reduces_loss_and_leaves_base_frozen():
    model = peftkit.get_peft_model(tiny_llama(), lora())
    base_before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    batch = torch.randint(0, 64, (4, 16))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    model.train()
    for _ in range(15):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    for k, v in model.state_dict().items():
        if k in base_before:
            assert torch.equal(v, base_before[k]), k


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_matches_plain_gradients(reentrant):
    batch = torch.randint(0, 64, (2, 12))
    grads = []
    for checkpointing in (False, True):
        base = tiny_llama()
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        torch.manual_seed(1)
        model = peftkit.get_peft_model(base, lora(init_lora_weights=False))
        model.train()
        model(input_ids=batch, labels=batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert_close(grads[1][name], g, atol=1e-5, rtol=1e-4)


def test_trainer_runs_and_saves_adapter_only(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = peftkit.get_peft_model(tiny_llama(), lora())
    data = [{"input_ids": torch.randint(0, 64, (16,))} for _ in range(16)]
    for row in data:
        row["labels"] = row["input_ids"].clone()
    before = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
    )
    Trainer(model=model, args=args, train_dataset=data).train()
    after = dict(model.named_parameters())
    assert any(not torch.equal(after[n], p) for n, p in before.items())
    model.save_pretrained(tmp_path / "adapter")
    reloaded = peftkit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    x = torch.randint(0, 64, (2, 8))
    model.eval()
    assert_close(reloaded(input_ids=x).logits, model(input_ids=x).logits)


@pytest.mark.parametrize("method", ["lora", "dora", "lokr"])
def test_trainer_bf16_mixed_precision(tmp_path, method):
    """TrainingArguments(bf16=True) runs the steps under torch.autocast: the fused kernels must take part."""
    from transformers import Trainer, TrainingArguments

    config = peftkit.LoKrConfig(r=4, target_modules="all-linear") if method == "lokr" else lora(use_dora=method == "dora")
    model = peftkit.get_peft_model(tiny_llama(), config)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": (row := torch.randint(0, 64, (16,), generator=g)), "labels": row} for _ in range(16)]
    before = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, bf16=True,
        report_to=[], use_cpu=True, save_strategy="no",
    )
    result = Trainer(model=model, args=args, train_dataset=data).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    after = dict(model.named_parameters())
    assert all(after[n].dtype == torch.float32 for n in before)  # the adapters stay float32
    assert any(not torch.equal(after[n], p) for n, p in before.items())


def test_generate_matches_merged_model():
    torch.manual_seed(2)
    model = peftkit.get_peft_model(tiny_llama(), lora(init_lora_weights=False)).eval()
    prompt = torch.randint(1, 64, (2, 5))
    out = model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False)
    merged = copy.deepcopy(model).merge_and_unload()
    ref = merged.generate(input_ids=prompt, max_new_tokens=8, do_sample=False)
    assert out.shape == (2, 13)
    assert torch.equal(out, ref)
    with model.disable_adapter():
        base_out = model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(base_out, tiny_llama().generate(input_ids=prompt, max_new_tokens=8, do_sample=False))


def test_generate_with_per_sample_adapters():
    torch.manual_seed(3)
    model = peftkit.get_peft_model(tiny_llama(), lora(init_lora_weights=False)).eval()
    model.add_adapter("other", lora(init_lora_weights=False))
    prompt = torch.randint(1, 64, (3, 5))
    names = ["default", "other", "__base__"]
    mixed = model.generate(input_ids=prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, adapter_names=names)
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                single = model.generate(input_ids=prompt[i : i + 1], max_new_tokens=6, min_new_tokens=6, do_sample=False)
        else:
            model.set_adapter(name)
            single = model.generate(input_ids=prompt[i : i + 1], max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert torch.equal(mixed[i : i + 1], single)
