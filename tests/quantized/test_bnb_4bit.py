"""Adapters on bitsandbytes 4-bit (nf4 / fp4) base layers, on CPU, with HF PEFT as the oracle."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

import peftkit  # noqa: E402
from peftkit.core.quantized import backend_for  # noqa: E402

from ._models import KINDS_4BIT, copy_adapter, ids, logits, quantize_linear, quantized_llama  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _lora(lib, **kw):
    kw = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False, **kw}
    return lib.LoraConfig(**kw)


def _layer(model, name: str = "model.layers.0.self_attn.q_proj"):
    return model.base_model.model.get_submodule(name)


def _raw(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored 4-bit data and its scales (to check a layer is untouched)."""
    w = layer.weight
    return w.data.clone(), w.quant_state.absmax.clone()


@pytest.mark.parametrize("kind", KINDS_4BIT)
def test_lora_is_quantized_base_plus_lora(kind):
    torch.manual_seed(0)
    layer = quantize_linear(nn.Linear(64, 48), kind)
    model = nn.Sequential(layer)
    pm = peftkit.get_peft_model(model, _lora(peftkit, target_modules=["0"]))
    lora = pm.base_model.model[0]
    assert lora.base_layer is layer and lora.ops.quant is backend_for(layer)
    a, b = lora.lora_A["default"].weight, lora.lora_B["default"].weight
    assert a.dtype == b.dtype == torch.float32  # adapters stay fp32 over a uint8-packed weight
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        expected = layer(x) + 2.0 * (x @ a.t() @ b.t())
        assert torch.allclose(pm(x), expected, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS_4BIT)
def test_lora_matches_peft(kind):
    mine = peftkit.get_peft_model(quantized_llama(kind), _lora(peftkit))
    theirs = peft.get_peft_model(quantized_llama(kind), _lora(peft))
    assert type(_layer(theirs)).__name__ == "Linear4bit"  # PEFT's own bnb layer is the oracle
    copy_adapter(mine, theirs)
    x = ids()
    assert torch.allclose(logits(mine, x), logits(theirs, x), atol=1e-5)


@pytest.mark.parametrize("kind", KINDS_4BIT)
def test_ia3_matches_peft(kind):
    kw = {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"],
          "init_ia3_weights": False}
    mine = peftkit.get_peft_model(quantized_llama(kind), peftkit.IA3Config(**kw))
    theirs = peft.get_peft_model(quantized_llama(kind), peft.IA3Config(**kw))
    copy_adapter(mine, theirs)
    x = ids()
    assert torch.allclose(logits(mine, x), logits(theirs, x), atol=1e-5)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_lycoris_is_quantized_base_plus_delta(method):
    torch.manual_seed(0)
    layer = quantize_linear(nn.Linear(64, 48), "nf4")
    cls = peftkit.LoHaConfig if method == "loha" else peftkit.LoKrConfig
    pm = peftkit.get_peft_model(nn.Sequential(layer), cls(r=4, target_modules=["0"], init_weights=False))
    wrapped = pm.base_model.model[0]
    x = torch.randn(4, 64)
    with torch.no_grad():
        expected = layer(x) + F.linear(x, wrapped.delta_weight("default"))
        assert torch.allclose(pm(x), expected, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS_4BIT)
