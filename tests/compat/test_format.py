"""Both libraries write the same files for the same config: safetensors keys, shapes, and configs."""

from __future__ import annotations

import json
import os
import warnings

import peft
import pytest
import torch
from safetensors import safe_open

import peftkit
from _helpers import MODELS, HF_MODELS, add_adapter, make_peft_model, read_config, save, saved_shapes, saved_tensors

ALL_MODELS = HF_MODELS + ["custom"]

# (model, config overrides) pairs whose saved files are compared
VARIANTS = {
    "default": {},
    "bias_all": {"bias": "all"},
    "bias_lora_only": {"bias": "lora_only"},
    "lora_bias": {"lora_bias": True},
    "rslora": {"use_rslora": True},
    "patterns": {"rank_pattern": {"v": 2, "v_proj": 2, "value": 2, "c_fc": 2, "conv": 2},
                 "alpha_pattern": {"q": 3, "q_proj": 3, "query": 3, "c_attn": 3, "lin": 3}},
    "all_linear": {"target_modules": "all-linear"},
    "default_targets": {"target_modules": None},
    "layers": {"layers_to_transform": [1]},
    "modules_to_save": None,  # per model: MODULES_TO_SAVE
}
MODULES_TO_SAVE = {
    "llama": ["lm_head"],
    "gpt2": ["ln_f"],  # GPT-2's lm_head is tied to wte
    "bert": ["pooler"],  # contains a "dense" target, which it removes from the targets
    "t5": ["final_layer_norm"],  # two modules: encoder's and decoder's
    "custom": ["head"],
}


def _variant_params():
    out = []
    for name in ALL_MODELS:
        for variant, kw in VARIANTS.items():
            if name == "custom" and variant in ("all_linear", "default_targets", "layers"):
                continue  # not meaningful / no default targets for a custom model
            if name == "custom" and variant == "lora_bias":
                kw = {**kw, "target_modules": ["conv", "conv1d", "lin"]}  # no lora_bias on embeddings
            if variant == "modules_to_save":
                kw = {"modules_to_save": MODULES_TO_SAVE[name]}
            if name in ("llama", "gpt2", "bert", "t5") and variant == "layers":
                kw = {**kw, "layers_pattern": MODELS[name].layers_pattern}
            out.append(pytest.param(name, kw, id=f"{name}-{variant}"))
    return out


def _save_both(name, tmp_path, **kw):
    dirs = {}
    for lib in ("peft", "peftkit"):
        model = make_peft_model(lib, name, **kw)
        dirs[lib] = save(model, str(tmp_path / lib))
    return dirs


# ----------------------------------------------------------------------------- (c)
@pytest.mark.parametrize("name,kw", _variant_params())
def test_same_keys_and_shapes(name, kw, tmp_path):
    dirs = _save_both(name, tmp_path, **kw)
    a, b = saved_shapes(dirs["peft"]), saved_shapes(dirs["peftkit"])
    if kw.get("bias") == "all":
        # PEFT's bias="all" also picks up the biases inside its modules_to_save wrapper under their
        # in-memory paths (an artifact that loading ignores); FORMAT.md saves the head as head.bias.
        a = {k: v for k, v in a.items() if ".original_module." not in k and ".modules_to_save." not in k}
    only_peft = sorted(set(a) - set(b))
    only_kit = sorted(set(b) - set(a))
    assert not only_peft and not only_kit, f"keys only in peft: {only_peft}; only in peftkit: {only_kit}"
    assert a == b


@pytest.mark.parametrize("name", ALL_MODELS)
def test_safetensors_metadata_and_dtypes(name, tmp_path):
    dirs = _save_both(name, tmp_path)
    metas, dtypes = {}, {}
    for lib, d in dirs.items():
        with safe_open(os.path.join(d, "adapter_model.safetensors"), framework="pt") as fh:
            metas[lib] = fh.metadata()
            dtypes[lib] = {k: fh.get_slice(k).get_dtype() for k in fh.keys()}
    assert metas["peftkit"] == metas["peft"] == {"format": "pt"}
    assert dtypes["peftkit"] == dtypes["peft"]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_several_adapters_same_layout(name, tmp_path):
    for lib in ("peft", "peftkit"):
        model = make_peft_model(lib, name)
        add_adapter(model, lib, name, "other", r=2)
        save(model, str(tmp_path / lib))
    for sub in ("", "other"):
        assert saved_shapes(str(tmp_path / "peftkit" / sub)) == saved_shapes(str(tmp_path / "peft" / sub))


# ----------------------------------------------------------------------------- (d)
def _unknown_key_warnings(record) -> list[str]:
    msgs = [str(w.message) for w in record]
    return [m for m in msgs if "unknown" in m.lower() or "unexpected" in m.lower() or "ignor" in m.lower()]


@pytest.mark.parametrize("name,kw", [p for p in _variant_params() if p.id.split("-", 1)[1] in
                                     ("default", "patterns", "layers", "all_linear", "modules_to_save", "bias_all")])
