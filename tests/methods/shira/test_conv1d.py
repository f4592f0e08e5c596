"""SHiRA on GPT-2's transformers Conv1D (weights stored (in, out)): peftkit only (PEFT adapts nn.Linear)."""

from __future__ import annotations

import torch
from torch.testing import assert_close

import peftkit

from .helpers import assert_equal_tensors, base_weights, dense_reference, load, make, run, save, shira_layers

NAME = "gpt2"


def test_positions_in_the_stored_layout_and_forward():
    model = make("peftkit", NAME, r=2)
    assert model.peft_config["default"].fan_in_fan_out is True  # set for Conv1D targets
    layers = shira_layers(model)
    assert len(layers) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in 2 blocks
    deltas = {}
    for key, layer in layers.items():
        w = layer.base_layer.weight  # (in, out)
        assert type(layer.base_layer).__name__ == "Conv1D"
        idx = layer.shira_indices["default"]
        assert idx.shape == (2, 2 * sum(w.shape))
        assert int(idx[0].max()) < w.shape[0] and int(idx[1].max()) < w.shape[1]
        delta = layer.get_delta_weight("default")
        assert delta.shape == w.shape
        values = layer.shira_weight["default"].detach()
        expected = torch.zeros_like(w).index_put_((idx[0].long(), idx[1].long()), values)
        assert torch.equal(delta, expected), key
        deltas[key] = delta
    assert_close(run(model, NAME), dense_reference(model, NAME, deltas), atol=1e-5, rtol=1e-5)


def test_merge_is_exact():
    model = make("peftkit", NAME)
    before = base_weights(model)
    out = run(model, NAME)
    model.merge_adapter(safe_merge=True)
    assert_close(run(model, NAME), out, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    assert_equal_tensors(base_weights(model), before)
    plain = model.merge_and_unload()
    assert_close(run(plain, NAME), out, atol=1e-5, rtol=1e-5)


def test_save_load_roundtrip(tmp_path):
    model = make("peftkit", NAME)
    expected = run(model, NAME)
    save(model, tmp_path)
    loaded = load("peftkit", NAME, tmp_path)
    assert isinstance(loaded, peftkit.PeftModel)
    assert_close(run(loaded, NAME), expected)
    for key, layer in shira_layers(loaded).items():
        assert torch.equal(layer.shira_indices["default"], shira_layers(model)[key].shira_indices["default"])
    trainable = load("peftkit", NAME, tmp_path, is_trainable=True)
    trainable.train()
    ids = torch.randint(3, 60, (2, 5))
    trainable(input_ids=ids, labels=ids).loss.backward()
    assert all(layer.shira_weight["default"].grad is not None for layer in shira_layers(trainable).values())
