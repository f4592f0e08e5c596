"""Per-sample adapters in one batch: equal to running each sample alone, and to the oracle."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch.testing import assert_close

import peftkit

from .helpers import IDS, MODELS


def _two_adapters(lib, build, targets, **extra):
    torch.manual_seed(5)
    m = lib.get_peft_model(build(), lib.LoraConfig(r=4, target_modules=targets, init_lora_weights=False, **extra))
    m.add_adapter("b", lib.LoraConfig(r=2, lora_alpha=5, target_modules=targets, init_lora_weights=False, **extra))
    return m.eval()


@pytest.mark.parametrize("extra", [{}, {"use_dora": True}, {"lora_bias": True}])
@pytest.mark.parametrize("name", list(MODELS))
def test_mixed_batch_equals_oracle_and_single_runs(name, extra, tmp_path):
    if name == "mixed" and extra.get("lora_bias"):
        pytest.skip("lora_bias does not apply to embeddings")
    build, targets, run = MODELS[name]
    pm = _two_adapters(peft, build, targets, **extra)
    pm.save_pretrained(tmp_path)
    km = peftkit.PeftModel.from_pretrained(build(), tmp_path)
    km.load_adapter(tmp_path / "b", adapter_name="b")
    names = ["b", "__base__"]
    oracle = not extra.get("use_dora")  # PEFT refuses adapter_names with DoRA; peftkit supports it
    if name == "mixed":
        ids, img = IDS[:, :5] % 20, torch.randn(2, 3, 5, 5)
        got = km(ids, img, adapter_names=names)
        km.set_adapter("b")
        assert_close(got[:1], km(ids[:1], img[:1]), atol=1e-5, rtol=1e-5)
        want = pm(ids, img, adapter_names=names) if oracle else None
    else:
        got = km(input_ids=IDS, adapter_names=names).logits
        km.set_adapter("b")
        assert_close(got[:1], km(input_ids=IDS[:1]).logits, atol=1e-5, rtol=1e-5)
        want = pm(input_ids=IDS, adapter_names=names).logits if oracle else None
    with km.disable_adapter():
        base_out = km(ids[1:], img[1:]) if name == "mixed" else km(input_ids=IDS[1:]).logits
    assert_close(got[1:], base_out, atol=1e-5, rtol=1e-5)
    if oracle:
        assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_many_adapters_one_batch():
    build, targets, _ = MODELS["llama"]
    torch.manual_seed(0)
    km = peftkit.get_peft_model(build(), peftkit.LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    for i in range(5):
        km.add_adapter(f"a{i}", peftkit.LoraConfig(r=i + 1, target_modules=targets, init_lora_weights=False))
    km.eval()
    names = ["a3", "default", "a0", "__base__", "a4", "a3"]
    ids = torch.randint(0, 50, (6, 7))
    mixed = km(input_ids=ids, adapter_names=names).logits
    for i, n in enumerate(names):
        if n == "__base__":
            with km.disable_adapter():
                ref = km(input_ids=ids[i : i + 1]).logits
        else:
            km.set_adapter(n)
            ref = km(input_ids=ids[i : i + 1]).logits
        assert_close(mixed[i : i + 1], ref, atol=1e-5, rtol=1e-5)


def test_beam_search_repeats_names():
    build, targets, _ = MODELS["llama"]
    km = _two_adapters(peftkit, build, targets)
    prompt = torch.randint(1, 50, (2, 4))
    kw = {"max_new_tokens": 5, "min_new_tokens": 5, "num_beams": 3, "do_sample": False}
    mixed = km.generate(input_ids=prompt, adapter_names=["b", "default"], **kw)
    km.set_adapter("b")
    assert torch.equal(mixed[:1], km.generate(input_ids=prompt[:1], **kw))


@pytest.mark.parametrize(
    "names,match",
    [(["nope", "b"], "Unknown adapter"), (["b"], "entries for a batch"), ("b", "list")],
)
def test_bad_adapter_names(names, match):
    build, targets, _ = MODELS["llama"]
    km = _two_adapters(peftkit, build, targets)
    with pytest.raises((ValueError, TypeError), match=match):
        km(input_ids=IDS, adapter_names=names)


def test_training_mode_and_merged_are_refused():
    build, targets, _ = MODELS["llama"]
    km = _two_adapters(peftkit, build, targets)
    km.train()
    with pytest.raises(ValueError, match="eval mode"):
        km(input_ids=IDS, adapter_names=["b", "b"])
    km.eval()
    km.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        km(input_ids=IDS, adapter_names=["b", "b"])


def test_mixed_batch_cache_follows_weight_changes():
    build, targets, _ = MODELS["llama"]
    km = _two_adapters(peftkit, build, targets)
    first = km(input_ids=IDS, adapter_names=["b", "default"]).logits
    with torch.no_grad():
        for n, p in km.named_parameters():
            if "lora_B.b" in n:
                p.mul_(2)
    second = km(input_ids=IDS, adapter_names=["b", "default"]).logits
    assert not torch.allclose(first[0], second[0])
    assert_close(first[1], second[1])


def test_swap_merged_adapter_equals_unmerge_then_merge():
    build, targets, _ = MODELS["llama"]
    km = _two_adapters(peftkit, build, targets)
    ref = copy.deepcopy(km)
    km.merge_adapter()
    km.base_model.swap_merged_adapter("b")
    ref.set_adapter("b")
    ref.merge_adapter()
    for (k1, v1), (k2, v2) in zip(km.state_dict().items(), ref.state_dict().items()):
        assert k1 == k2
        assert_close(v1, v2, atol=1e-5, rtol=1e-5)
    assert km.active_adapter == "b"
    km.unmerge_adapter()
    with km.disable_adapter():
        base = km(input_ids=IDS).logits
    assert_close(base, build()(input_ids=IDS).logits, atol=1e-5, rtol=1e-5)
