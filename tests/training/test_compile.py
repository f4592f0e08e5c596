"""torch.compile traces peftkit's layers without a graph break (fullgraph=True), and gives eager's loss and gradients.

Layers read per-call options through a plain mirror when compiled (dynamo cannot trace a
ContextVar), and no method reads a tensor back to Python on the training path."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import peftkit

T = ["0", "2"]
CONFIGS = {
    "lora": lambda: peftkit.LoraConfig(r=4, target_modules=T, init_lora_weights=False),
    "dora": lambda: peftkit.LoraConfig(r=4, target_modules=T, use_dora=True, init_lora_weights=False),
    "lokr": lambda: peftkit.LoKrConfig(r=4, target_modules=T, init_weights=False),
    "loha": lambda: peftkit.LoHaConfig(r=4, target_modules=T, init_weights=False),
    "ia3": lambda: peftkit.IA3Config(target_modules=T, feedforward_modules=["2"], init_ia3_weights=False),
    "oft": lambda: peftkit.OFTConfig(r=0, oft_block_size=4, target_modules=T, init_weights=False),
    "boft": lambda: peftkit.BOFTConfig(boft_block_size=4, target_modules=T, init_weights=False),
}


def _step(call, model, x):
    model.zero_grad(set_to_none=True)
    loss = call(x).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_fullgraph_compile_matches_eager(method):
    torch.manual_seed(0)
    model = peftkit.get_peft_model(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)), CONFIGS[method]())
    model.train()
    x = torch.randn(4, 16)
    eager_loss, eager_grads = _step(model, model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # any graph break raises
    for _ in range(2):  # the second call reuses the graph (no guard fails on the options mirror)
        loss, grads = _step(compiled, model, x)
    assert_close(loss, eager_loss)
    assert grads.keys() == eager_grads.keys()
    for name in grads:
        assert_close(grads[name], eager_grads[name], msg=name)
