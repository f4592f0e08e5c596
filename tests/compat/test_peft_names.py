"""PEFT's remaining top-level helpers under the same names: base-model state dicts, config from a dict,
the error classes and the lookup tables, each checked against PEFT itself."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch

import peftkit

from _helpers import LIBS, build, snapshot

# (method, config kwargs, task) for the base-model state-dict checks
CASES = {
    "lora": ("LoraConfig", {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    "lora_modules_to_save": ("LoraConfig", {"r": 4, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}),
    "dora": ("LoraConfig", {"r": 4, "target_modules": ["q_proj", "up_proj"], "use_dora": True}),
    "loha": ("LoHaConfig", {"r": 2, "target_modules": ["k_proj", "o_proj"]}),
    "ia3": ("IA3Config", {"target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]}),
    "shira": ("ShiraConfig", {"r": 1, "target_modules": ["q_proj", "gate_proj"], "random_seed": 3}),
    "prompt_tuning": ("PromptTuningConfig", {"num_virtual_tokens": 3, "task_type": "CAUSAL_LM"}),
}


def _wrapped(lib_name: str, case: str):
    cls_name, kwargs = CASES[case]
    lib = LIBS[lib_name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lib.get_peft_model(build("llama"), getattr(lib, cls_name)(**kwargs))


@pytest.mark.parametrize("case", list(CASES))
def test_base_model_state_dict_equals_peft_and_the_plain_model(case):
    plain = build("llama").state_dict()
    ours = peftkit.get_base_model_state_dict(_wrapped("peftkit", case))
    theirs = peft.get_base_model_state_dict(_wrapped("peft", case))
    assert list(ours) == list(theirs) == list(plain)
    assert all(torch.equal(ours[k], plain[k]) and torch.equal(theirs[k], plain[k]) for k in plain)


@pytest.mark.parametrize("case", ["lora", "lora_modules_to_save", "shira", "prompt_tuning"])
def test_set_base_model_state_dict_loads_like_peft(case):
    new_base = build("llama", seed=7).state_dict()
    models = {lib: _wrapped(lib, case) for lib in LIBS}
    adapters_before = {lib: {k: v.clone() for k, v in peftkit.get_peft_model_state_dict(m).items()}
                       for lib, m in [("peftkit", models["peftkit"])]}
    out_ours = peftkit.set_base_model_state_dict(models["peftkit"], new_base)
    out_theirs = peft.set_base_model_state_dict(models["peft"], new_base)
    assert (list(out_ours.missing_keys), list(out_ours.unexpected_keys)) == (
        list(out_theirs.missing_keys), list(out_theirs.unexpected_keys)) == ([], [])
    for lib, m in models.items():
        got = LIBS[lib].get_base_model_state_dict(m)
        assert all(torch.equal(got[k], new_base[k]) for k in new_base), lib
    after = peftkit.get_peft_model_state_dict(models["peftkit"])
    assert all(torch.equal(after[k], v) for k, v in adapters_before["peftkit"].items())  # adapters untouched


def test_set_base_model_state_dict_strict_errors_leave_the_model_unchanged():
    model = _wrapped("peftkit", "lora_modules_to_save")
    before = snapshot(model)
    partial = build("llama", seed=7).state_dict()
    dropped = next(iter(partial))
    del partial[dropped]
    partial["not.a.key"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="nothing was loaded") as err:
        peftkit.set_base_model_state_dict(model, partial)
    assert dropped in str(err.value) and "not.a.key" in str(err.value)
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)

    theirs = peft.set_base_model_state_dict(_wrapped("peft", "lora_modules_to_save"), partial, strict=False)
    ours = peftkit.set_base_model_state_dict(model, partial, strict=False)
    assert (list(ours.missing_keys), list(ours.unexpected_keys)) == (
        list(theirs.missing_keys), list(theirs.unexpected_keys)) == ([dropped], ["not.a.key"])


def test_no_match_error_classes():
    cfg = peftkit.LoraConfig(target_modules=["nope"])
    with pytest.raises(peftkit.NoMatchingPeftModuleError, match="matched no module") as err:
        peftkit.get_peft_model(build("llama"), cfg)
    assert isinstance(err.value, ValueError) and isinstance(err.value, peftkit.PeftError)
    with pytest.raises(peft.NoMatchingPeftModuleError):  # the oracle raises its class of the same name
        peft.get_peft_model(build("llama"), peft.LoraConfig(target_modules=["nope"]))


@pytest.mark.parametrize("config", [
    {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"},
    {"peft_type": "IA3", "target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
    {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 5, "task_type": "CAUSAL_LM"},
])
def test_get_peft_config_matches_peft(config):
    ours, theirs = peftkit.get_peft_config(dict(config)), peft.get_peft_config(dict(config))
    assert type(ours).__name__ == type(theirs).__name__
    for key, value in config.items():
        mine, other = getattr(ours, key), getattr(theirs, key)
        norm = (lambda v: sorted(v) if isinstance(v, (set, list)) else str(getattr(v, "value", v)))
        assert norm(mine) == norm(other) == norm(value), key


def test_lookup_tables_name_peft_classes():
    ours, theirs = peftkit.PEFT_TYPE_TO_CONFIG_MAPPING, peft.PEFT_TYPE_TO_CONFIG_MAPPING
    assert len(ours) >= 12
    for peft_type, cls in ours.items():
        assert theirs[peft.PeftType(str(getattr(peft_type, "value", peft_type)))].__name__ == cls.__name__
        assert ours[str(getattr(peft_type, "value", peft_type))] is cls  # str keys work, as with PEFT's enum
    assert set(peftkit.PEFT_TYPE_TO_TUNER_MAPPING) == set(ours)
    assert {k: v.__name__ for k, v in peftkit.MODEL_TYPE_TO_PEFT_MODEL_MAPPING.items()} == {
        k: v.__name__ for k, v in peft.MODEL_TYPE_TO_PEFT_MODEL_MAPPING.items()}
    from peftkit.mapping import PEFT_TYPE_TO_CONFIG_MAPPING  # also where PEFT keeps it

    assert PEFT_TYPE_TO_CONFIG_MAPPING is ours  # one table, wherever it is imported from


def test_tuners_import_paths():
    """``peftkit.tuners.<method>`` offers PEFT's names (each one PEFT has there too), and isinstance works."""
    import importlib

    from peftkit.tuners import _MODULES
    from peftkit.tuners.lora import LoraLayer, LoraModel
    from peftkit.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists

    for name, members in _MODULES.items():
        ours, theirs = importlib.import_module(f"peftkit.tuners.{name}"), importlib.import_module(f"peft.tuners.{name}")
        for member in members:
            assert hasattr(ours, member) and hasattr(theirs, member), (name, member)
    model = _wrapped("peftkit", "lora")
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoraLayer) and isinstance(q, BaseTunerLayer) and isinstance(model.base_model, LoraModel)
    assert not isinstance(model.base_model.model.model.layers[0].self_attn.k_proj, BaseTunerLayer)
    cfg = peftkit.LoraConfig(target_modules=["q_proj"])
    assert check_target_module_exists(cfg, "model.layers.0.self_attn.q_proj")
    assert not check_target_module_exists(cfg, "model.layers.0.self_attn.k_proj")


