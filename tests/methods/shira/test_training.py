"""Training SHiRA adapters: only the values move, the base stays bit-identical, the loss goes down."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import peftkit

from .helpers import add, assert_equal_tensors, base_weights, build, inputs, make, run, shira_config, shira_layers


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_few_steps_train_only_the_values(name):
    model = make("peftkit", name, r=2, init_weights=True)  # zeros: starts as the base model
    assert_close(run(model, name), run(build(name), name))
    before = base_weights(model)
    indices = {k: m.shira_indices["default"].clone() for k, m in shira_layers(model).items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("shira_weight" in n for n in trainable)
    batch = dict(inputs(name), labels=inputs(name)["input_ids"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 1e-3, losses
    assert_equal_tensors(base_weights(model), before)
    for key, layer in shira_layers(model).items():
        assert torch.equal(layer.shira_indices["default"], indices[key]), key
        assert layer.shira_weight["default"].abs().sum() > 0, key
        assert layer.base_layer.weight.grad is None
    model.eval()
    assert not torch.allclose(run(model, name), run(build(name), name))


def test_gradient_equals_dense_delta_gradient():
    """The values' gradient is the dense delta's gradient read at the positions (unfused path too)."""
    model = make("peftkit", "llama")
    add(model, "llama", "b")
    batch = dict(inputs("llama"), labels=inputs("llama")["input_ids"])
    for active in (["default"], ["default", "b"]):  # fused kernel, then the base + sparse_delta path
        model.set_adapter(active)
        model.zero_grad()
        model(**batch).loss.backward()
        ref = build("llama")
        deltas = {}
        for key, layer in shira_layers(model).items():
            sub = ref.get_submodule(key)
            delta = sum(layer.get_delta_weight(a).detach() for a in active)
            deltas[key] = torch.nn.Parameter(delta.clone())
            sub.weight.requires_grad_(False)
            sub.register_parameter("delta", deltas[key])
            sub.forward = (lambda s: lambda x: torch.nn.functional.linear(x, s.weight + s.delta, s.bias))(sub)
        ref(**batch).loss.backward()
        for key, layer in shira_layers(model).items():
            idx = layer.shira_indices["default"].long()
            expected = deltas[key].grad[idx[0], idx[1]]
            assert_close(layer.shira_weight["default"].grad, expected, atol=1e-6, rtol=1e-4)


def test_set_scale():
    model = make("peftkit", "llama")
    full = run(model, "llama")
    base = run(build("llama"), "llama")
    layers = shira_layers(model)
    for layer in layers.values():
        layer.set_scale("default", 0.0)
        layer.set_scale("missing", 3.0)  # unknown adapters are ignored
        assert "missing" not in layer.scaling
    assert_close(run(model, "llama"), base)
    for layer in layers.values():
        layer.set_scale("default", 0.5)
    half = run(model, "llama")
    # the same as halving the values at scale 1
    for layer in layers.values():
        layer.set_scale("default", 1.0)
        with torch.no_grad():
            layer.shira_weight["default"].mul_(0.5)
    assert_close(half, run(model, "llama"), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(half, full)
    for layer in layers.values():
        with torch.no_grad():
            layer.shira_weight["default"].mul_(2.0)
        layer.set_scale("default", 0.5)
        delta = layer.get_delta_weight("default")
        idx = layer.shira_indices["default"].long()
        assert_close(delta[idx[0], idx[1]], 0.5 * layer.shira_weight["default"].detach())


def test_bf16_base_model():
    fp32 = make("peftkit", "llama")
    expected = run(fp32, "llama")
    model = peftkit.get_peft_model(build("llama").to(torch.bfloat16), shira_config(peftkit, "llama"))
    for key, layer in shira_layers(model).items():  # the same adapter on a bfloat16 base
        with torch.no_grad():
            src = shira_layers(fp32)[key]
            assert torch.equal(layer.shira_indices["default"], src.shira_indices["default"])
            layer.shira_weight["default"].copy_(src.shira_weight["default"])
    for layer in shira_layers(model).values():
        assert layer.base_layer.weight.dtype == torch.bfloat16
        assert layer.shira_weight["default"].dtype == torch.float32  # values stay in float32
    before = base_weights(model)
    out = run(model, "llama").float()
    assert_close(out, expected, atol=0.15, rtol=0.1)
    model.merge_adapter()
    assert_close(run(model, "llama").float(), out, atol=0.1, rtol=0.1)
    model.unmerge_adapter()
    assert_equal_tensors(base_weights(model), before)
    # training in bf16: the values get float32 gradients, the base does not move
    model.train()
    loss = model(**dict(inputs("llama"), labels=inputs("llama")["input_ids"])).loss
    loss.backward()
    for layer in shira_layers(model).values():
        assert layer.shira_weight["default"].grad.dtype == torch.float32
    assert_equal_tensors(base_weights(model), before)