def test_configs_load_both_ways(name, kw, tmp_path):
    dirs = _save_both(name, tmp_path, **kw)

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        in_peft = peft.PeftConfig.from_pretrained(dirs["peftkit"])
    assert isinstance(in_peft, peft.LoraConfig)
    assert not _unknown_key_warnings(rec), _unknown_key_warnings(rec)

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        in_kit = peftkit.PeftConfig.from_pretrained(dirs["peft"])
    assert isinstance(in_kit, peftkit.LoraConfig)
    assert not _unknown_key_warnings(rec), _unknown_key_warnings(rec)

    kit_own = peftkit.PeftConfig.from_pretrained(dirs["peftkit"])
    peft_own = peft.PeftConfig.from_pretrained(dirs["peft"])
    fields = ["peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias", "use_rslora", "fan_in_fan_out",
              "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
              "lora_bias", "inference_mode", "base_model_name_or_path"]
    for f in fields:
        norm = lambda v: getattr(v, "value", v)  # noqa: E731  (enum -> str)
        assert norm(getattr(in_peft, f)) == norm(getattr(peft_own, f)), f
        assert norm(getattr(in_kit, f)) == norm(getattr(kit_own, f)), f
        assert norm(getattr(kit_own, f)) == norm(getattr(peft_own, f)), f
    ms = lambda c: sorted(c.modules_to_save or [])  # noqa: E731
    assert ms(in_peft) == ms(kit_own) and ms(in_kit) == ms(peft_own) and ms(kit_own) == ms(peft_own)
    if not (isinstance(kw.get("target_modules"), str)):  # "all-linear" is stored expanded, each library its way
        tm = lambda c: c.target_modules if isinstance(c.target_modules, str) else sorted(c.target_modules)  # noqa: E731
        assert tm(in_peft) == tm(kit_own) and tm(in_kit) == tm(peft_own) and tm(kit_own) == tm(peft_own)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_config_json_layout(name, tmp_path):
    """peftkit writes every key PEFT writes (sorted, indented, inference_mode true) and no key PEFT lacks."""
    dirs = _save_both(name, tmp_path)
    a, b = read_config(dirs["peft"]), read_config(dirs["peftkit"])
    assert set(b) - set(a) == set(), f"keys only peftkit writes: {sorted(set(b) - set(a))}"
    # keys peftkit may leave out: only PEFT bookkeeping that loading ignores
    assert set(a) - set(b) <= {"runtime_config"}, f"keys peftkit does not write: {sorted(set(a) - set(b))}"
    assert b["peft_type"] == "LORA" and b["inference_mode"] is True
    assert b["task_type"] == a["task_type"]
    with open(os.path.join(dirs["peftkit"], "adapter_config.json"), encoding="utf-8") as fh:
        text = fh.read()
    assert text.strip() == json.dumps(b, indent=2, sort_keys=True)
    if name == "custom":  # no task_type: auto_mapping records the base class
        assert b["auto_mapping"] is not None and b["auto_mapping"]["base_model_class"] == "Custom"
        assert set(b["auto_mapping"]) == set(a["auto_mapping"])
    else:
        assert b["auto_mapping"] is None and a["auto_mapping"] is None


@pytest.mark.parametrize("src,dst", [("peft", "peftkit"), ("peftkit", "peft")], ids=["peft_to_peftkit", "peftkit_to_peft"])
def test_config_round_trip_through_save(src, dst, tmp_path):
    """A config loaded by one library and saved again by the other keeps its values."""
    libs = {"peft": peft, "peftkit": peftkit}
    cfg = libs[src].LoraConfig(
        r=6, lora_alpha=12, target_modules=["q_proj", "v_proj"], exclude_modules=["lm_head"], lora_dropout=0.1,
        bias="lora_only", use_rslora=True, layers_to_transform=[0, 1], layers_pattern="layers",
        rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 5}, task_type="CAUSAL_LM",
        modules_to_save=["lm_head"], init_lora_weights="gaussian",
    )
    cfg.save_pretrained(str(tmp_path / "a"))
    loaded = libs[dst].PeftConfig.from_pretrained(str(tmp_path / "a"))
    loaded.save_pretrained(str(tmp_path / "b"))
    again = libs[src].PeftConfig.from_pretrained(str(tmp_path / "b"))
    first = read_config(str(tmp_path / "a"))
    second = read_config(str(tmp_path / "b"))
    for k in ("r", "lora_alpha", "target_modules", "exclude_modules", "lora_dropout", "bias", "use_rslora",
              "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "task_type",
              "modules_to_save", "init_lora_weights", "peft_type"):
        va, vb = first[k], second[k]
        if isinstance(va, list):
            va, vb = sorted(va), sorted(vb)
        assert va == vb, k
    assert again.r == 6 and sorted(again.target_modules) == ["q_proj", "v_proj"]


@pytest.mark.parametrize("lib", ["peft", "peftkit"])
@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_seq_cls_head_bias_saved_is_the_trained_copy(lib, bias, tmp_path):
    """With modules_to_save, ``classifier.bias`` in the file is the trained copy's bias, whatever the bias mode."""
    model = make_peft_model(lib, "bert", bias=bias)
    wrapper = model.base_model.model.classifier
    save(model, str(tmp_path / "ad"))
    t = saved_tensors(str(tmp_path / "ad"))
    torch.testing.assert_close(t["base_model.model.classifier.bias"], wrapper.modules_to_save["default"].bias)
    torch.testing.assert_close(t["base_model.model.classifier.weight"], wrapper.modules_to_save["default"].weight)


def test_embedding_layer_targets_save_same_keys(tmp_path):
    """Targeting embed_tokens / lm_head: PEFT (save_embedding_layers="auto") also saves their base weights,
    so that an adapter trained on a resized vocabulary carries it; the files must match."""
    dirs = _save_both("llama", tmp_path, target_modules=["embed_tokens", "lm_head", "q_proj"])
    a, b = saved_shapes(dirs["peft"]), saved_shapes(dirs["peftkit"])
    assert sorted(set(a) - set(b)) == [] and sorted(set(b) - set(a)) == []