def test_utils_names_are_peft_names():
    import peft.utils

    import peftkit.utils

    for name in peftkit.utils.__all__:
        assert hasattr(peft.utils, name), name
    for name in ("CONFIG_NAME", "SAFETENSORS_WEIGHTS_NAME", "WEIGHTS_NAME"):
        assert getattr(peftkit.utils, name) == getattr(peft.utils, name)


def _two_adapters(lib_name: str):
    lib = LIBS[lib_name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.get_peft_model(build("llama"), lib.LoraConfig(r=2, target_modules=["q_proj"],
                                                                  modules_to_save=["lm_head"]))
        model.add_adapter("other", lib.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    return model


def _trainable(model) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_set_requires_grad_matches_peft():
    models = {lib: _two_adapters(lib) for lib in LIBS}
    steps = [(["other"], True), ("default", False), (["default", "other"], True), ("other", False)]
    for names, flag in steps:
        for m in models.values():
            m.set_requires_grad(names, requires_grad=flag)
        assert _trainable(models["peftkit"]) == _trainable(models["peft"]), (names, flag)
    with pytest.raises(ValueError, match="Unknown adapter"):
        models["peftkit"].set_requires_grad("nope")
    prompt = _wrapped("peftkit", "prompt_tuning")
    with pytest.raises(TypeError, match="prompt learning"):
        prompt.set_requires_grad("default")


def test_small_peft_model_properties():
    for case in ("lora", "prompt_tuning"):
        ours, theirs = _wrapped("peftkit", case), _wrapped("peft", case)
        assert type(ours.active_peft_config).__name__ == type(theirs.active_peft_config).__name__
        assert ours.base_model_torch_dtype == theirs.base_model_torch_dtype == torch.float32
    half = peftkit.get_peft_model(build("llama").to(torch.bfloat16), peftkit.LoraConfig(target_modules=["q_proj"]))
    assert half.base_model_torch_dtype == torch.bfloat16


def test_prepare_model_for_gradient_checkpointing():
    model = _wrapped("peftkit", "lora")
    base = model.get_base_model()
    ids = torch.randint(0, 64, (2, 5))
    assert not base.get_input_embeddings()(ids).requires_grad
    assert model.prepare_model_for_gradient_checkpointing(base) is base  # checkpointing off: nothing to do
    assert not base.get_input_embeddings()(ids).requires_grad
    base.gradient_checkpointing_enable()
    model.prepare_model_for_gradient_checkpointing(base)
    assert base.get_input_embeddings()(ids).requires_grad


def test_push_to_hub_uploads_what_save_pretrained_writes(monkeypatch, tmp_path):
    """No network: the Hub client is replaced by one that records the calls and copies the folder."""
    import shutil
    from types import SimpleNamespace

    import huggingface_hub

    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls["repo"] = (repo_id, private, exist_ok)
            return SimpleNamespace(repo_id=repo_id)

        def upload_folder(self, **kw):
            calls["upload"] = {k: v for k, v in kw.items() if k != "folder_path"}
            shutil.copytree(kw["folder_path"], tmp_path / "uploaded")
            return "commit-info"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model = _wrapped("peftkit", "lora")
    out = model.push_to_hub("me/adapter", private=True, token="t0k", commit_message="first")
    assert out == "commit-info" and calls["token"] == "t0k" and calls["repo"] == ("me/adapter", True, True)
    assert calls["upload"]["repo_id"] == "me/adapter" and calls["upload"]["commit_message"] == "first"
    model.save_pretrained(tmp_path / "local")
    assert sorted(p.name for p in (tmp_path / "uploaded").iterdir()) == sorted(p.name for p in (tmp_path / "local").iterdir())
    loaded = peftkit.PeftModel.from_pretrained(build("llama"), str(tmp_path / "uploaded"))
    assert all(torch.equal(a, b) for a, b in zip(peftkit.get_peft_model_state_dict(loaded).values(),
                                                 peftkit.get_peft_model_state_dict(model).values()))
