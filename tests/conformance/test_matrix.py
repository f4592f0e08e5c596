"""One matrix of invariants over every (method, base-layer kind) pair."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

import peftkit
from peftkit import AdapterLayer
from peftkit.registry import get_method

from .models import BASES, METHODS, fresh

CASES = [pytest.param(m, b, id=f"{m.name}-{b.name}") for m in METHODS for b in BASES if m.supports(b)]
UNSUPPORTED = [pytest.param(m, b, id=f"{m.name}-{b.name}") for m in METHODS for b in BASES if not m.supports(b)]


def _peft(method, base, init=False, seed=0):
    model = fresh(base, seed)
    reference = copy.deepcopy(model)
    torch.manual_seed(seed + 1)
    return peftkit.get_peft_model(model, method.config(base.target, init)), reference


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k.replace("base_layer.", ""): v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method,base", CASES)
def test_identity_at_init(method, base):
    model, reference = _peft(method, base, init=True)
    x = base.make_input(3)
    assert_close(model(x), reference(x))


@pytest.mark.parametrize("method,base", CASES)
def test_adapter_changes_output(method, base):
    model, reference = _peft(method, base)
    x = base.make_input(3)
    assert not torch.allclose(model(x), reference(x))


@pytest.mark.parametrize("method,base", CASES)
def test_merged_equals_unmerged_and_unmerge_restores(method, base):
    model, reference = _peft(method, base)
    x = base.make_input(3)
    before = model(x)
    weights = _weights(model.get_base_model())
    model.merge_adapter()
    assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    changed = _weights(model.get_base_model())
    assert any(not torch.equal(changed[k], weights[k]) for k in weights)
    model.unmerge_adapter()
    for k, v in _weights(model.get_base_model()).items():
        assert_close(v, weights[k], atol=1e-6, rtol=1e-6)
    assert_close(model(x), before, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method,base", CASES)
def test_disable_equals_base(method, base):
    model, reference = _peft(method, base)
    x = base.make_input(3)
    with model.disable_adapter():
        assert_close(model(x), reference(x))
    assert not torch.allclose(model(x), reference(x))


@pytest.mark.parametrize("method,base", CASES)
def test_merge_and_unload_and_unload(method, base):
    model, reference = _peft(method, base)
    x = base.make_input(3)
    expected = model(x)
    merged = copy.deepcopy(model).merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)
    plain = model.unload()
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    assert plain.state_dict().keys() == reference.state_dict().keys()
    assert_close(plain(x), reference(x))


@pytest.mark.parametrize("method,base", CASES)
def test_delete_removes_every_trace(method, base):
    model, reference = _peft(method, base)
    model.add_adapter("other", method.config(base.target, False))
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert not any(".other" in k for k in model.state_dict())
    model.delete_adapter("default")
    assert model.peft_config == {}
    x = base.make_input(3)
    assert_close(model(x), reference(x))
    assert model.get_base_model().state_dict().keys() == reference.state_dict().keys()


@pytest.mark.parametrize("method,base", CASES)
def test_save_load_roundtrip(method, base, tmp_path):
    model, _ = _peft(method, base)
    x = base.make_input(3)
    expected = model(x)
    model.save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(fresh(base), tmp_path)
    assert_close(loaded(x), expected)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = peftkit.PeftModel.from_pretrained(fresh(base), tmp_path, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


@pytest.mark.parametrize("method,base", CASES)
def test_two_adapters_switch_and_stack(method, base):
    model, _ = _peft(method, base)
    x = base.make_input(3)
    out_a = model(x)
    model.add_adapter("b", method.config(base.target, False))
    assert_close(model(x), out_a)  # a new adapter is not active until set
    model.set_adapter("b")
    out_b = model(x)
    assert not torch.allclose(out_a, out_b)
    model.set_adapter(["default", "b"])
    with model.disable_adapter():
        base_out = model(x)
    assert not torch.allclose(model(x), base_out)
    if not method.stackable:
        return
    model.merge_adapter()
    merged = model(x)
    model.unmerge_adapter()
    assert_close(model(x), merged, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(x), base_out)


@pytest.mark.parametrize("method,base", CASES)
def test_mixed_batch_equals_per_sample(method, base):
    model, _ = _peft(method, base)
    model.add_adapter("b", method.config(base.target, False))
    x = base.make_input(4)
    names = ["default", "b", "__base__", "b"]
    mixed = model(x, adapter_names=names)
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                expected = model(x[i : i + 1])
        else:
            model.set_adapter(name)
            expected = model(x[i : i + 1])
        assert_close(mixed[i : i + 1], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,base", CASES)
def test_only_adapter_parameters_train(method, base):
    model, _ = _peft(method, base)
    x = base.make_input(3)
    model.train()
    model(x).sum().backward()
    prefix = get_method(model.peft_config["default"].peft_type).prefix
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert prefix in name
            assert p.grad is not None
        else:
            assert p.grad is None


@pytest.mark.parametrize("method,base", UNSUPPORTED)
def test_unsupported_kind_raises_and_changes_nothing(method, base):
    model = fresh(base)
    reference = copy.deepcopy(model)
    with pytest.raises(TypeError, match=f"Target module {base.target} is a"):
        peftkit.get_peft_model(model, method.config(base.target, False))
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    x = base.make_input(2)
    assert_close(model(x), reference(x))
