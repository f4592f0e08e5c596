"""Managing prompt-learning adapters: disabling, several adapters, deleting, and what does not apply."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from torch.testing import assert_close

import peftkit
from peftkit.prompt import PromptTable

from .helpers import (
    LIBS, N_VIRTUAL, batch, build, forward, generate, load, make, prompt_config, prompt_table, quiet, save,
)

EXACT = {"atol": 1e-6, "rtol": 1e-6}


def _add(model, lib_name, name, adapter, method, seed=2, **overrides):
    torch.manual_seed(seed)
    quiet(model.add_adapter, adapter, prompt_config(LIBS[lib_name], name, method, **overrides))
    model.eval()


@pytest.mark.parametrize("name,method", [("llama", "pt_random"), ("gpt2", "ptune_lstm"), ("bert", "ptune_mlp")])
def test_disable_adapter_gives_base_outputs(name, method):
    model = make("peftkit", name, method)
    base_out = forward(build(name), name)
    with model.disable_adapter():
        off = forward(model, name)
        if name != "bert":
            assert torch.equal(generate(model, name), generate(build(name), name))
    assert off.logits.shape == base_out.logits.shape
    assert_close(off.logits, base_out.logits, **EXACT)
    assert_close(off.loss, base_out.loss, **EXACT)
    on = forward(model, name)
    assert not torch.allclose(on.logits if name == "bert" else on.logits[:, N_VIRTUAL:], base_out.logits, atol=1e-4)
    assert_close(on.logits, forward(make("peft", name, method), name).logits, **EXACT)


def test_disable_adapter_restored_after_error():
    model = make("peftkit", "llama", "pt_random")
    expected = forward(model, "llama").logits
    with pytest.raises(RuntimeError), model.disable_adapter():
        raise RuntimeError("boom")
    assert_close(forward(model, "llama").logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_two_adapters_switch_like_oracle(name):
    models = {}
    for lib in ("peftkit", "peft"):
        m = make(lib, name, "pt_random")
        _add(m, lib, name, "other", "pt_vocab", num_virtual_tokens=6)
        models[lib] = m
    kit, ref = models["peftkit"], models["peft"]
    assert sorted(kit.peft_config) == ["default", "other"]
    assert kit.active_adapter == "default"
    default_out = forward(kit, name).logits
    assert_close(default_out, forward(ref, name).logits, **EXACT)
    for m in (kit, ref):
        m.set_adapter("other")
    assert kit.active_adapter == "other"
    other_out = forward(kit, name).logits
    assert_close(other_out, forward(ref, name).logits, **EXACT)
    if name == "llama":
        assert default_out.shape[1] == N_VIRTUAL + 6 and other_out.shape[1] == 6 + 6
        assert torch.equal(generate(kit, name), generate(ref, name))
    else:
        assert not torch.allclose(default_out, other_out, atol=1e-5)
    kit.set_adapter("default")
    assert_close(forward(kit, name).logits, default_out, rtol=0, atol=0)


def test_only_active_adapter_trainable():
    model = make("peftkit", "llama", "pt_random")
    _add(model, "peftkit", "llama", "other", "ptune_mlp")

    def trainable():
        return {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}  # prompt_encoder.<adapter>...

    assert trainable() == {"default"}
    model.set_adapter("other")
    assert trainable() == {"other"}


def test_two_adapters_save_and_load_in_oracle(tmp_path):
    kit = make("peftkit", "gpt2", "pt_random")
    _add(kit, "peftkit", "gpt2", "other", "pt_vocab", num_virtual_tokens=3)  # PEFT needs one peft_type per model
    kit.set_adapter("other")
    expected_other = forward(kit, "gpt2").logits
    kit.set_adapter("default")
    expected_default = forward(kit, "gpt2").logits
    save(kit, tmp_path)
    assert (tmp_path / "other" / "adapter_model.safetensors").exists()
    for lib in ("peft", "peftkit"):
        m = load(lib, "gpt2", tmp_path)
        assert_close(forward(m, "gpt2").logits, expected_default, **EXACT)
        quiet(m.load_adapter, str(tmp_path / "other"), adapter_name="other")
        m.set_adapter("other")
        assert_close(forward(m, "gpt2").logits, expected_other, **EXACT)


def test_delete_adapter():
    model = make("peftkit", "llama", "pt_random")
    expected = forward(model, "llama").logits
    _add(model, "peftkit", "llama", "other", "ptune_mlp")
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]
    assert list(model.prompt_encoder) == ["default"]
    assert not any(".other." in n for n, _ in model.named_parameters())
    assert_close(forward(model, "llama").logits, expected, rtol=0, atol=0)
    with pytest.raises((ValueError, KeyError)):
        model.delete_adapter("missing")
    # the name can be used again
    _add(model, "peftkit", "llama", "other", "pt_vocab")
    assert sorted(model.peft_config) == ["default", "other"]


def test_add_adapter_with_existing_name_fails():
    model = make("peftkit", "llama", "pt_random")
    with pytest.raises(ValueError, match="already exists"):
        _add(model, "peftkit", "llama", "default", "pt_vocab")
    assert list(model.peft_config) == ["default"]


def test_set_adapter_list_of_two_raises():
    model = make("peftkit", "llama", "pt_random")
    _add(model, "peftkit", "llama", "other", "pt_vocab")
    with pytest.raises(ValueError, match="one adapter"):
        model.set_adapter(["default", "other"])
    assert model.active_adapter == "default"
    model.set_adapter(["other"])  # a list of one is fine
    assert model.active_adapters == ["other"]
    with pytest.raises((ValueError, KeyError)):
        model.set_adapter("missing")


def test_merge_raises():
    model = make("peftkit", "llama", "ptune_mlp")
    expected = forward(model, "llama").logits
    with pytest.raises(ValueError, match="merge"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="merge"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="merge"):
        model._engine.merge_and_unload()
    assert_close(forward(model, "llama").logits, expected, rtol=0, atol=0)  # nothing changed


def test_adapter_names_raises():
    model = make("peftkit", "llama", "pt_random")
    inputs = batch("llama")
    with pytest.raises(ValueError, match="adapter_names"):
        model(**inputs, adapter_names=["default"] * 3)
    with pytest.raises(ValueError, match="adapter_names"):
        model.generate(**inputs, adapter_names=["default"] * 3, max_new_tokens=2)


@pytest.mark.parametrize("name,method", [("llama", "pt_random"), ("gpt2", "ptune_mlp"), ("llama", "ptune_lstm"),
                                         ("bert", "pt_text"), ("bert", "ptune_mlp")])
def test_print_trainable_parameters_like_oracle(name, method):
    kit, ref = make("peftkit", name, method), make("peft", name, method)
    assert kit.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    outs = []
    for m in (kit, ref):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            m.print_trainable_parameters()
        outs.append(buf.getvalue())
    assert outs[0] == outs[1]
    trainable, _ = kit.get_nb_trainable_parameters()
    prompt = sum(p.numel() for p in kit.prompt_encoder.parameters())
    head = 16 * 3 + 3 if name == "bert" else 0
    assert trainable == prompt + head
    if method.startswith("pt_"):
        assert prompt == N_VIRTUAL * 16


# --------------------------------------------------------------------------- loaded P-tuning
@pytest.mark.parametrize("src", ["peft", "peftkit"])
@pytest.mark.parametrize("method", ["ptune_mlp", "ptune_lstm"])
def test_loaded_p_tuning_is_a_plain_table(method, src, tmp_path):
    model = make(src, "llama", method)
    expected = forward(model, "llama")
    table = prompt_table(model)
    save(model, tmp_path)
    for trainable in (False, True):
        loaded = load("peftkit", "llama", tmp_path, is_trainable=trainable)
        loaded.eval()
        encoder = loaded.prompt_encoder["default"]
        assert isinstance(encoder, PromptTable)
        names = [n for n, _ in encoder.named_parameters()]
        assert names == ["embedding.weight"]
        assert not any("mlp_head" in n or "lstm_head" in n for n, _ in loaded.named_parameters())
        assert_close(encoder.embedding.weight.detach(), table, **EXACT)
        assert encoder.embedding.weight.requires_grad is trainable
        got = forward(loaded, "llama")
        assert_close(got.logits, expected.logits, **EXACT)
        assert_close(got.loss, expected.loss, **EXACT)
        assert loaded.peft_config["default"].inference_mode is (not trainable)


def test_loaded_adapter_has_no_meta_tensors(tmp_path):
    save(make("peftkit", "gpt2", "pt_text"), tmp_path)
    loaded = load("peftkit", "gpt2", tmp_path)
    assert not any(p.is_meta for p in loaded.parameters())


def test_prompt_embedding_to_save_is_a_copy():
    """Changing what get_prompt_embedding_to_save returns must not change the adapter (PEFT returns a new tensor)."""
    model = make("peftkit", "llama", "pt_random")
    expected = forward(model, "llama").logits
    out = model.get_prompt_embedding_to_save("default")
    out.zero_()
    assert torch.equal(forward(model, "llama").logits, expected)


def test_delete_active_adapter_switches_like_oracle():
    models = {}
    for lib in ("peftkit", "peft"):
        m = make(lib, "llama", "pt_random")
        _add(m, lib, "llama", "b", "pt_vocab", num_virtual_tokens=3)
        quiet(m.delete_adapter, "default")
        models[lib] = m
    assert models["peftkit"].active_adapters == models["peft"].active_adapters == ["b"]
    out = forward(models["peftkit"], "llama").logits
    assert out.shape[1] == 3 + 6
    assert_close(out, forward(models["peft"], "llama").logits, **EXACT)


def test_other_method_cannot_join(tmp_path):
    """A LoRA adapter cannot be loaded into a prompt-learning model, nor a prompt into a LoRA model."""
    from tests.compat._helpers import make_peft_model

    lora = make_peft_model("peftkit", "llama")
    save(lora, tmp_path)
    model = make("peftkit", "llama", "pt_random")
    expected = forward(model, "llama").logits
    with pytest.raises(ValueError, match="prompt-learning"):
        quiet(model.load_adapter, str(tmp_path), adapter_name="lora")
    assert list(model.peft_config) == ["default"]
    assert_close(forward(model, "llama").logits, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="PROMPT_TUNING"):
        quiet(lora.add_adapter, "p", prompt_config(peftkit, "llama", "pt_random"))


def test_saved_size_mismatch_is_clear(tmp_path):
    import json

    save(make("peftkit", "llama", "pt_random"), tmp_path)
    path = tmp_path / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["num_virtual_tokens"] = 5
    path.write_text(json.dumps(cfg))
    base = build("llama")
    with pytest.raises(ValueError, match="prompt_embeddings"):
        quiet(peftkit.PeftModel.from_pretrained, base, str(tmp_path))
    assert not hasattr(base, "peft_config")


@pytest.mark.parametrize("method", ["pt_random", "ptune_mlp"])
def test_get_peft_model_with_inference_mode_config(method):
    """PEFT builds a usable (frozen) prompt when the config says inference_mode=True."""
    ref = make("peft", "llama", method, inference_mode=True)
    expected = forward(ref, "llama")
    kit = make("peftkit", "llama", method, inference_mode=True)
    got = forward(kit, "llama")
    assert not any(p.requires_grad for p in kit.parameters())
    assert_close(got.logits, expected.logits, **EXACT)
