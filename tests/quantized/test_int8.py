"""Adapters on int8 base layers: bitsandbytes ``Linear8bitLt`` and torchao int8 (lighter than 4-bit)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

import peftkit  # noqa: E402
from peftkit.core.quantized import backend_for  # noqa: E402

from ._models import copy_adapter, ids, logits, quantize_linear, quantized_llama  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
LIBRARY = {"int8": "bitsandbytes", "torchao": "torchao"}
KINDS = list(LIBRARY)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="MatMul8bitLt")  # bnb's fp16 cast notice on CPU
        warnings.filterwarnings("ignore", message=".*get_apply_tensor_subclass")  # PEFT's torchao notice
        yield


def _need(kind: str) -> None:
    pytest.importorskip(LIBRARY[kind])


def _lora(lib, **kw):
    kw = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False, **kw}
    return lib.LoraConfig(**kw)


def _q(model):
    return model.base_model.model.get_submodule("model.layers.0.self_attn.q_proj")


@pytest.mark.parametrize("kind", KINDS)
def test_lora_is_quantized_base_plus_lora(kind):
    _need(kind)
    torch.manual_seed(0)
    layer = quantize_linear(nn.Linear(64, 48), kind)
    pm = peftkit.get_peft_model(nn.Sequential(layer), _lora(peftkit, target_modules=["0"]))
    wrapped = pm.base_model.model[0]
    assert wrapped.ops.quant is backend_for(layer) is not None
    a, b = wrapped.lora_A["default"].weight, wrapped.lora_B["default"].weight
    assert a.dtype == torch.float32
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.allclose(pm(x), layer(x) + 2.0 * (x @ a.t() @ b.t()), atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_lora_matches_peft(kind):
    _need(kind)
    mine = peftkit.get_peft_model(quantized_llama(kind), _lora(peftkit))
    theirs = peft.get_peft_model(quantized_llama(kind), _lora(peft))
    assert type(_q(theirs)).__name__ in ("Linear8bitLt", "TorchaoLoraLinear")  # PEFT's quantized layer
    copy_adapter(mine, theirs)
    x = ids()
    assert torch.allclose(logits(mine, x), logits(theirs, x), atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_training_reduces_loss(kind):
    _need(kind)
    torch.manual_seed(0)
    pm = peftkit.get_peft_model(quantized_llama(kind), _lora(peftkit, init_lora_weights=True))
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    x = ids(batch=4, length=12)
    losses = []
    for _ in range(8):
        loss = pm(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05


@pytest.mark.parametrize("kind", KINDS)
def test_merge_unmerge_and_dequantize(kind):
    _need(kind)
    torch.manual_seed(0)
    pm = peftkit.get_peft_model(quantized_llama(kind), _lora(peftkit))
    x = ids()
    with pm.disable_adapter():
        base = logits(pm, x)
    adapted = logits(pm, x)
    change = (adapted - base).abs().max()
    with pytest.warns(UserWarning, match="requantizes"):
        pm.merge_adapter()
    assert backend_for(_q(pm).base_layer) is not None  # still quantized
    assert (logits(pm, x) - adapted).abs().max() < 0.1 * change  # int8 rounding is small
    with pytest.warns(UserWarning, match="requantizes"):
        pm.unmerge_adapter()
    with pm.disable_adapter():
        assert (logits(pm, x) - base).abs().max() < 0.1 * change
    model = pm.merge_and_unload(dequantize=True)
    assert not any(backend_for(m) for m in model.modules())
    assert (logits(model, x) - adapted).abs().max() < 0.1 * change


@pytest.mark.parametrize("kind", KINDS)
def test_save_peftkit_load_peft(kind, tmp_path):
    _need(kind)
    torch.manual_seed(0)
    mine = peftkit.get_peft_model(quantized_llama(kind), _lora(peftkit))
    x = ids()
    expected = logits(mine, x)
    mine.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(quantized_llama(kind), tmp_path)
    assert torch.allclose(logits(theirs, x), expected, atol=1e-5)


def test_torchao_unsupported_layout_is_refused():
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, PerTensor, quantize_

    layer = nn.Linear(128, 64)
    quantize_(layer, Int8WeightOnlyConfig(granularity=PerTensor()))  # one scale: merge could not keep it
    model = nn.Sequential(layer)
    with pytest.raises(TypeError, match="per-row scales"):
        peftkit.get_peft_model(model, _lora(peftkit, target_modules=["0"]))
    assert model[0] is layer
