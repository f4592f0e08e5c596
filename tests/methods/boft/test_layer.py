"""BOFT in peftkit alone: merging, several adapters, mixed batches, validation, property, training.

Cases run on ``FNet`` (Linear and Conv2d with 16 input features) with butterfly factors 1 and 2.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close

import peftkit
from peftkit import AdapterLayer

from .helpers import dense_m, layer_of, quiet_call
from .test_butterfly import FNet, _inputs, _make

FACTORS = [1, 2]


def _run(model, **kw):
    with torch.no_grad():
        return model(**_inputs(**kw))


def _base_out():
    torch.manual_seed(0)
    with torch.no_grad():
        return FNet().eval()(**_inputs())


def _state(model):
    return {k: v.clone() for k, v in model.get_base_model().state_dict().items()}


@pytest.mark.parametrize("factor", FACTORS)
def test_merge_unmerge_restores_weights(factor):
    model = _make(boft_block_size=4, boft_n_butterfly_factor=factor)
    before, expected = _state(model), _run(model)
    model.merge_adapter()
    assert all(layer_of(model, n).merged for n in ("lin", "conv"))
    assert _state(model)["lin.base_layer.weight"].ne(before["lin.base_layer.weight"]).any()
    assert_close(_run(model), expected, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    for k, v in _state(model).items():
        assert_close(v, before[k], atol=1e-5, rtol=1e-5, msg=k)
    assert_close(_run(model), expected, atol=1e-5, rtol=1e-5)


def test_safe_merge_refuses_nan_and_unmerge_refuses_zero_scale():
    model = _make(boft_block_size=4, boft_n_butterfly_factor=2)
    expected = _run(model)
    model.merge_adapter(safe_merge=True)
    assert_close(_run(model), expected, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    before = _state(model)
    with torch.no_grad():
        layer_of(model, "conv").boft_R["default"][1, 0, 0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        model.merge_adapter(safe_merge=True)
    assert not layer_of(model, "lin").merged
    for k, v in _state(model).items():
        if "boft_" not in k:
            assert torch.equal(v, before[k]), k
    # a zero scale merges but cannot be unmerged: refused, weights stay merged
    other = _make(boft_block_size=4)
    with torch.no_grad():
        layer_of(other, "lin").boft_s["default"][0, 0] = 0.0
    other.merge_adapter()
    merged = _state(other)
    with pytest.raises(ValueError, match="Cannot unmerge BOFT"):
        other.unmerge_adapter()
    assert torch.equal(_state(other)["lin.base_layer.weight"], merged["lin.base_layer.weight"])


@pytest.mark.parametrize("factor", FACTORS)
def test_merge_and_unload_unload_disable_delete(factor):
    model = _make(boft_block_size=2, boft_n_butterfly_factor=factor)
    base_out, expected = _base_out(), _run(model)
    assert not torch.allclose(expected, base_out, atol=1e-4)
    with model.disable_adapter():
        assert_close(_run(model), base_out)
    assert_close(_run(model), expected)
    merged = quiet_call(copy.deepcopy(model).merge_and_unload, safe_merge=True)
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    with torch.no_grad():
        assert_close(merged(**_inputs()), expected, atol=1e-5, rtol=1e-5)
    plain = copy.deepcopy(model).unload()
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    with torch.no_grad():
        assert_close(plain(**_inputs()), base_out)
    model.add_adapter("other", peftkit.BOFTConfig(boft_block_size=4, target_modules=["lin", "conv"],
                                                  init_weights=False))
    model.delete_adapter("other")
    assert not any(".other" in k for k in model.state_dict())
    assert_close(_run(model), expected)
    model.delete_adapter("default")
    assert_close(_run(model), base_out)


def _two(factor: int):
    model = _make(boft_block_size=4, boft_n_butterfly_factor=factor)
    torch.manual_seed(7)
    model.add_adapter("b", peftkit.BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=factor,
                                              target_modules=["lin", "conv"], init_weights=False))
    return model.eval()


@pytest.mark.parametrize("factor", FACTORS)
def test_several_active_adapters(factor):
    model = _two(factor)
    model.base_model.set_adapter(["default", "b"])
    lin = layer_of(model, "lin")
    ma, mb = dense_m(lin.boft_R["default"]), dense_m(lin.boft_R["b"])
    sa, sb = (lin.boft_s[a].detach().double().reshape(-1) for a in ("default", "b"))
    w, b = lin.base_layer.weight.detach().double(), lin.base_layer.bias.detach().double()
    x = _inputs()["x"]
    assert_close(lin(x).double(), sa * sb * (x.double() @ mb @ ma @ w.T) + b, atol=1e-5, rtol=1e-5)
    stacked = _run(model)
    model.merge_adapter()
    assert_close(_run(model), stacked, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    assert_close(_run(model), stacked, atol=1e-5, rtol=1e-5)
    model.base_model.set_adapter("b")
    assert not torch.allclose(_run(model), stacked, atol=1e-4)


@pytest.mark.parametrize("factor", FACTORS)
def test_mixed_batch_equals_per_sample(factor):
    model = _two(factor)
    names = ["default", "b", "__base__", "b", "default"]
    inp = _inputs(batch=5)
    with torch.no_grad():
        mixed = model(**inp, adapter_names=names)
    for i, name in enumerate(names):
        one = {k: v[i : i + 1] for k, v in inp.items()}
        with torch.no_grad():
            if name == "__base__":
                with model.disable_adapter():
                    expected = model(**one)
            else:
                model.base_model.set_adapter(name)
                expected = model(**one)
        assert_close(mixed[i : i + 1], expected, atol=1e-5, rtol=1e-5)


def test_dropout_only_in_training():
    model = _make(boft_block_size=2, boft_n_butterfly_factor=2, boft_dropout=0.5)
    expected = _run(model)
    assert_close(_run(model), expected)
    model.train()
    torch.manual_seed(0)
    outs = [_run(model) for _ in range(4)]
    assert all(not torch.allclose(o, expected, atol=1e-6) for o in outs)
    assert any(not torch.allclose(o, outs[0], atol=1e-6) for o in outs[1:])
    model.eval()
    assert_close(_run(model), expected)


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("kw,match", [
    ({"boft_block_size": 4, "boft_block_num": 2}, "exactly one of boft_block_size"),
    ({"boft_block_size": 0, "boft_block_num": 0}, "exactly one of boft_block_size"),
    ({"boft_block_size": -2}, "non-negative"),
    ({"boft_block_size": 4, "boft_n_butterfly_factor": 0}, "positive integer"),
    ({"boft_block_size": 4, "boft_dropout": 1.5}, "probability"),
    ({"boft_block_size": 4, "bias": "lora_only"}, "boft_only"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        peftkit.BOFTConfig(target_modules=["lin"], **kw)


class Pair(nn.Module):
    """lin (in 12) is injected first; conv (in conv_in·3·3: 27 by default, odd) second."""

    def __init__(self, conv_in: int = 3):
        super().__init__()
        self.lin = nn.Linear(12, 4)
        self.conv = nn.Conv2d(conv_in, 4, 3)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("conv_in,kw,match", [
    (3, {"boft_block_size": 4}, r"boft_block_size=4 does not divide the Conv2d with 27 input features"),
    (3, {"boft_block_size": 0, "boft_block_num": 2}, r"boft_block_num=2 does not divide the Conv2d"),
    # lin: 2 blocks of 6 (fine); conv: 2 blocks of 9 (odd block size) with factor 2
    (2, {"boft_block_size": 0, "boft_block_num": 2, "boft_n_butterfly_factor": 2},
     r"needs an even block count and block size; the Conv2d with 18 input features gets 2 blocks of 9"),
])
def test_second_layer_error_leaves_model_unchanged(conv_in, kw, match):
    """The first target (lin) accepts the config, the second (conv) refuses it: nothing stays injected."""
    torch.manual_seed(0)
    model = Pair(conv_in)
    reference = copy.deepcopy(model)
    with pytest.raises(ValueError, match=match):
        peftkit.get_peft_model(model, peftkit.BOFTConfig(target_modules=["lin", "conv"], **kw))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert model.state_dict().keys() == reference.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference.state_dict()[k])
    x = torch.randn(2, 12)
    assert_close(model(x), reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("fan_in,kw,match", [
    (16, {"boft_block_size": 4, "boft_n_butterfly_factor": 4}, r"too large for the 4 blocks.*factor <= 3"),
    (16, {"boft_block_size": 2, "boft_n_butterfly_factor": 5}, r"too large for the 8 blocks.*factor <= 4"),
    (12, {"boft_block_size": 0, "boft_block_num": 6, "boft_n_butterfly_factor": 3}, r"too large for the 6 blocks.*<= 2"),
    (16, {"boft_block_size": 0, "boft_block_num": 2, "boft_n_butterfly_factor": 3}, r"too large for the 2 blocks"),
    (12, {"boft_block_size": 0, "boft_block_num": 3, "boft_n_butterfly_factor": 2}, "even block count"),
    (16, {"boft_block_size": 1, "boft_n_butterfly_factor": 2}, "even block count and block size"),
])
def test_factor_errors(fan_in, kw, match):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(fan_in, 4))
    with pytest.raises(ValueError, match=match):
        peftkit.get_peft_model(model, peftkit.BOFTConfig(target_modules=["0"], **kw))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


@pytest.mark.parametrize("fan_in,kw", [(16, {"boft_block_size": 4, "boft_n_butterfly_factor": 3}),
                                       (16, {"boft_block_size": 2, "boft_n_butterfly_factor": 4}),
                                       (12, {"boft_block_size": 0, "boft_block_num": 6, "boft_n_butterfly_factor": 2})])
def test_largest_allowed_factor_works(fan_in, kw):
    model = quiet_call(peftkit.get_peft_model, nn.Sequential(nn.Linear(fan_in, 4)),
                       peftkit.BOFTConfig(target_modules=["0"], init_weights=False, **kw))
    assert model.get_base_model()[0].boft_R["default"].shape[0] == kw["boft_n_butterfly_factor"]


def test_file_with_wrong_block_layout_is_refused(tmp_path):
    import json

    model = _make(boft_block_size=4)
    model.save_pretrained(str(tmp_path))
    cfg_path = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["boft_block_size"] = 2  # tensors hold blocks of 4
    cfg_path.write_text(json.dumps(cfg))
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="boft_R has shape"):
        quiet_call(peftkit.PeftModel.from_pretrained, FNet().eval(), str(tmp_path))


# ------------------------------------------------------------------ property
@settings(max_examples=25, deadline=None)
@given(
    log_blocks=st.integers(0, 3), half=st.integers(1, 3), factor=st.integers(1, 4), out_features=st.integers(1, 9),
    bias=st.booleans(), seed=st.integers(0, 2**16),
)
def test_forward_equals_linear_with_merged_weight(log_blocks, half, factor, out_features, bias, seed):
    blocks, bs = 2**log_blocks, 2 * half
    factor = min(factor, log_blocks + 1)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(blocks * bs, out_features, bias=bias))
    cfg = peftkit.BOFTConfig(boft_block_size=bs, boft_n_butterfly_factor=factor, target_modules=["0"],
                             init_weights=False)
    peft_model = quiet_call(peftkit.get_peft_model, model, cfg).eval()
    x = torch.randn(2, 3, blocks * bs)
    with torch.no_grad():
        y = peft_model(x)
        merged = quiet_call(copy.deepcopy(peft_model).merge_and_unload)[0]
    assert_close(y, F.linear(x, merged.weight, merged.bias), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ training
@pytest.mark.parametrize("bias", ["none", "boft_only"])
def test_training_changes_only_boft_params_and_lowers_loss(bias):
    torch.manual_seed(0)
    model = quiet_call(peftkit.get_peft_model, FNet(), peftkit.BOFTConfig(
        boft_block_size=2, boft_n_butterfly_factor=2, target_modules=["lin", "conv"], bias=bias))
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if ".boft_R." in n or ".boft_s." in n}
    if bias == "boft_only":
        expected |= {"base_model.model.lin.base_layer.bias", "base_model.model.conv.base_layer.bias"}
    assert trainable == expected
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    inp = _inputs(batch=8)
    torch.manual_seed(3)
    target = torch.randn_like(model(**inp))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = F.mse_loss(model(**inp), target)
        loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == (n in trainable), n
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in trainable), n
