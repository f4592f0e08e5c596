"""BOFT with butterfly factors 2 and 3 against the dense math (PEFT on CPU forces factor 1, so
the oracle here is ``M = B_{N−1} ⋯ B_0`` built from PEFT's permutations; see ``helpers.dense_m``).

For a Linear: ``y = s ⊙ (x M Wᵀ) + b`` and the merged weight is ``s ⊙ (W Mᵀ)``; for a Conv2d the
same rotation acts on the flattened (in_channels · kh · kw) axis of the weight.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import peftkit

from .helpers import dense_m, layer_of, out, quiet_call


class FNet(nn.Module):
    """Linear and Conv2d, both with 16 input features (even block counts for factors up to 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 10)
        self.conv = nn.Conv2d(4, 6, 2, stride=1, padding=1)  # fan_in 4·2·2 = 16

    def forward(self, x, img):
        return torch.cat([self.lin(x).flatten(1), self.conv(img).flatten(1)], 1)


def _inputs(batch: int = 3):
    g = torch.Generator().manual_seed(3)
    return {"x": torch.randn(batch, 2, 16, generator=g), "img": torch.randn(batch, 4, 4, 4, generator=g)}


def _make(seed: int = 1, **kw):
    torch.manual_seed(0)
    base = FNet().eval()
    torch.manual_seed(seed)
    cfg = peftkit.BOFTConfig(target_modules=["lin", "conv"], init_weights=False, **kw)
    return quiet_call(peftkit.get_peft_model, base, cfg).eval()


LAYOUTS = [
    {"boft_block_size": 2, "boft_n_butterfly_factor": 2},
    {"boft_block_size": 2, "boft_n_butterfly_factor": 3},
    {"boft_block_size": 2, "boft_n_butterfly_factor": 4},  # log2(8 blocks) + 1: full mixing
    {"boft_block_size": 4, "boft_n_butterfly_factor": 3},
    {"boft_block_size": 0, "boft_block_num": 4, "boft_n_butterfly_factor": 2},
]
IDS = ["bs2_f2", "bs2_f3", "bs2_f4", "bs4_f3", "num4_f2"]


@pytest.mark.parametrize("kw", LAYOUTS, ids=IDS)
def test_linear_forward_and_merge_equal_dense_math(kw):
    model = _make(**kw)
    layer = layer_of(model, "lin")
    boft_r = layer.boft_R["default"]
    assert boft_r.shape[0] == kw["boft_n_butterfly_factor"]
    m = dense_m(boft_r)
    s = layer.boft_s["default"].detach().double().reshape(-1)  # (out,)
    w, b = layer.base_layer.weight.detach().double(), layer.base_layer.bias.detach().double()
    x = _inputs()["x"]
    expected = s * (x.double() @ m @ w.T) + b
    assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)
    merged = quiet_call(copy.deepcopy(model).merge_and_unload)
    assert_close(merged.lin.weight.double(), s[:, None] * (w @ m.T), atol=1e-5, rtol=1e-5)
    assert torch.equal(merged.lin.bias, layer.base_layer.bias)
    # M is orthogonal (a product of exactly orthogonal butterfly factors) and not a block-diagonal matrix
    assert_close(m.T @ m, torch.eye(16, dtype=torch.float64), atol=1e-10, rtol=0)
    bs = boft_r.shape[-1]
    off_block = m.clone()
    for j in range(0, 16, bs):
        off_block[j : j + bs, j : j + bs] = 0
    assert off_block.abs().max() > 1e-3


@pytest.mark.parametrize("kw", LAYOUTS, ids=IDS)
def test_conv2d_forward_and_merge_equal_dense_math(kw):
    model = _make(**kw)
    layer = layer_of(model, "conv")
    m = dense_m(layer.boft_R["default"])
    s = layer.boft_s["default"].detach().double().reshape(-1)
    assert layer.boft_s["default"].shape == (1, 6)
    base = layer.base_layer
    w = base.weight.detach().double()
    rotated = (s[:, None] * (w.reshape(6, -1) @ m.T)).reshape(w.shape)
    img = _inputs()["img"]
    expected = F.conv2d(img.double(), rotated, base.bias.double(), padding=1)
    assert_close(layer(img).double(), expected, atol=1e-5, rtol=1e-5)
    merged = quiet_call(copy.deepcopy(model).merge_and_unload)
    assert_close(merged.conv.weight.double(), rotated, atol=1e-5, rtol=1e-5)


def test_llama_factor2_matches_dense_math():
    from tests.compat._helpers import build

    base = build("llama")
    torch.manual_seed(1)
    model = quiet_call(peftkit.get_peft_model, base, peftkit.BOFTConfig(
        boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj", "down_proj"], init_weights=False,
        task_type="CAUSAL_LM")).eval()
    layer = layer_of(model, "model.layers.0.mlp.down_proj")
    assert layer.boft_R["default"].shape == (2, 8, 4, 4)
    m = dense_m(layer.boft_R["default"])
    s = layer.boft_s["default"].detach().double().reshape(-1)
    w = layer.base_layer.weight.detach().double()
    x = torch.randn(2, 3, 32)
    assert_close(layer(x).double(), s * (x.double() @ m @ w.T), atol=1e-5, rtol=1e-5)
    merged = quiet_call(copy.deepcopy(model).merge_and_unload)
    assert_close(out(merged, "llama"), out(model, "llama"), atol=1e-5, rtol=1e-5)


def test_gpt2_conv1d_fan_in_fan_out():
    """Conv1D stores (in, out): merged weight is (M W_stored) with columns scaled by s."""
    from tests.compat._helpers import build

    torch.manual_seed(1)
    model = quiet_call(peftkit.get_peft_model, build("gpt2"), peftkit.BOFTConfig(
        boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["c_attn", "c_fc"], init_weights=False,
        task_type="CAUSAL_LM")).eval()
    assert model.peft_config["default"].fan_in_fan_out
    layer = layer_of(model, "transformer.h.0.attn.c_attn")
    m = dense_m(layer.boft_R["default"])
    s = layer.boft_s["default"].detach().double().reshape(-1)
    assert layer.boft_s["default"].shape == (48, 1)
    stored = layer.base_layer.weight.detach().double()  # (16, 48)
    merged = quiet_call(copy.deepcopy(model).merge_and_unload)
    assert_close(merged.transformer.h[0].attn.c_attn.weight.double(), (m @ stored) * s[None, :], atol=1e-5, rtol=1e-5)
    assert_close(out(merged, "gpt2"), out(model, "gpt2"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("factor", [2, 3])
def test_identity_at_init(factor):
    torch.manual_seed(0)
    reference = FNet().eval()
    torch.manual_seed(0)
    model = quiet_call(peftkit.get_peft_model, FNet().eval(), peftkit.BOFTConfig(
        target_modules=["lin", "conv"], boft_block_size=2, boft_n_butterfly_factor=factor)).eval()
    with torch.no_grad():
        assert_close(model(**_inputs()), reference(**_inputs()), atol=1e-6, rtol=0)