def test_training_reduces_loss_and_leaves_base_alone(kind):
    torch.manual_seed(0)
    pm = peftkit.get_peft_model(quantized_llama(kind), _lora(peftkit, init_lora_weights=True))
    pm.train()
    base = _layer(pm).base_layer
    before = _raw(base)
    trainable = [p for p in pm.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in pm.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    x = ids(batch=4, length=12)
    losses = []
    for _ in range(8):
        loss = pm(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert all(torch.equal(u, v) for u, v in zip(before, _raw(base)))


@pytest.mark.parametrize("kind", KINDS_4BIT)
def test_merge_unmerge_within_quantization_tolerance(kind):
    torch.manual_seed(0)
    pm = peftkit.get_peft_model(quantized_llama(kind), _lora(peftkit))
    for p in pm.parameters():  # a small adapter, as after training
        if p.requires_grad:
            p.data.mul_(0.3)
    x = ids()
    with pm.disable_adapter():
        base = logits(pm, x)
    adapted = logits(pm, x)
    change = (adapted - base).abs().max()
    with pytest.warns(UserWarning, match="requantizes"):
        pm.merge_adapter()
    merged = logits(pm, x)
    assert (merged - adapted).abs().max() < 0.5 * change  # rounding only, far below the adapter's effect
    assert _layer(pm).merged
    with pytest.warns(UserWarning, match="requantizes"):
        pm.unmerge_adapter()
    with pm.disable_adapter():
        restored = logits(pm, x)
    assert (restored - base).abs().max() < change  # merged and unmerged: two roundings


METHOD_CONFIGS = {
    "lora": lambda: _lora(peftkit),
    "loha": lambda: peftkit.LoHaConfig(r=4, target_modules=TARGETS, init_weights=False),
    "lokr": lambda: peftkit.LoKrConfig(r=4, target_modules=TARGETS, init_weights=False),
    "ia3": lambda: peftkit.IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"], init_ia3_weights=False),
}


@pytest.mark.parametrize("kind", KINDS_4BIT)
@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
def test_merge_and_unload_dequantize_is_exact_full_precision(method, kind):
    torch.manual_seed(0)
    pm = peftkit.get_peft_model(quantized_llama(kind), METHOD_CONFIGS[method]())
    pm.train()  # no CPU repacking: the unmerged reference runs the plain dequantizing kernel
    x = ids()
    adapted = logits(pm, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no requantization, so no rounding warning
        model = pm.merge_and_unload(dequantize=True)
    assert not any(backend_for(m) for m in model.modules())
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert torch.allclose(logits(model, x), adapted, atol=1e-4)


@pytest.mark.parametrize("method", ["loha", "lokr", "ia3"])
def test_other_methods_merge_unmerge_nf4(method):
    torch.manual_seed(0)
    pm = peftkit.get_peft_model(quantized_llama("nf4"), METHOD_CONFIGS[method]())
    factor = {"loha": 1.5, "lokr": 2.0, "ia3": 1.0}[method]  # an adapter effect well above 4-bit rounding
    for p in pm.parameters():
        if p.requires_grad:
            p.data.mul_(factor)
    x = ids()
    with pm.disable_adapter():
        base = logits(pm, x)
    adapted = logits(pm, x)
    change = (adapted - base).abs().max()
    with pytest.warns(UserWarning, match="requantizes"):
        pm.merge_adapter()
    assert (logits(pm, x) - adapted).abs().max() < 0.5 * change
    with pytest.warns(UserWarning, match="requantizes"):
        pm.unmerge_adapter()
    with pm.disable_adapter():
        assert (logits(pm, x) - base).abs().max() < change


def test_merge_and_unload_requantizes_by_default():
    pm = peftkit.get_peft_model(quantized_llama("nf4"), _lora(peftkit))
    with pytest.warns(UserWarning, match="requantizes"):
        model = pm.merge_and_unload()
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_type == "nf4"


@pytest.mark.parametrize("direction", ["peft_to_peftkit", "peftkit_to_peft"])
def test_save_load_both_ways(direction, tmp_path):
    src, dst = (peft, peftkit) if direction == "peft_to_peftkit" else (peftkit, peft)
    torch.manual_seed(0)
    model = src.get_peft_model(quantized_llama("nf4"), _lora(src))
    x = ids()
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    loaded = dst.PeftModel.from_pretrained(quantized_llama("nf4"), tmp_path)
    assert torch.allclose(logits(loaded, x), expected, atol=1e-5)


def test_safe_merge_failure_leaves_layer_unchanged():
    pm = peftkit.get_peft_model(quantized_llama("nf4"), _lora(peftkit))
    layer = _layer(pm)
    layer.lora_B["default"].weight.data[0, 0] = float("nan")
    before = _raw(layer.base_layer)
    with pytest.raises(ValueError, match="NaN"):
        pm.merge_adapter(safe_merge=True)
    assert all(torch.equal(u, v) for u, v in zip(before, _raw(layer.base_layer)))
    assert not layer.merged


@pytest.mark.parametrize(
    "config, error, match",
    [
        (lambda: peftkit.OFTConfig(r=0, oft_block_size=4, target_modules=TARGETS), TypeError, "cannot adapt quantized"),
        (lambda: peftkit.BOFTConfig(boft_block_size=4, target_modules=TARGETS), TypeError, "cannot adapt quantized"),
        (lambda: peftkit.ShiraConfig(r=4, target_modules=TARGETS), TypeError, "cannot adapt quantized"),
        (lambda: _lora(peftkit, init_lora_weights="pissa"), ValueError, "pissa"),
    ],
    ids=["oft", "boft", "shira", "pissa"],
)
def test_unsupported_combinations_fail_cleanly(config, error, match):
    model = quantized_llama("nf4")
    names_before = [(n, type(m)) for n, m in model.named_modules()]
    state_before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(error, match=match):
        peftkit.get_peft_model(model, config())
    assert [(n, type(m)) for n, m in model.named_modules()] == names_before
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in state_before.items())


def _first_layer_grad(pm, x) -> torch.Tensor:
    pm.train()
    pm(input_ids=x, labels=x).loss.backward()
    return _layer(pm).lora_A["default"].weight.grad.clone()


def test_training_after_an_eval_forward_keeps_gradients():
    # bitsandbytes repacks 4-bit weights for CPU inference on an eval forward (on CPUs with AVX512-BF16);
    # that path has no backward, so peftkit unpacks them when the model trains again
    x = ids()
    torch.manual_seed(0)
    fresh = peftkit.get_peft_model(quantized_llama("nf4"), _lora(peftkit))
    expected = _first_layer_grad(fresh, x)
    torch.manual_seed(0)
    used = peftkit.get_peft_model(quantized_llama("nf4"), _lora(peftkit))
    used.eval()
    logits(used, x)
    # (bitsandbytes' unpacking re-rounds the block scales, hence the relative tolerance)
    got = _first_layer_grad(used, x)
    assert (got - expected).norm() < 0.02 * expected.norm()


def test_prepare_model_for_kbit_training():
    model = quantized_llama("nf4")
    model.model.norm.to(torch.bfloat16)
    packed = model.get_submodule("model.layers.0.self_attn.q_proj").weight
    prepared = peftkit.prepare_model_for_kbit_training(model)
    assert prepared is model and model.is_gradient_checkpointing
    assert not any(p.requires_grad for p in model.parameters())
    assert model.model.norm.weight.dtype == torch.float32 and packed.dtype == torch.uint8
    pm = peftkit.get_peft_model(model, _lora(peftkit, init_lora_weights=True))
    pm.train()
    x = ids()
    pm(input_ids=x, labels=x).loss.backward()
    grad = _layer(pm).lora_B["default"].weight.grad  # layer 0: the gradient crossed every checkpointed block
    assert grad is not None and grad.abs().sum() > 0


def test_transformers_4bit_model_trains_and_dequantizes_to_a_plain_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ._models import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "base")
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=q, device_map="cpu")
    pm = peftkit.get_peft_model(base, _lora(peftkit, target_modules="all-linear"))
    assert isinstance(_layer(pm), peftkit.LoraLayer) and isinstance(_layer(pm).base_layer, bnb.nn.Linear4bit)
    pm.train()
    x = ids()
    pm(input_ids=x, labels=x).loss.backward()
    adapted = logits(pm, x)
    full = pm.merge_and_unload(dequantize=True)
    assert not full.is_loaded_in_4bit and getattr(full.config, "quantization_config", None) is None
    full.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.allclose(logits(reloaded, x), adapted, atol=1e-4)


