"""Llama-Adapter (adaption prompts): PEFT's files and outputs both ways, gating, generation, training, errors."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import peftkit

LIBS = {"peft": peft, "peftkit": peftkit}
SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=100)


def _llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SIZES)).eval()


def _mistral():
    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(**SIZES)).eval()


def _qwen2():
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**SIZES)).eval()


def _inputs(padded: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 100, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _make(lib: str, build=_llama, seed: int = 1, gate: float | None = 0.7, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        cfg = LIBS[lib].AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=4, adapter_layers=2, **kw)
        m = LIBS[lib].get_peft_model(build(), cfg).eval()
    if gate is not None:  # the gate starts at 0 (the base model): open it so the prompts matter
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "adaption_gate" in n:
                    p.fill_(gate)
    return m


def _generate(m, **kw) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return m.generate(**_inputs(), max_new_tokens=8, do_sample=False, pad_token_id=0, **kw)


def test_same_seed_same_tensors_outputs_and_files_as_peft(tmp_path):
    a, b = _make("peft"), _make("peftkit")
    with torch.no_grad():
        oa, ob = a(**_inputs(), labels=_inputs()["input_ids"]), b(**_inputs(), labels=_inputs()["input_ids"])
    assert torch.equal(oa.logits, ob.logits) and torch.equal(oa.loss, ob.loss)
    a.save_pretrained(tmp_path / "peft")
    b.save_pretrained(tmp_path / "kit")
    fa, fb = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "kit"))
    assert sorted(fa) == sorted(fb) == [
        f"base_model.model.model.layers.{i}.self_attn.{p}" for i in (1, 2) for p in ("adaption_gate", "adaption_prompt")
    ]
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    assert fb["base_model.model.model.layers.2.self_attn.adaption_prompt"].shape == (1, 4, 32)
    ca, cb = (json.load(open(tmp_path / d / "adapter_config.json")) for d in ("peft", "kit"))
    for key in ("peft_type", "task_type", "adapter_len", "adapter_layers", "target_modules"):
        assert ca[key] == cb[key], key


@pytest.mark.parametrize("direction", [("peft", "peftkit"), ("peftkit", "peft")], ids=["peft_to_kit", "kit_to_peft"])
def test_saved_adapter_gives_the_same_outputs_and_generations_in_the_other_library(direction, tmp_path):
    src, dst = direction
    saved = _make(src)
    saved.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = LIBS[dst].PeftModel.from_pretrained(_llama(), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(saved(**_inputs()).logits, loaded(**_inputs()).logits)
    assert torch.equal(_generate(saved), _generate(loaded))


def test_zero_gate_starts_as_the_base_model_and_the_prompt_matters_once_open():
    m = _make("peftkit", gate=None)
    with torch.no_grad():
        ref = _llama()(**_inputs()).logits
        assert torch.equal(m(**_inputs()).logits, ref)
        opened = _make("peftkit")(**_inputs()).logits
        with m.disable_adapter():
            assert torch.equal(m(**_inputs()).logits, ref)
    assert not torch.allclose(opened, ref)


@pytest.mark.parametrize("build", [_mistral, _qwen2], ids=["mistral", "qwen2"])
def test_other_llama_family_models(build, tmp_path):
    m = _make("peftkit", build=build)
    with torch.no_grad():
        assert not torch.allclose(m(**_inputs()).logits, build()(**_inputs()).logits)
    out = _generate(m)
    ids, mask = _inputs()["input_ids"], _inputs()["attention_mask"]
    for _ in range(8):  # greedy without a cache: the prompts do not live in the cache
        with torch.no_grad():
            nxt = m(input_ids=ids, attention_mask=mask).logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    assert torch.equal(out, ids)
    m.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peftkit.PeftModel.from_pretrained(build(), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(m(**_inputs()).logits, again(**_inputs()).logits)


def test_training_moves_only_the_prompts_and_gates():
    m = _make("peftkit", gate=None)
    m.train()
    base = {n: p.detach().clone() for n, p in _llama().named_parameters()}
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert len(trainable) == 4 and all("adaption_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=5e-2)
    inputs = {**_inputs(padded=False), "labels": _inputs()["input_ids"]}
    losses = []
    for _ in range(8):
        loss = m(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    gates = [p for n, p in m.named_parameters() if "adaption_gate" in n]
    assert all(g.abs().item() > 0 for g in gates)
    for n, p in m.get_base_model().named_parameters():
        if "adaption_" in n:
            continue
        key = n.replace(".base_layer", "")
        assert torch.equal(p, base[key]), n


def test_two_adapters_switch_and_delete():
    m = _make("peftkit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(3)
        m.add_adapter("other", peftkit.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=2, adapter_layers=1))
    with torch.no_grad():
        first = m(**_inputs()).logits
        m.set_adapter("other")
        for n, p in m.named_parameters():
            if "adaption_gate.other" in n:
                p.fill_(0.5)
        second = m(**_inputs()).logits
        assert not torch.allclose(first, second)
        m.set_adapter("default")
        assert torch.equal(m(**_inputs()).logits, first)
    m.delete_adapter("other")
    assert list(m.peft_config) == ["default"]


def test_errors_say_what_to_do():
    with pytest.raises(ValueError, match="adapter_len"):
        peftkit.AdaptionPromptConfig(adapter_len=0, adapter_layers=1)
    with pytest.raises(ValueError, match="adapter_layers"):
        peftkit.AdaptionPromptConfig(adapter_len=4, adapter_layers=None)
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64))
    with pytest.raises(ValueError, match="llama, mistral, qwen2"):
        peftkit.get_peft_model(gpt2, peftkit.AdaptionPromptConfig(adapter_len=4, adapter_layers=1))
    assert not hasattr(gpt2, "peft_config")
    model = _llama()
    with pytest.raises(ValueError, match="at most 3"):
        peftkit.get_peft_model(model, peftkit.AdaptionPromptConfig(adapter_len=4, adapter_layers=5))
    assert not any("adaption" in n for n, _ in model.named_parameters())
    m = _make("peftkit")
    with pytest.raises(ValueError, match="merge"):
        m.merge_and_unload()
    assert copy.deepcopy(m).unload().__class__ is LlamaForCausalLM
