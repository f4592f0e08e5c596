"""X-LoRA against PEFT's: same experts and classifier weights give the same logits, scalings and files."""

import os
import shutil
import warnings

import pytest
import torch

import peftkit
from peftkit import XLoraConfig
from peftkit.methods.xlora.cache import xlora_cache_class

from .conftest import make_base

peft = pytest.importorskip("peft")


def peft_xlora(adapters, **kw):
    base = make_base()
    base.config.use_cache = False  # PEFT's X-LoRA refuses a model with the cache on
    spv = kw.pop("scaling_pass_value", 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(
            base, peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=32, adapters=adapters,
                                   scaling_pass_value=0.0 if spv is None else spv, **kw))
    if spv is None:
        model.base_model.set_scaling_pass_value(None)
    return model.eval()


def ours(adapters, **kw):
    return peftkit.get_peft_model(make_base(), peftkit.XLoraConfig(task_type="CAUSAL_LM", adapters=adapters, **kw)).eval()


def pair(adapters, **kw):
    theirs = peft_xlora(adapters, **dict(kw))
    mine = ours(adapters, **kw)
    mine.base_model.internal_xlora_classifier.load_state_dict(theirs.base_model.internal_xlora_classifier.state_dict())
    return theirs, mine


CASES = {
    "defaults": {},
    "deep-layerwise": dict(xlora_depth=3, xlora_size=16, layerwise_scalings=True),
    "top1-softmax-topk": dict(top_k_lora=1, enable_softmax=False, enable_softmax_topk=True, xlora_depth=2, xlora_size=8),
    "top2-temperature": dict(top_k_lora=2, softmax_temperature=0.3, layerwise_scalings=True),
    "no-softmax-pass-value": dict(enable_softmax=False, scaling_pass_value=0.5, global_scaling_weight=0.7),
    "pass-value-1-over-n": dict(scaling_pass_value=None, layerwise_scalings=True, top_k_lora=2),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("names", [("0", "1"), ("0", "1", "2")], ids=["2experts", "3experts"])
def test_logits_and_scalings_equal_peft(experts, ids, case, names):
    theirs, mine = pair(experts(*names), **CASES[case])
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        got = mine(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mine.get_latest_scalings(), theirs.get_latest_scalings())
    n_layers = sum(1 for _ in mine.base_model.adapter_layers())
    assert mine.get_latest_scalings().shape == (2, 6, n_layers, len(names))
    assert n_layers == theirs.base_model.internal_xlora_classifier.n_layers


def test_experts_change_the_output(experts, ids):
    """The comparison above is not vacuous: the mixture differs from the base model."""
    _, mine = pair(experts("0", "1"))
    with torch.no_grad():
        mixed = mine(input_ids=ids).logits
        with mine.disable_adapter():
            plain = mine(input_ids=ids).logits
    assert (mixed - plain).abs().max() > 1e-3
    torch.testing.assert_close(plain, make_base()(input_ids=ids).logits)


def test_training_step_matches_peft(experts, ids):
    """Classifier gradients equal PEFT's (experts frozen, dropout off)."""
    theirs, mine = pair(experts("0", "1"), xlora_depth=2, xlora_size=8, xlora_dropout_p=0.0, layerwise_scalings=True)
    for model in (theirs, mine):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    g_theirs = {k: p.grad for k, p in theirs.base_model.internal_xlora_classifier.named_parameters()}
    g_mine = {k: p.grad for k, p in mine.base_model.internal_xlora_classifier.named_parameters()}
    assert g_mine.keys() == g_theirs.keys()
    for k in g_mine:
        torch.testing.assert_close(g_mine[k], g_theirs[k], atol=1e-6, rtol=1e-4)
    trainable = {n for n, p in mine.named_parameters() if p.requires_grad}
    assert trainable == {f"base_model.internal_xlora_classifier.{k}" for k in g_mine}


GEN = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("beams", [1, 3])
def test_cached_generation_equals_uncached_and_peft(experts, ids, beams):
    theirs, mine = pair(experts("0", "1", "2"), layerwise_scalings=True, xlora_depth=2, xlora_size=8)
    expected = theirs.generate(input_ids=ids, num_beams=beams, **GEN)  # PEFT: no cache, every step from scratch
    uncached = mine.generate(input_ids=ids, num_beams=beams, use_cache=False, **GEN)
    cached = mine.generate(input_ids=ids, num_beams=beams, **GEN)
    assert torch.equal(uncached, expected)
    assert torch.equal(cached, uncached)
    assert "forward" not in vars(mine.get_base_model())  # generate() put the model's forward back


def test_cached_generation_with_padding_equals_uncached(experts):
    _, mine = pair(experts("0", "1"), layerwise_scalings=True)
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    cached = mine.generate(input_ids=ids, attention_mask=mask, **GEN)
    uncached = mine.generate(input_ids=ids, attention_mask=mask, use_cache=False, **GEN)
    assert torch.equal(cached, uncached)


def test_step_by_step_decoding_with_returned_cache(experts, ids):
    _, mine = pair(experts("0", "1"))
    with torch.no_grad():
        first = mine(input_ids=ids, use_cache=True)
        assert isinstance(first.past_key_values, xlora_cache_class())
        nxt = first.logits[:, -1:].argmax(-1)
        step = mine(input_ids=nxt, past_key_values=first.past_key_values, use_cache=True)
        whole = mine(input_ids=torch.cat([ids, nxt], 1), use_cache=False)
    torch.testing.assert_close(step.logits[:, -1], whole.logits[:, -1], atol=1e-5, rtol=1e-5)
    assert first.past_key_values.get_seq_length() == 7
    assert first.past_key_values.scaling_cache.get_seq_length() == 7


def test_a_cache_it_did_not_build_is_refused(experts, ids):
    from transformers.cache_utils import DynamicCache

    _, mine = pair(experts("0", "1"))
    with torch.no_grad():
        plain = make_base()(input_ids=ids, use_cache=True).past_key_values
        assert isinstance(plain, DynamicCache) and plain.get_seq_length() > 0
        with pytest.raises(ValueError, match="past_key_values"):
            mine(input_ids=ids[:, :1], past_key_values=plain, use_cache=True)


# ---------------------------------------------------------------------------- files
def _reload_equal(model, folder, ids):
    loaded = peftkit.PeftModel.from_pretrained(make_base(), folder)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    return loaded


def test_saved_layout_is_peft_layout(experts, tmp_path):
    from safetensors.torch import load_file

    _, mine = pair(experts("0", "1"), xlora_depth=2, xlora_size=8)
    mine.save_pretrained(str(tmp_path))
    root = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(root) == sorted(f"base_model.internal_xlora_classifier.layers.{i}.{p}"
                                  for i in (0, 3) for p in ("weight", "bias"))
    for i, name in enumerate(("0", "1")):
        sub = load_file(str(tmp_path / str(i) / "adapter_model.safetensors"))
        original = load_file(os.path.join(experts(name)[name], "adapter_model.safetensors"))
        assert sub.keys() == original.keys()
        for k in sub:
            assert torch.equal(sub[k], original[k])
        assert (tmp_path / str(i) / "adapter_config.json").is_file()


def test_depth_1_classifier_is_saved(experts, ids, tmp_path):
    """PEFT 0.21 drops every key containing '.0.', so its depth-1 classifier file is empty; ours is not."""
    _, mine = pair(experts("0", "1"))
    mine.save_pretrained(str(tmp_path))
    from safetensors.torch import load_file

    assert sorted(load_file(str(tmp_path / "adapter_model.safetensors"))) == [
        "base_model.internal_xlora_classifier.layers.0.bias", "base_model.internal_xlora_classifier.layers.0.weight"]
    _reload_equal(mine, str(tmp_path), ids)


def test_reload_without_the_original_expert_folders(expert_dir, ids, tmp_path):
    """Any expert names; the saved sub-folders are enough once the original folders are gone."""
    adapters = {}
    for name, new in (("0", "math.v1"), ("1", "poetry")):
        dst = tmp_path / "gone" / new
        shutil.copytree(expert_dir / f"expert_{name}", dst)
        adapters[new] = str(dst)
    mine = ours(adapters, layerwise_scalings=True)
    assert mine.base_model.expert_names == ["math.v1", "poetry"]
    mine.save_pretrained(str(tmp_path / "saved"))
    shutil.rmtree(tmp_path / "gone")
    loaded = _reload_equal(mine, str(tmp_path / "saved"), ids)
    assert loaded.base_model.expert_names == ["math.v1", "poetry"]
    assert not any(p.requires_grad for p in loaded.parameters())


def test_peft_loads_ours(experts, ids, tmp_path):
    _, mine = pair(experts("0", "1"), xlora_depth=2, xlora_size=8, layerwise_scalings=True)
    mine.save_pretrained(str(tmp_path))
    base = make_base()
    base.config.use_cache = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, mine(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_we_load_peft_saved(experts, ids, tmp_path):
    """PEFT 0.21 writes incomplete expert sub-folders and drops the classifier's first layer: the complete
    original experts are used, and the missing classifier tensors are reported."""
    theirs, _ = pair(experts("0", "1"), xlora_depth=2, xlora_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(str(tmp_path))
    with pytest.warns(UserWarning, match="layers.0"):
        loaded = peftkit.PeftModel.from_pretrained(make_base(), str(tmp_path))
    classifier = loaded.base_model.internal_xlora_classifier
    torch.testing.assert_close(classifier.layers[3].weight, theirs.base_model.internal_xlora_classifier.layers[3].weight)
    classifier.load_state_dict(theirs.base_model.internal_xlora_classifier.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_adapters_kwarg_overrides_saved_experts(experts, ids, tmp_path):
    _, mine = pair(experts("0", "1"))
    mine.save_pretrained(str(tmp_path))
    swapped = {"a": experts("1")["1"], "b": experts("0")["0"]}
    loaded = peftkit.PeftModel.from_pretrained(make_base(), str(tmp_path), adapters=swapped)
    assert loaded.base_model.expert_names == ["a", "b"]
    with torch.no_grad():
        assert not torch.allclose(loaded(input_ids=ids).logits, mine(input_ids=ids).logits)


def test_experts_saved_by_peft(tmp_path, ids):
    """LoRA experts trained and saved with PEFT work as experts, mixed exactly as PEFT's X-LoRA mixes them."""
    adapters = {}
    for i, targets in enumerate((["q_proj", "v_proj"], ["k_proj", "down_proj"])):
        torch.manual_seed(20 + i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lora = peft.get_peft_model(make_base(), peft.LoraConfig(r=2 + i, target_modules=targets, init_lora_weights=False))
            lora.save_pretrained(str(tmp_path / str(i)))
        adapters[str(i)] = str(tmp_path / str(i))
    theirs, mine = pair(adapters, layerwise_scalings=True)
    with torch.no_grad():
        torch.testing.assert_close(mine(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("keep_originals", [True, False])
def test_expert_order_survives_saving(expert_dir, ids, tmp_path, keep_originals):
    """The adapters' order (not alphabetical here) is the classifier's column order, also after a reload."""
    adapters = {}
    for name, new in (("0", "zeta"), ("1", "alpha")):
        dst = tmp_path / "experts" / new
        shutil.copytree(expert_dir / f"expert_{name}", dst)
        adapters[new] = str(dst)
    mine = ours(adapters, layerwise_scalings=True)
    mine.save_pretrained(str(tmp_path / "saved"))
    if not keep_originals:  # the sub-folders are the experts
        shutil.rmtree(tmp_path / "experts")
    else:  # the original folders are the experts
        for i in (0, 1):
            shutil.rmtree(tmp_path / "saved" / str(i))
    loaded = _reload_equal(mine, str(tmp_path / "saved"), ids)
    assert loaded.base_model.expert_names == ["zeta", "alpha"]


def test_numbered_experts_follow_their_numbers():
    from peftkit.methods.xlora.model import XLoraModel

    names = sorted(str(i) for i in range(12))  # PEFT writes them sorted as text: "0", "1", "10", "11", "2", ...
    config = XLoraConfig(adapters={n: f"/nowhere/{n}" for n in names})
    config = XLoraModel.loading_config(config, "/nowhere")
    assert list(config.adapters) == [str(i) for i in range(12)]
    assert [c[0][0] for c in config._expert_sources] == [f"/nowhere/{i}" for i in range(12)]


def test_numbered_experts_out_of_order_are_refused(experts):
    paths = experts("0", "1")
    with pytest.raises(ValueError, match="in order"):
        ours({"1": paths["1"], "0": paths["0"]})


def test_auto_peft_model_loads_an_xlora_folder(experts, ids, tmp_path):
    from transformers import AutoModelForCausalLM

    make_base().save_pretrained(str(tmp_path / "base"))
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    mine = peftkit.get_peft_model(base, XLoraConfig(task_type="CAUSAL_LM", adapters=experts("0", "1"))).eval()
    mine.save_pretrained(str(tmp_path / "xlora"))
    loaded = peftkit.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "xlora"))
    assert isinstance(loaded, peftkit.PeftModelForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, mine(input_ids=ids).logits)
