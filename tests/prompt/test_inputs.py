"""Input forms: inputs_embeds, positional ids, position_ids / token_type_ids on a causal LM, dtypes, cache off."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import peftkit

from .helpers import N_VIRTUAL, batch, build, forward, generate, make, quiet

EXACT = {"atol": 1e-6, "rtol": 1e-6}


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_inputs_embeds_same_as_input_ids(name):
    kit, ref = make("peftkit", name, "ptune_mlp"), make("peft", name, "ptune_mlp")
    inputs = batch(name, with_labels=True)
    ids = inputs.pop("input_ids")
    embeds = kit.get_base_model().get_input_embeddings()(ids).detach()
    with torch.no_grad():
        a = quiet(kit, inputs_embeds=embeds, **inputs)
        b = quiet(ref, inputs_embeds=embeds, **inputs)
    assert_close(a.logits, forward(kit, name).logits, **EXACT)
    assert_close(a.logits, b.logits, **EXACT)
    assert_close(a.loss, b.loss, **EXACT)


def test_positional_input_ids():
    model = make("peftkit", "gpt2", "pt_random")
    ids = batch("gpt2", left_pad=False)["input_ids"]
    with torch.no_grad():
        assert_close(model(ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_position_ids_and_token_type_ids_ignored_on_causal_lm(name):
    kit, ref = make("peftkit", name, "pt_random"), make("peft", name, "pt_random")
    inputs = batch(name, left_pad=False)
    extra = {"position_ids": torch.arange(6).expand(3, -1), "token_type_ids": torch.ones_like(inputs["input_ids"])}
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = kit(**inputs, **extra).logits
    assert any("position_ids" in str(w.message) for w in caught)
    with torch.no_grad():
        b = quiet(ref, **inputs, **extra).logits
    assert_close(a, b, **EXACT)
    assert_close(a, forward(kit, name, left_pad=False, with_labels=False).logits, **EXACT)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base(dtype):
    """The float32 prompt is cast to the embeddings' dtype, as PEFT does."""
    outs = []
    for lib in ("peftkit", "peft"):
        base = build("llama").to(dtype)
        m = make(lib, "llama", "pt_vocab", base=base)
        outs.append(forward(m, "llama", with_labels=False).logits)
        gen = generate(m, "llama")
        outs.append(gen)
    assert outs[0].dtype == dtype
    assert_close(outs[0], outs[2], rtol=0, atol=0)
    assert torch.equal(outs[1], outs[3])


@pytest.mark.parametrize("method", ["pt_random", "ptune_mlp"])
def test_generation_without_cache(method):
    kit, ref = make("peftkit", "llama", method), make("peft", "llama", method)
    a = generate(kit, "llama", use_cache=False)
    assert torch.equal(a, generate(ref, "llama", use_cache=False))
    assert torch.equal(a, generate(kit, "llama"))  # same tokens as with the cache


def test_generate_twice_and_restore():
    model = make("peftkit", "gpt2", "pt_vocab")
    base_cls_method = type(model.get_base_model()).prepare_inputs_for_generation
    a = generate(model, "gpt2")
    assert torch.equal(generate(model, "gpt2"), a)
    assert "prepare_inputs_for_generation" not in vars(model.get_base_model())
    assert type(model.get_base_model()).prepare_inputs_for_generation is base_cls_method
    # an error inside generate also puts the model back
    with pytest.raises(Exception):
        quiet(model.generate, **batch("gpt2"), max_new_tokens=2, num_beams=0)
    assert "prepare_inputs_for_generation" not in vars(model.get_base_model())


def test_generate_with_input_ids_only():
    """No attention_mask: every token is attended, like an all-ones mask."""
    kit, ref = make("peftkit", "llama", "pt_random"), make("peft", "llama", "pt_random")
    ids = batch("llama", left_pad=False)["input_ids"]
    with torch.no_grad():
        a = quiet(kit.generate, input_ids=ids, max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
        b = quiet(ref.generate, input_ids=ids, max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
    assert a.shape == (3, 14) and torch.equal(a, b)


def test_token_classification_labels_padded():
    """TOKEN_CLS: one label per token, so the virtual tokens get -100 (PEFT passes the labels unpadded)."""
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    base = BertForTokenClassification(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=32, num_labels=3)).eval()
    torch.manual_seed(1)
    model = quiet(peftkit.get_peft_model, base,
                  peftkit.PromptTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=N_VIRTUAL)).eval()
    inputs = batch("llama")
    labels = torch.randint(0, 3, (3, 6))
    labels[inputs["attention_mask"] == 0] = -100
    with torch.no_grad():
        out = quiet(model, **inputs, labels=labels)
    assert out.logits.shape == (3, N_VIRTUAL + 6, 3)
    manual = F.cross_entropy(out.logits[:, N_VIRTUAL:].reshape(-1, 3), labels.reshape(-1), ignore_index=-100)
    assert_close(out.loss, manual, **EXACT)
