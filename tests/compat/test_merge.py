"""merge_and_unload gives the same merged weights in both libraries."""

from __future__ import annotations

import warnings

import pytest
import torch

from _helpers import HF_MODELS, add_adapter, build, load, make_peft_model, run, save

ALL_MODELS = HF_MODELS + ["custom"]


def _both_loaded(name, tmp_path, **overrides):
    """The same adapter (saved by PEFT) loaded in both libraries."""
    src = make_peft_model("peft", name, **overrides)
    save(src, str(tmp_path / "ad"))
    return load("peft", name, str(tmp_path / "ad")), load("peftkit", name, str(tmp_path / "ad"))


def _merge(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.merge_and_unload()


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb), (sorted(set(sa) - set(sb)), sorted(set(sb) - set(sa)))
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize(
    "name,overrides",
    [pytest.param(n, {}, id=n) for n in ALL_MODELS]
    + [
        pytest.param("gpt2", {"lora_bias": True}, id="gpt2-lora_bias"),
        pytest.param("bert", {"lora_bias": True, "use_rslora": True}, id="bert-lora_bias-rslora"),
        pytest.param("llama", {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"o_proj": 3}}, id="llama-patterns"),
        pytest.param("custom", {"lora_bias": True, "target_modules": ["conv", "conv1d", "lin"]}, id="custom-lora_bias"),
        pytest.param("custom", {"modules_to_save": ["head"]}, id="custom-modules_to_save"),
    ],
)
def test_merge_and_unload_same_weights(name, overrides, tmp_path):
    a, b = _both_loaded(name, tmp_path, **overrides)
    expected = run(a, name)
    ma, mb = _merge(a), _merge(b)
    assert type(ma) is type(mb) is type(build(name))
    _assert_same_weights(ma, mb)
    torch.testing.assert_close(run(mb, name), expected, rtol=1e-4, atol=1e-5)
    # nothing of the adapter is left behind
    assert not any("lora_" in k or "base_layer" in k or "modules_to_save" in k for k in mb.state_dict())
    assert not hasattr(mb, "peft_config")


@pytest.mark.parametrize("name", ["llama", "gpt2", "custom"])
def test_merge_adapter_and_unmerge_same(name, tmp_path):
    """merge_adapter keeps the layers; the base weights then match PEFT's, and unmerge restores them."""
    a, b = _both_loaded(name, tmp_path)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    expected = run(a, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a.merge_adapter()
        b.merge_adapter()
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], msg=lambda m, k=k: f"{k}: {m}")
    torch.testing.assert_close(run(b, name), expected, rtol=1e-4, atol=1e-5)
    b.unmerge_adapter()
    for k, v in b.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_merge_one_of_several_adapters(name, tmp_path):
    """merge_and_unload(adapter_names=[...]) merges just those adapters, as PEFT does."""
    models = {}
    for lib in ("peft", "peftkit"):
        m = make_peft_model("peft", name)
        add_adapter(m, "peft", name, "other", adapter_seed=5, r=2)
        save(m, str(tmp_path / "ad"))
        loaded = load(lib, name, str(tmp_path / "ad"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded.load_adapter(str(tmp_path / "ad" / "other"), adapter_name="other")
        models[lib] = loaded
    merged = {}
    for lib, m in models.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged[lib] = m.merge_and_unload(adapter_names=["other"])
    _assert_same_weights(merged["peft"], merged["peftkit"])


def test_unload_gives_back_base_weights(tmp_path):
    a, b = _both_loaded("t5", tmp_path)
    ua, ub = a.unload(), b.unload()
    _assert_same_weights(ua, ub)
    _assert_same_weights(build("t5"), ub)
