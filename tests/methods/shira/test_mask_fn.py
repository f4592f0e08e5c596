"""User mask functions (``config.mask_fn``): used as given, checked with clear errors, no half-built model."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import peftkit

from .helpers import build, make, shira_config, shira_layers


def first_k(base_layer: nn.Module, r: int, **kwargs) -> torch.Tensor:
    """Ones at every 3rd entry (row-major), r·(m+n) of them."""
    w = base_layer.weight
    k = r * sum(w.shape)
    flat = (torch.arange(k) * 3) % w.numel() if 3 * k <= w.numel() + 2 else torch.arange(k)
    mask = torch.zeros(w.numel(), dtype=w.dtype, device=w.device)
    mask[flat] = 1
    return mask.view(w.shape)


def _config(fn, mask_type: str = "custom", **kw):
    cfg = shira_config(peftkit, "llama", mask_type=mask_type, **kw)
    cfg.mask_fn = fn
    return cfg


def _get(cfg, base=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peftkit.get_peft_model(base if base is not None else build("llama"), cfg)


@pytest.mark.parametrize("mask_type", ["custom", "random"])
def test_mask_fn_positions_are_the_masks_ones(mask_type):
    calls = []

    def fn(base_layer, r, **kwargs):
        calls.append((type(base_layer).__name__, r, kwargs))
        return first_k(base_layer, r)

    model = _get(_config(fn, mask_type, r=2, random_seed=4))
    layers = shira_layers(model)
    assert len(calls) == len(layers) == 8
    for name, r, kwargs in calls:
        assert name == "Linear" and r == 2
        assert kwargs.get("bias") is False  # llama's projections have no bias (PEFT passes the same flag)
        assert ("random_seed" in kwargs) == (mask_type == "random")
        if mask_type == "random":
            assert kwargs["random_seed"] == 4
    for key, layer in layers.items():
        rows, cols = torch.nonzero(first_k(layer.base_layer, 2), as_tuple=True)
        assert torch.equal(layer.shira_indices["default"], torch.stack([rows, cols]).int()), key


def test_bool_mask_is_accepted():
    model = _get(_config(lambda b, r, **kw: first_k(b, r).bool()))
    for layer in shira_layers(model).values():
        rows, cols = torch.nonzero(first_k(layer.base_layer, 2), as_tuple=True)
        assert torch.equal(layer.shira_indices["default"], torch.stack([rows, cols]).int())


def _wrong_shape(b, r, **kw):
    return first_k(b, r).t().contiguous() if b.weight.shape[0] != b.weight.shape[1] else first_k(b, r).flatten()


def _non_binary(b, r, **kw):
    m = first_k(b, r)
    m[0, 0] = 0.5
    return m


def _too_many(b, r, **kw):
    flat = first_k(b, r).flatten()
    flat[int(torch.nonzero(flat == 0)[0])] = 1  # one extra one
    return flat.view(b.weight.shape)


BAD = [
    (_wrong_shape, ValueError, r"has shape \(256,\); it must match the weight, \(16, 16\)"),
    (_non_binary, ValueError, "is not binary: use only 0 and 1"),
    (lambda b, r, **kw: first_k(b, r) * 2, ValueError, "is not binary"),
    (_too_many, ValueError, r"has 65 ones; it must have r·\(m\+n\) = 64 \(r=2\)"),
    (lambda b, r, **kw: first_k(b, r - 1), ValueError, r"has 32 ones; it must have r·\(m\+n\) = 64"),
    (lambda b, r, **kw: first_k(b, r).numpy(), TypeError, "returned a ndarray .* return a torch.Tensor"),
    (lambda b, r, **kw: first_k(b, r).tolist(), TypeError, "returned a list"),
    (lambda b, r, **kw: None, TypeError, "returned a NoneType"),
]
BAD_IDS = ["wrong_shape", "half", "twos", "too_many", "too_few", "numpy", "list", "none"]


@pytest.mark.parametrize("fn,exc,match", BAD, ids=BAD_IDS)
def test_bad_masks_raise_clear_errors(fn, exc, match):
    with pytest.raises(exc, match=match) as info:
        _get(_config(fn))
    assert "model.layers.0.self_attn.q_proj" in str(info.value)  # the message names the layer


def test_mask_type_without_mask_fn_raises():
    with pytest.raises(ValueError, match="mask_type='magnitude'.*needs a mask function.*config.mask_fn"):
        _get(shira_config(peftkit, "llama", mask_type="magnitude"))


def _bad_at_second_layer():
    state = {"n": 0}

    def fn(b, r, **kw):
        state["n"] += 1
        return first_k(b, r) if state["n"] < 2 else first_k(b, r) * 2

    return fn


def test_error_leaves_base_model_unchanged():
    base = build("llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    modules = [n for n, _ in base.named_modules()]
    with pytest.raises(ValueError, match="not binary"):
        _get(_config(_bad_at_second_layer()), base)
    assert [n for n, _ in base.named_modules()] == modules, "adapter layers were left in the model"
    assert not hasattr(base, "peft_config")
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_error_in_add_adapter_leaves_model_unchanged():
    model = make("peftkit", "llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="not binary"):
            model.add_adapter("bad", _config(_bad_at_second_layer()))
    assert list(model.peft_config) == ["default"]
    for key, layer in shira_layers(model).items():
        assert layer.adapters == ["default"], key
        assert list(layer.shira_indices.keys()) == ["default"], key
    model.add_adapter("bad", _config(first_k))  # the name is free again
    assert all("bad" in layer.adapters for layer in shira_layers(model).values())


def test_mask_fn_is_not_called_by_forward_merge_or_save(tmp_path):
    calls = []

    def fn(b, r, **kw):
        calls.append(1)
        return first_k(b, r)

    model = _get(_config(fn))
    n = len(calls)
    ids = torch.randint(3, 60, (1, 5))
    model(input_ids=ids)
    model.merge_adapter()
    model.unmerge_adapter()
    model.save_pretrained(str(tmp_path))
    assert len(calls) == n == 8


@pytest.mark.parametrize("kind", ["embedding", "conv2d", "conv1d_torch"])
def test_unsupported_layers_raise_type_error(kind):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.conv = nn.Conv2d(3, 8, 3)
            self.conv1 = nn.Conv1d(3, 8, 3)
            self.lin = nn.Linear(8, 8)

    target = {"embedding": "emb", "conv2d": "conv", "conv1d_torch": "conv1"}[kind]
    net = Net()
    modules = [n for n, _ in net.named_modules()]
    with pytest.raises(TypeError, match=r"nn\.Linear and transformers Conv1D") as info:
        peftkit.get_peft_model(net, peftkit.ShiraConfig(r=1, target_modules=[target, "lin"]))
    assert target in str(info.value)
    assert [n for n, _ in net.named_modules()] == modules
    with pytest.raises(TypeError, match="ShiraLayer cannot wrap"):
        peftkit.ShiraLayer(getattr(net, target))


def test_unsupported_embedding_in_llama_raises():
    match = r"model\.embed_tokens is a Embedding; SHIRA adapts nn\.Linear and transformers Conv1D"
    with pytest.raises(TypeError, match=match):
        _get(peftkit.ShiraConfig(r=1, target_modules=["embed_tokens", "q_proj"]))