def test_mixed_adapter_batch_on_4bit():
    torch.manual_seed(0)
    pm = peftkit.get_peft_model(quantized_llama("nf4"), _lora(peftkit), adapter_name="a")
    pm.add_adapter("b", _lora(peftkit))
    pm.eval()
    x = ids(batch=3)
    names = ["a", "b", "__base__"]
    with torch.no_grad():
        mixed = pm(input_ids=x, adapter_names=names).logits
    for i, name in enumerate(names):
        if name == "__base__":
            with pm.disable_adapter():
                ref = logits(pm, x[i : i + 1])
        else:
            pm.set_adapter(name)
            ref = logits(pm, x[i : i + 1])
        assert torch.allclose(mixed[i : i + 1], ref, atol=1e-4)


def test_eval_train_switches_do_not_drift_the_4bit_weights():
    pm = peftkit.get_peft_model(quantized_llama("nf4"), _lora(peftkit))
    base = _layer(pm).base_layer
    x = ids()
    pm.eval()
    first = logits(pm, x)  # bitsandbytes may repack (and round the block scales) here, once
    w = backend_for(base).dequantize(base)
    for _ in range(3):
        pm.train()
        pm(input_ids=x, labels=x).loss.backward()
        pm.eval()
        assert torch.equal(logits(pm, x), first)
    assert torch.equal(backend_for(base).dequantize(base), w)


@pytest.mark.parametrize("kind", KINDS_4BIT)
def test_dora_on_4bit_is_the_dora_formula_over_the_dequantized_weight(kind):
    """DoRA over the weight the 4-bit layer computes with: out = m/‖W + sBA‖ ⊙ x(W + sBA)ᵀ, also in eval mode
    (where PEFT's DoRA dequantizes the CPU-repacked weights with dequantize_4bit, which gives another weight)."""
    pm = peftkit.get_peft_model(quantized_llama(kind), _lora(peftkit, use_dora=True))
    layer = _layer(pm)
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        w = layer.ops.quant.dequantize(layer.base_layer)
        # the weight the layer computes with (its CPU kernel rounds its output through bfloat16)
        assert torch.allclose(layer.base_layer(x), x @ w.t(), atol=1e-2)
        a, b = layer._factors("default")
        merged = w + layer.scaling["default"] * b @ a
        m = layer.lora_magnitude_vector["default"].weight
        torch.testing.assert_close(m, merged.norm(dim=1))  # magnitude starts at the norm
        m.mul_(torch.linspace(0.5, 1.5, m.numel()))  # as after training
        expected = (x @ merged.t()) * (m / merged.norm(dim=1))
        torch.testing.assert_close(layer(x), expected, atol=1e-2, rtol=0)
        assert (layer(x) - expected).abs().max() < 0.05 * (expected - x @ w.t()).abs().max()  # far below DoRA's effect


