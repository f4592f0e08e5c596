"""Prompt tuning and P-tuning on encoder-decoder models (T5, BART): the encoder's input gets the prompt."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

import peftkit

LIBS = {"peft": peft, "peftkit": peftkit}


def _t5():
    torch.manual_seed(0)
    cfg = T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=100, decoder_start_token_id=0,
                   pad_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


def _bart():
    torch.manual_seed(0)
    cfg = BartConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                     encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100, max_position_embeddings=64)
    return BartForConditionalGeneration(cfg).eval()


MODELS = {"t5": _t5, "bart": _bart}
METHODS = {
    "prompt_tuning": lambda L: L.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4),
    "p_tuning": lambda L: L.PromptEncoderConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4, encoder_hidden_size=16),
    # the decoder's self-attention gets key/value prefixes (PEFT's layer layout, see PromptModel.prefix_cache)
    "prefix_tuning": lambda L: L.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4),
}


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(3, 100, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # right padding
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(3, 100, (2, 4), generator=g)}


def _make(lib: str, model: str, method: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        return LIBS[lib].get_peft_model(MODELS[model](), METHODS[method](LIBS[lib])).eval()


def _generate(m) -> torch.Tensor:
    b = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return m.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], max_new_tokens=8,
                          do_sample=False)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("model", list(MODELS))
def test_same_init_outputs_and_two_submodules_as_peft(model, method):
    a, b = _make("peft", model, method), _make("peftkit", model, method)
    with torch.no_grad():
        oa, ob = a(**_batch()), b(**_batch())
    assert torch.equal(oa.logits, ob.logits) and torch.equal(oa.loss, ob.loss)
    assert b.peft_config["default"].num_transformer_submodules == 2
    saved = b.get_prompt_embedding_to_save("default")
    if method == "prefix_tuning":  # n rows of layers · 2 · token_dim
        assert saved.shape == (4, 2 * 2 * 32)
    else:  # the table has 2·n rows (PEFT's layout); only the first n reach the encoder
        assert saved.shape == (8, 32)
    with torch.no_grad():
        assert not torch.allclose(ob.logits, MODELS[model]()(**_batch()).logits)
    assert torch.equal(_generate(a), _generate(b))


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("direction", [("peft", "peftkit"), ("peftkit", "peft")], ids=["peft_to_kit", "kit_to_peft"])
def test_saved_adapter_works_in_the_other_library(direction, model, method, tmp_path):
    src, dst = direction
    saved = _make(src, model, method)
    saved.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = LIBS[dst].PeftModel.from_pretrained(MODELS[model](), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.allclose(saved(**_batch()).logits, loaded(**_batch()).logits, atol=1e-6)
    assert torch.equal(_generate(saved), _generate(loaded))


def test_training_lowers_the_loss_and_touches_only_the_prompt():
    m = _make("peftkit", "t5", "prompt_tuning")
    m.train()
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_encoder.default.embedding.weight"]
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(8):
        loss = m(**_batch()).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
