"""Prompt tuning and P-tuning move both ways between peftkit and HF PEFT (the oracle), with identical outputs."""

from __future__ import annotations

import peft
import pytest
import torch
from torch.testing import assert_close

import peftkit

from .helpers import (
    DIRECTION_IDS, DIRECTIONS, LM_NAMES, METHOD_NAMES, N_VIRTUAL, NAMES, batch, build, forward, generate, load, make,
    prompt_table, read_config, save, saved_tensors, text_ids,
)

EXACT = {"atol": 1e-6, "rtol": 1e-6}
CASES = [(n, m) for n in NAMES for m in METHOD_NAMES]
CASE_IDS = [f"{n}-{m}" for n, m in CASES]


@pytest.mark.parametrize("name,method", CASES, ids=CASE_IDS)
def test_same_init_same_logits_and_loss(name, method):
    kit, ref = make("peftkit", name, method), make("peft", name, method)
    assert isinstance(kit, peftkit.PeftModel)
    assert_close(prompt_table(kit), prompt_table(ref), **EXACT)
    out_kit, out_ref = forward(kit, name), forward(ref, name)
    base_out = forward(build(name), name)
    # the virtual tokens are in the causal LM's logits; a classifier's logits keep their shape
    if name == "bert":
        assert out_kit.logits.shape == base_out.logits.shape == (3, 3)
    else:
        assert out_kit.logits.shape == (3, N_VIRTUAL + 6, base_out.logits.shape[-1])
    assert not torch.allclose(out_kit.logits[:, -6:] if name != "bert" else out_kit.logits, base_out.logits, atol=1e-4)
    assert_close(out_kit.logits, out_ref.logits, **EXACT)
    assert_close(out_kit.loss, out_ref.loss, **EXACT)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_get_prompt_matches_peft(method):
    kit, ref = make("peftkit", "llama", method), make("peft", "llama", method)
    got, want = kit.get_prompt(batch_size=2), ref.get_prompt(batch_size=2)
    assert got.shape == want.shape == (2, N_VIRTUAL, want.shape[-1])
    assert_close(got, want, **EXACT)
    got.sum().backward()  # in training the prompt is a function of the trained tensors
    assert all(p.grad is not None for n, p in kit.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="multitask"):
        kit.get_prompt(batch_size=2, task_ids=torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("n", [2, 5])
@pytest.mark.parametrize("name", NAMES)
def test_text_init_uses_the_text_tokens(name, n):
    """TEXT: row i of the table is the embedding of token i of the text, repeated or cut to length."""
    model = make("peftkit", name, "pt_text", num_virtual_tokens=n)
    assert_close(prompt_table(model), prompt_table(make("peft", name, "pt_text", num_virtual_tokens=n)), **EXACT)
    ids = (text_ids("alpha beta gamma") * 2)[:n]
    emb = build(name).get_input_embeddings().weight.detach()
    assert_close(prompt_table(model), emb[ids], rtol=0, atol=0)


def test_sample_vocab_rows_are_vocabulary_embeddings():
    model = make("peftkit", "llama", "pt_vocab")
    emb = build("llama").get_input_embeddings().weight.detach()
    for row in prompt_table(model):
        assert (emb - row).abs().amax(dim=1).min() == 0


@pytest.mark.parametrize("name,method", CASES, ids=CASE_IDS)
def test_same_file_format(name, method, tmp_path):
    t_kit = saved_tensors(str(save(make("peftkit", name, method), tmp_path / "kit")))
    t_ref = saved_tensors(str(save(make("peft", name, method), tmp_path / "ref")))
    expected = {"prompt_embeddings"} | ({"base_model.classifier.weight", "base_model.classifier.bias"}
                                        if name == "bert" else set())
    assert set(t_ref) == expected  # the oracle's format, as the brief describes it
    assert set(t_kit) == expected
    for key, v in t_ref.items():
        assert t_kit[key].dtype == v.dtype and t_kit[key].shape == v.shape, key
        assert_close(t_kit[key], v, **EXACT)
    assert t_kit["prompt_embeddings"].shape == (N_VIRTUAL, build(name).get_input_embeddings().weight.shape[1])


@pytest.mark.parametrize("src,dst", DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("name,method", CASES, ids=CASE_IDS)
def test_adapter_loads_in_other_library(src, dst, name, method, tmp_path):
    model = make(src, name, method)
    with torch.no_grad():  # make the classifier head differ from its base init, so loading it matters
        if name == "bert":
            model.get_base_model().classifier.weight.mul_(3.0)
    expected = forward(model, name)
    save(model, tmp_path)
    loaded = load(dst, name, tmp_path)
    assert isinstance(loaded, peft.PeftModel if dst == "peft" else peftkit.PeftModel)
    got = forward(loaded, name)
    assert_close(got.logits, expected.logits, **EXACT)
    assert_close(got.loss, expected.loss, **EXACT)
    assert_close(prompt_table(loaded), prompt_table(model), **EXACT)


# --------------------------------------------------------------------------- generation
GEN_CASES = [(n, m) for n in LM_NAMES for m in METHOD_NAMES]
GEN_IDS = [f"{n}-{m}" for n, m in GEN_CASES]


@pytest.mark.parametrize("name,method", GEN_CASES, ids=GEN_IDS)
def test_greedy_generation_matches_left_padded(name, method):
    kit, ref = make("peftkit", name, method), make("peft", name, method)
    out_kit, out_ref = generate(kit, name), generate(ref, name)
    assert out_kit.shape == (3, 6 + 8)
    assert torch.equal(out_kit[:, :6], batch(name)["input_ids"])  # the prompt is not in the output
    assert torch.equal(out_kit, out_ref)
    # the prompt changes what is generated
    assert not torch.equal(out_kit, generate(build(name), name))


@pytest.mark.parametrize("name", LM_NAMES)
def test_greedy_generation_no_padding_and_single_row(name):
    kit, ref = make("peftkit", name, "pt_random"), make("peft", name, "pt_random")
    assert torch.equal(generate(kit, name, left_pad=False), generate(ref, name, left_pad=False))
    one = {k: v[1:2] for k, v in batch(name, left_pad=False).items()}
    with torch.no_grad():
        a = kit.generate(**one, max_new_tokens=10, min_new_tokens=10, pad_token_id=0)
        b = ref.generate(**one, max_new_tokens=10, min_new_tokens=10, pad_token_id=0)
    assert a.shape == (1, 16) and torch.equal(a, b)


@pytest.mark.parametrize("name", LM_NAMES)
def test_greedy_generation_matches_forward(name):
    """Greedy generation with the key/value cache equals argmax of full forwards with the prompt."""
    kit = make("peftkit", name, "ptune_mlp")
    inputs = batch(name, left_pad=False)
    out = generate(kit, name, left_pad=False, max_new_tokens=4, min_new_tokens=4)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        for _ in range(4):
            logits = kit(input_ids=ids, attention_mask=mask).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(out, ids)


@pytest.mark.parametrize("method", ["pt_random", "ptune_lstm"])
@pytest.mark.parametrize("name", LM_NAMES)
def test_sampling_matches_under_seed(name, method):
    kit, ref = make("peftkit", name, method), make("peft", name, method)
    kw = {"do_sample": True, "top_k": 10, "temperature": 1.5}
    a, b = generate(kit, name, seed=7, **kw), generate(ref, name, seed=7, **kw)
    assert a.shape == (3, 14) and torch.equal(a, b)
    assert torch.equal(generate(kit, name, seed=7, **kw), a)  # reproducible
    assert not torch.equal(generate(kit, name, seed=8, **kw), a)  # and really sampled


@pytest.mark.parametrize("method", ["pt_vocab", "ptune_mlp"])
@pytest.mark.parametrize("name", LM_NAMES)
def test_beam_search_matches(name, method):
    kit, ref = make("peftkit", name, method), make("peft", name, method)
    a, b = generate(kit, name, num_beams=2), generate(ref, name, num_beams=2)
    assert a.shape == (3, 14) and torch.equal(a, b)


@pytest.mark.parametrize("src,dst", DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("name", LM_NAMES)
def test_generation_after_loading_in_other_library(src, dst, name, tmp_path):
    model = make(src, name, "ptune_lstm")
    expected = generate(model, name)
    loaded = load(dst, name, save(model, tmp_path))
    assert torch.equal(generate(loaded, name), expected)
    # the base model's generate is untouched afterwards
    assert torch.equal(generate(loaded.get_base_model(), name), generate(build(name), name))


def test_saved_config_matches(tmp_path):
    save(make("peftkit", "llama", "ptune_lstm"), tmp_path / "kit")
    save(make("peft", "llama", "ptune_lstm"), tmp_path / "ref")
    assert read_config(str(tmp_path / "kit"))["peft_type"] == read_config(str(tmp_path / "ref"))["peft_type"] == "P_TUNING"


@pytest.mark.parametrize("name,method", [("llama", "pt_random"), ("gpt2", "ptune_lstm"), ("bert", "ptune_mlp")],
                         ids=["llama-pt", "gpt2-ptune_lstm", "bert-ptune_mlp"])
def test_module_tree_and_full_state_dict_are_peft(name, method):
    """base_model is the user's model and the prompt encoders hang off the PeftModel, as in PEFT:
    the full state_dict has PEFT's keys and loads across the libraries."""
    from transformers import PreTrainedModel

    kit, ref = make("peftkit", name, method), make("peft", name, method, seed=7)
    assert isinstance(kit.base_model, PreTrainedModel) and kit.base_model is kit.get_base_model()
    assert list(kit.prompt_encoder) == ["default"] and kit.word_embeddings is kit.base_model.get_input_embeddings()
    sd_kit, sd_ref = kit.state_dict(), ref.state_dict()
    assert list(sd_kit) == list(sd_ref)
    assert all(sd_kit[k].shape == sd_ref[k].shape for k in sd_ref)
    kit.load_state_dict(sd_ref)  # PEFT's whole state into peftkit: same outputs
    kit.eval(), ref.eval()
    assert_close(forward(kit, name).logits, forward(ref, name).logits, **EXACT)
    assert not kit._engine.training and not kit.prompt_encoder.training  # eval() reaches the engine too
    kit.train()
    assert kit._engine.training and kit.base_model.training