def test_dora_on_4bit_trains_merges_and_dequantizes():
    torch.manual_seed(0)
    pm = peftkit.get_peft_model(quantized_llama("nf4"), _lora(peftkit, use_dora=True))
    x = ids()
    before = _raw(_layer(pm).base_layer)
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    losses = []
    for _ in range(8):
        loss = pm(input_ids=x, labels=x).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]
    assert _layer(pm).lora_magnitude_vector["default"].weight.grad is not None
    assert all(torch.equal(u, v) for u, v in zip(before, _raw(_layer(pm).base_layer)))
    pm.eval()
    adapted = logits(pm, x)
    with pm.disable_adapter():
        base = logits(pm, x)
    change = (adapted - base).abs().max()
    with pytest.warns(UserWarning, match="requantizes"):
        pm.merge_adapter()
    assert (logits(pm, x) - adapted).abs().max() < 0.5 * change
    with pytest.warns(UserWarning, match="requantizes"):
        pm.unmerge_adapter()
    pm.train()  # the plain dequantizing kernel (no CPU repacking), as the full-precision model computes
    adapted = logits(pm, x)
    full = pm.merge_and_unload(dequantize=True)
    assert not any(backend_for(m) is not None for m in full.modules())
    torch.testing.assert_close(logits(full, x), adapted, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", KINDS_4BIT)
def test_dora_on_4bit_matches_peft_in_training(kind):
    """Before any eval forward repacks the weights, PEFT's DoRA on 4-bit layers is the oracle: same outputs."""
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False, "use_dora": True}
    mine = peftkit.get_peft_model(quantized_llama(kind), peftkit.LoraConfig(**cfg))
    theirs = peft.get_peft_model(quantized_llama(kind), peft.LoraConfig(**cfg))
    result = peftkit.set_peft_model_state_dict(mine, peft.get_peft_model_state_dict(theirs))
    assert not result.missing_keys and not result.unexpected_keys
    mine.train()
    theirs.train()
    x = ids()
    torch.testing.assert_close(logits(mine, x), logits(theirs, x), atol=1e-5, rtol=1e-5)


def test_dora_norm_on_4bit_is_cached_in_inference(monkeypatch):
    pm = peftkit.get_peft_model(quantized_llama("nf4"), _lora(peftkit, use_dora=True, target_modules=["q_proj"]))
    pm.eval()
    x = ids()
    first = logits(pm, x)
    layer = _layer(pm)
    calls = []
    original = type(layer.ops.quant).dequantize
    monkeypatch.setattr(type(layer.ops.quant), "dequantize", lambda self, m: calls.append(1) or original(self, m))
    torch.testing.assert_close(logits(pm, x), first)
    assert not calls  # the weight norm came from the cache: nothing dequantized
    with torch.no_grad():
        layer.lora_B["default"].weight.mul_(2)  # a changed adapter: the norm is computed again
    logits(pm, x)
    assert calls


def test_xlora_over_a_4bit_model(tmp_path):
    """X-LoRA's experts mix on 4-bit layers: its output is base_q + the weighted experts, and the
    cached generation equals the uncached one."""
    adapters = {}
    for i, targets in enumerate((["q_proj", "v_proj"], ["v_proj", "down_proj"])):
        torch.manual_seed(i)
        expert = peftkit.get_peft_model(quantized_llama("nf4"), _lora(peftkit, target_modules=targets))
        expert.save_pretrained(str(tmp_path / str(i)))
        adapters[f"e{i}"] = str(tmp_path / str(i))
    model = peftkit.get_peft_model(quantized_llama("nf4"), peftkit.XLoraConfig(task_type="CAUSAL_LM", adapters=adapters))
    model.eval()
    x = ids()
    with torch.no_grad():
        mixed = model(input_ids=x).logits
        with model.disable_adapter():
            plain = model(input_ids=x).logits
    assert (mixed - plain).abs().max() > 1e-3
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(input_ids=x, **gen), model.generate(input_ids=x, use_cache=False, **gen))
    layer = _layer(model)
    assert backend_for(layer.base_layer) is not None and type(layer).__name__ == "XLoraLayer"
