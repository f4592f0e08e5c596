"""Adapters saved by one library load in the other with identical outputs."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from _helpers import (
    DIRECTION_IDS,
    DIRECTIONS,
    HF_MODELS,
    LIBS,
    add_adapter,
    build,
    inputs,
    load,
    lora_config,
    lora_ranks,
    make_peft_model,
    perturb_trainable,
    run,
    save,
)

ALL_MODELS = HF_MODELS + ["custom"]


def _roundtrip(src: str, dst: str, name: str, tmp_path, **overrides) -> tuple[torch.Tensor, torch.Tensor]:
    """Save an adapter with ``src``, load it with ``dst``; return both outputs."""
    model = make_peft_model(src, name, **overrides)
    expected = run(model, name)
    save(model, str(tmp_path / "ad"))
    loaded = load(dst, name, str(tmp_path / "ad"))
    assert isinstance(loaded, LIBS[dst].PeftModel)
    return expected, run(loaded, name)


# ----------------------------------------------------------------------------- (a) + (b)
@pytest.mark.parametrize("src,dst", DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("name", ALL_MODELS)
def test_adapter_loads_in_other_library(src, dst, name, tmp_path):
    expected, got = _roundtrip(src, dst, name, tmp_path)
    base_out = run(build(name), name)
    # the adapter really changes the model, so equal outputs mean something
    assert not torch.allclose(expected, base_out, atol=1e-4)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("src,dst", DIRECTIONS, ids=DIRECTION_IDS)
def test_seq_cls_head_is_saved_and_loaded(src, dst, tmp_path):
    """BERT SEQ_CLS: the classifier is in modules_to_save automatically, and travels with the adapter."""
    model = make_peft_model(src, "bert")
    save(model, str(tmp_path / "ad"))
    loaded = load(dst, "bert", str(tmp_path / "ad"))
    assert "classifier" in loaded.peft_config["default"].modules_to_save
    w_src = model.base_model.model.classifier.modules_to_save["default"].weight
    w_dst = loaded.base_model.model.classifier.modules_to_save["default"].weight
    torch.testing.assert_close(w_dst, w_src)
    # the trained copy differs from the original head, which stays as the base model's
    orig = build("bert").classifier.weight
    torch.testing.assert_close(loaded.base_model.model.classifier.original_module.weight, orig)
    assert not torch.allclose(w_dst, orig)


@pytest.mark.parametrize("src,dst", DIRECTIONS, ids=DIRECTION_IDS)
def test_fan_in_fan_out_for_gpt2(src, dst, tmp_path):
    """GPT-2's Conv1D targets: fan_in_fan_out is set and recorded, and the loader honours it."""
    model = make_peft_model(src, "gpt2")
    assert model.peft_config["default"].fan_in_fan_out is True
    save(model, str(tmp_path / "ad"))
    loaded = load(dst, "gpt2", str(tmp_path / "ad"))
    assert loaded.peft_config["default"].fan_in_fan_out is True
    torch.testing.assert_close(run(loaded, "gpt2"), run(model, "gpt2"))


@pytest.mark.parametrize("src,dst", DIRECTIONS, ids=DIRECTION_IDS)
def test_legacy_bin_format(src, dst, tmp_path):
    """safe_serialization=False writes adapter_model.bin, which the other library reads."""
    model = make_peft_model(src, "llama")
    save(model, str(tmp_path / "ad"), safe_serialization=False)
    assert os.path.isfile(tmp_path / "ad" / "adapter_model.bin")
    assert not os.path.isfile(tmp_path / "ad" / "adapter_model.safetensors")
    loaded = load(dst, "llama", str(tmp_path / "ad"))
    torch.testing.assert_close(run(loaded, "llama"), run(model, "llama"))


# ----------------------------------------------------------------------------- (e) several adapters
def _files(root) -> set[str]:
    out = set()
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith((".json", ".safetensors", ".bin")):
                out.add(os.path.relpath(os.path.join(dirpath, f), root))
    return out


