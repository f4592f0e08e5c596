"""Training a prompt: only the prompt (and a classifier head) moves; causal-LM labels skip the virtual tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from .helpers import N_VIRTUAL, base_weights, batch, forward, load, make, prompt_table, quiet, save

TRAIN_CASES = [("llama", "pt_random"), ("gpt2", "ptune_mlp"), ("llama", "ptune_lstm"), ("bert", "pt_vocab"),
               ("bert", "ptune_mlp")]


def _train(model, name, steps=8, lr=5e-2):
    inputs = batch(name, with_labels=True)
    if name == "bert":  # the tiny BERT's rows look alike: one shared label is learnable
        inputs["labels"] = torch.tensor([1, 1, 1])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = quiet(model, **inputs).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses


@pytest.mark.parametrize("name,method", TRAIN_CASES, ids=[f"{n}-{m}" for n, m in TRAIN_CASES])
def test_training_moves_only_the_prompt(name, method):
    model = make("peftkit", name, method)
    before_base = base_weights(model)
    before_head = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "classifier" in k}
    before_prompt = prompt_table(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    allowed = ("prompt_encoder", "classifier") if name == "bert" else ("prompt_encoder",)
    assert all(any(a in n for a in allowed) for n in trainable), trainable
    if name == "bert":
        assert any("classifier" in n for n in trainable)
    if method.startswith("ptune"):
        assert any("mlp_head" in n for n in trainable)

    # one backward: gradients reach every trainable tensor and no base tensor
    loss = quiet(model, **batch(name, with_labels=True)).loss
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    model.zero_grad()

    losses = _train(model, name)
    assert losses[-1] < losses[0] - 1e-3, losses
    after = base_weights(model)
    assert sorted(after) == sorted(before_base)
    for k, v in before_base.items():
        assert torch.equal(after[k], v), k
    assert not torch.allclose(prompt_table(model), before_prompt)
    if name == "bert":
        head = {k: v for k, v in model.get_base_model().state_dict().items() if "classifier" in k}
        assert any(not torch.equal(head[k], v) for k, v in before_head.items() if k in head)


@pytest.mark.parametrize("name,method", [("gpt2", "pt_text"), ("llama", "ptune_mlp"), ("bert", "ptune_lstm")])
def test_training_matches_oracle(name, method):
    """Same seed, same steps (eval mode: no dropout): both libraries follow the same loss curve."""
    kit, ref = make("peftkit", name, method), make("peft", name, method)
    a, b = _train(kit, name, steps=5), _train(ref, name, steps=5)
    assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=1e-5)
    assert_close(prompt_table(kit), prompt_table(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_causal_lm_labels_skip_virtual_tokens(name):
    """The loss is the base model's next-token loss on the real tokens, given the prompt in front.

    With n virtual tokens, the logits are (batch, n + length, vocab); real token j is predicted at
    position n + j - 1 (the first real token by the last virtual token).
    """
    model = make("peftkit", name, "pt_random")
    inputs = batch(name, with_labels=True)
    out = forward(model, name)
    n, length = N_VIRTUAL, inputs["input_ids"].shape[1]
    assert out.logits.shape[:2] == (3, n + length)

    base = model.get_base_model()
    emb = base.get_input_embeddings()(inputs["input_ids"])
    prompt = prompt_table(model).unsqueeze(0).expand(3, -1, -1)
    mask = torch.cat([torch.ones(3, n, dtype=torch.long), inputs["attention_mask"]], dim=1)
    with torch.no_grad():
        logits = base(inputs_embeds=torch.cat([prompt, emb], dim=1), attention_mask=mask).logits
    assert_close(out.logits, logits, atol=1e-6, rtol=1e-6)
    labels = inputs["labels"]
    manual = F.cross_entropy(logits[:, n - 1:-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    assert_close(out.loss, manual, atol=1e-6, rtol=1e-6)
    # not the loss that would also score the virtual positions or shift wrongly
    wrong = F.cross_entropy(logits[:, n:].reshape(-1, logits.shape[-1])[:-3], labels.reshape(-1)[3:], ignore_index=-100)
    assert not torch.allclose(out.loss, wrong)
    # the caller's labels are not changed in place
    assert labels.shape == (3, length)


def test_seq_cls_labels_not_padded():
    """Sequence labels are one per row: nothing is added for the virtual tokens."""
    model = make("peftkit", "bert", "pt_random")
    inputs = batch("bert", with_labels=True)
    out = forward(model, "bert")
    logits = out.logits
    assert_close(out.loss, F.cross_entropy(logits, inputs["labels"]), atol=1e-6, rtol=1e-6)


def test_bert_token_type_ids_are_used():
    """token_type_ids get zeros for the virtual tokens (and are not dropped): changing them changes the output."""
    model = make("peftkit", "bert", "pt_random")
    inputs = batch("bert")
    with torch.no_grad():
        a = quiet(model, **inputs).logits
        b = quiet(model, **{**inputs, "token_type_ids": torch.zeros_like(inputs["token_type_ids"])}).logits
        base = model.get_base_model()
        emb = base.get_input_embeddings()(inputs["input_ids"])
        prompt = prompt_table(model).unsqueeze(0).expand(3, -1, -1)
        ones = torch.ones(3, N_VIRTUAL, dtype=torch.long)
        manual = base(inputs_embeds=torch.cat([prompt, emb], 1),
                      attention_mask=torch.cat([ones, inputs["attention_mask"]], 1),
                      token_type_ids=torch.cat([0 * ones, inputs["token_type_ids"]], 1)).logits
    assert not torch.allclose(a, b)
    assert_close(a, manual, atol=1e-6, rtol=1e-6)


def test_trained_adapter_loads_in_peft(tmp_path):
    model = make("peftkit", "bert", "ptune_lstm")
    _train(model, "bert", steps=3)
    model.eval()
    expected = forward(model, "bert").logits
    save(model, tmp_path)
    for lib in ("peft", "peftkit"):
        assert_close(forward(load(lib, "bert", tmp_path), "bert").logits, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ["pt_random", "ptune_mlp"])
def test_loaded_trainable_keeps_training(method, tmp_path):
    """from_pretrained(is_trainable=True): the (table) prompt is trainable and training continues."""
    save(make("peftkit", "llama", method), tmp_path)
    model = load("peftkit", "llama", tmp_path, is_trainable=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_encoder.default.embedding.weight"]
    before = prompt_table(model)
    losses = _train(model, "llama", steps=4)
    assert losses[-1] < losses[0]
    assert not torch.allclose(prompt_table(model), before)
    frozen = load("peftkit", "llama", tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())
