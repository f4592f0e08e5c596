"""Prefix tuning on causal LMs: PEFT's files and outputs both ways, the cache, generation, training, errors."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import peftkit

LIBS = {"peft": peft, "peftkit": peftkit}


def _llama() -> torch.nn.Module:  # grouped-query attention: 4 heads, 2 key/value heads
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    return LlamaForCausalLM(cfg).eval()


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)).eval()


MODELS = {"llama": _llama, "gpt2": _gpt2}
CONFIGS = {
    "plain": dict(num_virtual_tokens=4),
    "projection": dict(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16),
}


def _inputs(padded: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 100, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _make(lib: str, model: str, config: str, seed: int = 1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        cfg = LIBS[lib].PrefixTuningConfig(task_type="CAUSAL_LM", **CONFIGS[config])
        return LIBS[lib].get_peft_model(MODELS[model](), cfg).eval()


def _load(lib: str, model: str, folder: str, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LIBS[lib].PeftModel.from_pretrained(MODELS[model](), folder, **kw).eval()


def _generate(m, inputs, **kw) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return m.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0, **kw)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("model", list(MODELS))
def test_same_init_outputs_and_files_as_peft(model, config, tmp_path):
    a, b = _make("peft", model, config), _make("peftkit", model, config)
    inputs = {**_inputs(padded=True), "labels": _inputs()["input_ids"]}
    with torch.no_grad():
        oa, ob = a(**inputs), b(**inputs)
    # the projection's GEMM runs on (batch, n, dim) in PEFT and on (n, dim) here: equal up to rounding
    assert torch.allclose(oa.logits, ob.logits, atol=1e-6, rtol=0)
    assert torch.allclose(oa.loss, ob.loss, atol=1e-6, rtol=0)
    a.save_pretrained(tmp_path / "peft")
    b.save_pretrained(tmp_path / "kit")
    fa, fb = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "kit"))
    assert list(fb) == ["prompt_embeddings"] == list(fa)
    assert torch.allclose(fa["prompt_embeddings"], fb["prompt_embeddings"], atol=1e-6, rtol=0)
    ca, cb = (json.load(open(tmp_path / d / "adapter_config.json")) for d in ("peft", "kit"))
    for key in ("num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers", "num_transformer_submodules",
                "encoder_hidden_size", "prefix_projection", "peft_type", "task_type"):
        assert ca[key] == cb[key], key


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("direction", [("peft", "peftkit"), ("peftkit", "peft")], ids=["peft_to_kit", "kit_to_peft"])
def test_saved_adapter_gives_the_same_outputs_and_generations_in_the_other_library(direction, model, config, tmp_path):
    src, dst = direction
    saved = _make(src, model, config)
    saved.save_pretrained(tmp_path)
    loaded = _load(dst, model, str(tmp_path))
    inputs = _inputs(padded=True)
    with torch.no_grad():
        assert torch.allclose(saved(**inputs).logits, loaded(**inputs).logits, atol=1e-6)
    full = _inputs()  # no padding: PEFT's prefix generation with left padding is not the model's own output (below)
    assert torch.equal(_generate(saved, full), _generate(loaded, full))


@pytest.mark.parametrize("model", list(MODELS))
def test_generation_with_the_cache_equals_recomputing_the_whole_sequence(model):
    m = _make("peftkit", model, "plain")
    inputs = _inputs(padded=True)
    out = _generate(m, inputs)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    for _ in range(8):  # greedy decoding without a cache: a full forward per token
        with torch.no_grad():
            nxt = m(input_ids=ids, attention_mask=mask).logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    assert torch.equal(out, ids)
    beams = _generate(m, _inputs(), num_beams=2)
    assert beams.shape == (2, 14)


def test_gqa_prefixes_are_sized_like_keys_and_values():
    m = _make("peftkit", "llama", "plain")
    cfg = m.peft_config["default"]
    assert (cfg.num_attention_heads, cfg.token_dim) == (2, 16)  # 2 kv heads × head_dim 8
    cache = m._engine.prefix_cache("default", batch_size=3)
    assert cache.get_seq_length() == 4
    assert tuple(cache.layers[0].keys.shape) == (3, 2, 4, 8)


def test_training_moves_only_the_prefix_and_lowers_the_loss():
    m = _make("peftkit", "gpt2", "projection")
    m.train()
    base = {n: p.detach().clone() for n, p in m.get_base_model().named_parameters()}
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("prompt_encoder" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    inputs = {**_inputs(), "labels": _inputs()["input_ids"]}
    losses = []
    for _ in range(8):
        loss = m(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, base[n]) for n, p in m.get_base_model().named_parameters())


def test_disable_adapter_runs_the_base_model():
    m = _make("peftkit", "llama", "plain")
    inputs = _inputs(padded=True)
    with torch.no_grad():
        with m.disable_adapter():
            off = m(**inputs).logits
        ref = _llama()(**inputs).logits
        on = m(**inputs).logits
    assert torch.equal(off, ref)
    assert not torch.allclose(on, ref)


def test_a_loaded_projection_adapter_is_a_plain_table(tmp_path):
    _make("peftkit", "gpt2", "projection").save_pretrained(tmp_path)
    loaded = _load("peftkit", "gpt2", str(tmp_path))
    names = [n for n, _ in loaded.named_parameters() if "prompt_encoder" in n]
    assert names == ["prompt_encoder.default.embedding.weight"]


def test_bad_setups_say_what_to_do():
    with pytest.raises(ValueError, match="init_weights"):
        peftkit.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, init_weights="ones")
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        peftkit.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=0)
    model = _gpt2()
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        peftkit.get_peft_model(model, peftkit.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert not hasattr(model, "peft_config")
    assert all(p.requires_grad for p in model.parameters())  # left as it was
    m = _make("peftkit", "gpt2", "plain")
    with pytest.raises(ValueError, match="past_key_values"):
        m(**_inputs(), past_key_values=m._engine.prefix_cache("default", 2))


def test_zero_init_starts_as_keys_and_values_of_zero():
    torch.manual_seed(0)
    cfg = peftkit.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, init_weights="zero")
    m = peftkit.get_peft_model(_gpt2(), cfg)
    assert torch.count_nonzero(m.get_prompt_embedding_to_save("default")) == 0


def _bert(task: str):
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100)
    cls = BertForSequenceClassification if task == "SEQ_CLS" else BertForTokenClassification
    return cls(cfg).eval()


def _llama_cls(task: str):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, pad_token_id=0)
    return LlamaForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("build,task", [(_bert, "SEQ_CLS"), (_bert, "TOKEN_CLS"), (_llama_cls, "SEQ_CLS")],
                         ids=["bert_seq", "bert_token", "llama_seq"])
def test_classification_models_match_peft_both_ways(build, task, tmp_path):
    inputs = _inputs(padded=True)
    labels = torch.tensor([0, 1]) if task == "SEQ_CLS" else torch.zeros_like(inputs["input_ids"])
    out = {}
    for lib in ("peft", "peftkit"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(1)
            m = LIBS[lib].get_peft_model(build(task), LIBS[lib].PrefixTuningConfig(task_type=task, num_virtual_tokens=4))
        m.eval()
        with torch.no_grad():
            out[lib] = m(**inputs, labels=labels)
        m.save_pretrained(tmp_path / lib)
    assert torch.equal(out["peft"].logits, out["peftkit"].logits)
    assert torch.equal(out["peft"].loss, out["peftkit"].loss)
    with torch.no_grad():
        assert not torch.allclose(out["peftkit"].logits, build(task)(**inputs).logits)
    for src, dst in (("peft", "peftkit"), ("peftkit", "peft")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = LIBS[dst].PeftModel.from_pretrained(build(task), str(tmp_path / src)).eval()
        with torch.no_grad():
            assert torch.equal(loaded(**inputs).logits, out[src].logits)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_get_prompt_gives_peft_prefix_cache(config):
    a, b = _make("peft", "llama", config), _make("peftkit", "llama", config)
    with torch.no_grad():
        ca, cb = a.get_prompt(batch_size=3), b.get_prompt(batch_size=3)
    assert type(ca).__name__ == type(cb).__name__
    assert len(ca.layers) == len(cb.layers) == 2
    for la, lb in zip(ca.layers, cb.layers):
        assert la.keys.shape == lb.keys.shape == (3, 2, CONFIGS[config]["num_virtual_tokens"], 8)
        assert torch.allclose(la.keys, lb.keys, atol=1e-6) and torch.allclose(la.values, lb.values, atol=1e-6)