@pytest.mark.parametrize("src,dst", DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_several_adapters_round_trip(src, dst, name, tmp_path):
    model = make_peft_model(src, name)
    add_adapter(model, src, name, "other", adapter_seed=2, r=2, lora_alpha=3)
    add_adapter(model, src, name, "third", adapter_seed=3, r=6, lora_alpha=4, use_rslora=True)
    outs = {}
    for a in ("default", "other", "third"):
        model.set_adapter(a)
        outs[a] = run(model, name)
    assert not torch.allclose(outs["default"], outs["other"], atol=1e-4)
    save(model, str(tmp_path / "ad"))
    assert _files(tmp_path / "ad") == {
        "adapter_config.json", "adapter_model.safetensors",
        os.path.join("other", "adapter_config.json"), os.path.join("other", "adapter_model.safetensors"),
        os.path.join("third", "adapter_config.json"), os.path.join("third", "adapter_model.safetensors"),
    }

    loaded = load(dst, name, str(tmp_path / "ad"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded.load_adapter(str(tmp_path / "ad" / "other"), adapter_name="other")
        loaded.load_adapter(str(tmp_path / "ad"), adapter_name="third", subfolder="third")
    loaded.eval()
    assert set(loaded.peft_config) == {"default", "other", "third"}
    assert loaded.active_adapter == "default"  # load_adapter does not switch the active adapter
    for a in ("default", "other", "third"):
        loaded.set_adapter(a)
        assert lora_ranks(loaded, a) == lora_ranks(model, a)
        torch.testing.assert_close(run(loaded, name), outs[a], msg=lambda m, a=a: f"adapter {a}: {m}")


@pytest.mark.parametrize("src,dst", DIRECTIONS, ids=DIRECTION_IDS)
def test_selected_adapters_saved_alone(src, dst, tmp_path):
    """A non-default adapter saved alone still goes into its subfolder, and loads from there."""
    model = make_peft_model(src, "llama")
    add_adapter(model, src, "llama", "other", adapter_seed=2, r=2)
    expected = run(model, "llama")  # "other" is active
    save(model, str(tmp_path / "ad"), selected_adapters=["other"])
    assert _files(tmp_path / "ad") == {os.path.join("other", "adapter_config.json"),
                                       os.path.join("other", "adapter_model.safetensors")}
    loaded = load(dst, "llama", str(tmp_path / "ad"), subfolder="other", adapter_name="other")
    assert loaded.active_adapter == "other"
    torch.testing.assert_close(run(loaded, "llama"), expected)


# ----------------------------------------------------------------------------- (g) bias modes, lora_bias, rslora
@pytest.mark.parametrize("src,dst", DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("bias", ["all", "lora_only"])
@pytest.mark.parametrize("name", ["gpt2", "bert", "custom"])
def test_bias_modes_round_trip(src, dst, bias, name, tmp_path):
    """Biases trained under bias="all" / "lora_only" are saved and restored by the other library."""
    expected, got = _roundtrip(src, dst, name, tmp_path, bias=bias)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("src,dst", DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("name", ["gpt2", "bert", "t5", "custom"])
def test_lora_bias_round_trip(src, dst, name, tmp_path):
    overrides = {"lora_bias": True}
    if name == "custom":  # lora_bias is not supported on embeddings
        overrides["target_modules"] = ["conv", "conv1d", "lin"]
    expected, got = _roundtrip(src, dst, name, tmp_path, **overrides)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("src,dst", DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("name", ["llama", "t5", "custom"])
def test_rslora_outputs_equal(src, dst, name, tmp_path):
    model = make_peft_model(src, name, use_rslora=True, r=4, lora_alpha=8)
    assert {s for _, s in lora_ranks(model).values()} == {8 / 2}  # alpha / sqrt(r)
    save(model, str(tmp_path / "ad"))
    loaded = load(dst, name, str(tmp_path / "ad"))
    assert lora_ranks(loaded) == lora_ranks(model)
    torch.testing.assert_close(run(loaded, name), run(model, name))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_same_weights_same_outputs_in_memory(name):
    """Without files: the same adapter tensors (copied by in-memory name) give the same forward."""
    a = make_peft_model("peft", name, use_rslora=True, rank_pattern={"v": 2, "v_proj": 2, "value": 2, "emb": 2})
    b = make_peft_model("peftkit", name, use_rslora=True, rank_pattern={"v": 2, "v_proj": 2, "value": 2, "emb": 2})
    sa = dict(a.state_dict())
    with torch.no_grad():
        for k, v in b.state_dict().items():
            v.copy_(sa[k])
    torch.testing.assert_close(run(b, name), run(a, name))


@pytest.mark.parametrize("src,dst", DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("name", ALL_MODELS)
def test_rank_and_alpha_pattern_round_trip(src, dst, name, tmp_path):
    patterns = {
        "llama": ({"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6}, {"o_proj": 3}),
        "gpt2": ({"c_attn": 2, r"h\.1\.mlp\.c_proj": 6}, {"c_fc": 3}),
        "bert": ({"query": 2, r"layer\.1\.output\.dense": 6}, {"value": 3}),
        "t5": ({r"decoder.*\.q": 2, "wo": 6}, {"k": 3}),
        "custom": ({"emb": 2, "conv": 6}, {"lin": 3, "conv1d": 5}),
    }[name]
    model = make_peft_model(src, name, rank_pattern=patterns[0], alpha_pattern=patterns[1])
    ranks = lora_ranks(model)
    assert {r for r, _ in ranks.values()} == {2, 4, 6}
    save(model, str(tmp_path / "ad"))
    loaded = load(dst, name, str(tmp_path / "ad"))
    assert lora_ranks(loaded) == ranks
    torch.testing.assert_close(run(loaded, name), run(model, name))


# ----------------------------------------------------------------------------- (h) embedding / conv targets
@pytest.mark.parametrize("src,dst", DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("targets", [["emb"], ["conv"], ["conv_s"], ["conv1d"], ["emb", "conv", "conv1d", "lin"]],
                         ids=lambda t: "+".join(t))
def test_embedding_and_conv_targets(src, dst, targets, tmp_path):
    expected, got = _roundtrip(src, dst, "custom", tmp_path, target_modules=targets)
    assert not torch.allclose(expected, run(build("custom"), "custom"), atol=1e-4)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("src,dst", DIRECTIONS, ids=DIRECTION_IDS)
def test_custom_modules_to_save(src, dst, tmp_path):
    """A model without task_type, with an explicit modules_to_save head."""
    expected, got = _roundtrip(src, dst, "custom", tmp_path, target_modules=["conv", "emb"], modules_to_save=["head"])
    torch.testing.assert_close(got, expected)


# ----------------------------------------------------------------------------- generate
@pytest.mark.parametrize("src,dst", DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("name", ["llama", "t5"])
def test_greedy_generate_equal(src, dst, name, tmp_path):
    model = make_peft_model(src, name)
    save(model, str(tmp_path / "ad"))
    loaded = load(dst, name, str(tmp_path / "ad"))
    x = inputs(name)
    gen = {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"], "max_new_tokens": 8,
           "min_new_tokens": 8, "do_sample": False, "num_beams": 1, "pad_token_id": 0}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = model.generate(**gen)
        b = loaded.generate(**gen)
        base = build(name).generate(**gen)
    new = a.shape[1] - (x["input_ids"].shape[1] if name == "llama" else 1)
    assert new == 8
    assert torch.equal(b, a)
    assert not torch.equal(a, base)  # the adapter changes what is generated


# ----------------------------------------------------------------------------- more configs, both ways
VARIANTS = [
    ("llama", {"target_modules": "all-linear"}),
    ("gpt2", {"target_modules": "all-linear"}),
    ("bert", {"target_modules": "all-linear"}),
    ("t5", {"target_modules": "all-linear"}),
    ("llama", {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [1], "layers_pattern": "layers"}),
    ("t5", {"target_modules": ["q", "wo"], "layers_to_transform": [0]}),
    ("llama", {"target_modules": "all-linear", "exclude_modules": r".*\.mlp\..*"}),
    ("llama", {"target_modules": r"model\.layers\.\d+\.self_attn\.(k|o)_proj"}),
    ("bert", {"modules_to_save": ["pooler"]}),
    ("t5", {"modules_to_save": ["final_layer_norm"]}),
    ("gpt2", {"modules_to_save": ["ln_f"], "target_modules": None}),
    ("llama", {"target_modules": None, "lora_dropout": 0.1}),
]


@pytest.mark.parametrize("src,dst", DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("name,overrides", [pytest.param(n, kw, id=f"{n}-{i}") for i, (n, kw) in enumerate(VARIANTS)])
def test_config_variants_round_trip(src, dst, name, overrides, tmp_path):
    model = make_peft_model(src, name, **overrides)
    save(model, str(tmp_path / "ad"))
    loaded = load(dst, name, str(tmp_path / "ad"))
    assert lora_ranks(loaded) == lora_ranks(model)
    torch.testing.assert_close(run(loaded, name), run(model, name))


@pytest.mark.parametrize("src,dst", DIRECTIONS, ids=DIRECTION_IDS)
def test_mixed_adapter_batch_equal(src, dst, tmp_path):
    """forward(adapter_names=[...]): each sample runs with its own adapter, the same in both libraries."""
    model = make_peft_model(src, "bert")
    add_adapter(model, src, "bert", "other", adapter_seed=2, r=2)
    model.set_adapter("default")
    save(model, str(tmp_path / "ad"))
    loaded = load(dst, "bert", str(tmp_path / "ad"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded.load_adapter(str(tmp_path / "ad" / "other"), adapter_name="other")
    x = inputs("bert")
    names = ["other", "__base__"]
    with torch.no_grad():
        a = model(**x, adapter_names=names).logits
        b = loaded(**x, adapter_names=names).logits
        base = build("bert")(**x).logits
    torch.testing.assert_close(b, a)
    torch.testing.assert_close(b[1], base[1])


@pytest.mark.parametrize("src,dst", DIRECTIONS, ids=DIRECTION_IDS)
def test_disable_adapter_gives_base_output(src, dst, tmp_path):
    model = make_peft_model(src, "bert")
    save(model, str(tmp_path / "ad"))
    loaded = load(dst, "bert", str(tmp_path / "ad"))
    with loaded.disable_adapter():
        out = run(loaded, "bert")
    torch.testing.assert_close(out, run(build("bert"), "bert"))
    torch.testing.assert_close(run(loaded, "bert"), run(model, "bert"))


@pytest.mark.parametrize("src,dst", DIRECTIONS, ids=DIRECTION_IDS)
def test_is_trainable_same_trainable_parameters(src, dst, tmp_path):
    model = make_peft_model(src, "bert")
    save(model, str(tmp_path / "ad"))
    got = {}
    for lib in ("peft", "peftkit"):
        loaded = load(lib, "bert", str(tmp_path / "ad"), is_trainable=True)
        got[lib] = sorted(n for n, p in loaded.named_parameters() if p.requires_grad)
        frozen = load(lib, "bert", str(tmp_path / "ad"))
        assert not any(p.requires_grad for p in frozen.parameters()), lib
    assert got["peftkit"] == got["peft"]


@pytest.mark.parametrize("src,dst", DIRECTIONS, ids=DIRECTION_IDS)
def test_bf16_base_model(src, dst, tmp_path):
    """Adapters stay float32 over a bfloat16 base model, and give the same outputs in both libraries."""
    model = make_peft_model(src, "llama")
    save(model, str(tmp_path / "ad"))
    outs = {}
    for lib in (src, dst):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = LIBS[lib].PeftModel.from_pretrained(build("llama").to(torch.bfloat16), str(tmp_path / "ad")).eval()
        dtypes = {p.dtype for n, p in m.named_parameters() if "lora_" in n}
        assert dtypes == {torch.float32}, (lib, dtypes)
        outs[lib] = run(m, "llama").float()
    torch.testing.assert_close(outs[dst], outs[src], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("src,dst", DIRECTIONS, ids=DIRECTION_IDS)
def test_auto_peft_model_loads_local_base(src, dst, tmp_path):
    """AutoPeftModelForCausalLM finds the base model through base_model_name_or_path (a local folder)."""
    base_dir = str(tmp_path / "base")
    build("llama").save_pretrained(base_dir)
    model = make_peft_model(src, "llama")
    model.peft_config["default"].base_model_name_or_path = base_dir
    save(model, str(tmp_path / "ad"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = LIBS[dst].AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "ad")).eval()
    assert isinstance(loaded, LIBS[dst].PeftModelForCausalLM)
    torch.testing.assert_close(run(loaded, "llama"), run(model, "llama"))


@pytest.mark.parametrize("src,dst", DIRECTIONS, ids=DIRECTION_IDS)
def test_resized_vocabulary_travels_with_embedding_targets(src, dst, tmp_path):
    """Targets embed_tokens / lm_head on a resized vocabulary: PEFT saves those layers' base weights too
    (save_embedding_layers="auto"), so the new token rows come back on a base resized with other values."""

    def resized(seed: int):
        m = build("llama")
        torch.manual_seed(seed)
        m.resize_token_embeddings(70, mean_resizing=False)
        return m.eval()

    lib = LIBS[src]
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.get_peft_model(resized(10), lora_config(lib, "llama", target_modules=["embed_tokens", "lm_head", "q_proj"]))
        perturb_trainable(model)
        model.eval().save_pretrained(str(tmp_path / "ad"))
        loaded = LIBS[dst].PeftModel.from_pretrained(resized(99), str(tmp_path / "ad")).eval()
    ids = torch.tensor([[65, 66, 3, 4]])  # two of the new tokens
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("src", ["peft", "peftkit"])
def test_bias_all_with_head_disable_adapter_same(src, tmp_path):
    """bias="all" + a modules_to_save head: after loading, the original head is untouched in both libraries,
    so outputs with the adapter disabled agree too."""
    model = make_peft_model(src, "bert", bias="all")
    save(model, str(tmp_path / "ad"))
    outs, heads = {}, {}
    for lib in ("peft", "peftkit"):
        loaded = load(lib, "bert", str(tmp_path / "ad"))
        heads[lib] = loaded.base_model.model.classifier.original_module.bias.detach().clone()
        with loaded.disable_adapter():
            outs[lib] = run(loaded, "bert")
    torch.testing.assert_close(heads["peftkit"], build("bert").classifier.bias.detach())
    torch.testing.assert_close(heads["peftkit"], heads["peft"])
    torch.testing.assert_close(outs["peftkit"], outs["peft"])
