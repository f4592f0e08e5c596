"""Bad input raises a clear error and leaves the model as it was."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import peftkit
from peftkit import LoraConfig, PeftConfig, PeftModel, get_peft_model


# --------------------------------------------------------------------------- helpers
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.act(self.fc1(self.emb(x).mean(1)))))


def mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().eval()


def llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


X = torch.tensor([[1, 2, 3], [4, 5, 0]])


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert sorted(after) == sorted(before), (sorted(set(after) - set(before)), sorted(set(before) - set(after)))
    for k, v in before.items():
        assert after[k].device.type != "meta", k
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, equal_nan=True, msg=lambda m, k=k: f"{k}: {m}")


def no_adapter_layers(model: nn.Module) -> bool:
    return not any(isinstance(m, (peftkit.AdapterLayer, peftkit.ModulesToSaveWrapper)) for m in model.modules())


def lora(**kw) -> LoraConfig:
    kw.setdefault("target_modules", ["fc1", "fc2"])
    kw.setdefault("init_lora_weights", False)
    return LoraConfig(**kw)


@pytest.fixture
def saved(tmp_path):
    """A LoRA adapter for MLP saved in tmp_path/ad; returns (folder, the PeftModel's output)."""
    torch.manual_seed(1)
    model = get_peft_model(mlp(), lora(r=4))
    model.save_pretrained(str(tmp_path / "ad"))
    with torch.no_grad():
        out = model(X)
    return str(tmp_path / "ad"), out


def _edit_config(folder: str, **changes) -> None:
    path = os.path.join(folder, "adapter_config.json")
    with open(path) as fh:
        cfg = json.load(fh)
    cfg.update(changes)
    with open(path, "w") as fh:
        json.dump(cfg, fh)


# --------------------------------------------------------------------------- target_modules
@pytest.mark.parametrize("targets", [["nope"], "nope.*", ["fc"], ["mlp.fc1"]], ids=str)
def test_target_modules_matching_nothing(targets):
    model = mlp()
    before = snapshot(model)
    with pytest.raises(ValueError) as exc:
        get_peft_model(model, lora(target_modules=targets))
    msg = str(exc.value)
    assert "fc1" in msg and "fc2" in msg  # names some modules that do exist
    assert_unchanged(model, before)
    assert no_adapter_layers(model)
    assert not hasattr(model, "peft_config")


def test_target_modules_matching_nothing_transformers():
    model = llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match="q_proj"):
        get_peft_model(model, LoraConfig(target_modules=["query", "value"]))
    assert_unchanged(model, before)
    assert no_adapter_layers(model)


def test_target_module_of_unsupported_type_changes_nothing():
    """fc1 is fine but norm (LayerNorm) is not: the error comes before fc1 is wrapped."""
    model = mlp()
    before = snapshot(model)
    with pytest.raises((TypeError, ValueError), match="norm"):
        get_peft_model(model, lora(target_modules=["fc1", "norm"]))
    assert_unchanged(model, before)
    assert no_adapter_layers(model)


def test_add_adapter_matching_nothing_keeps_existing_adapter():
    model = get_peft_model(mlp(), lora())
    before = snapshot(model)
    with pytest.raises(ValueError, match="fc1"):
        model.add_adapter("other", lora(target_modules=["missing"]))
    assert_unchanged(model, before)
    assert list(model.peft_config) == ["default"]
    assert model.active_adapter == "default"


def test_add_adapter_duplicate_name():
    model = get_peft_model(mlp(), lora())
    before = snapshot(model)
    with pytest.raises(ValueError, match="default"):
        model.add_adapter("default", lora(r=2))
    assert_unchanged(model, before)


# --------------------------------------------------------------------------- config files
def test_unknown_peft_type(saved):
    folder, _ = saved
    _edit_config(folder, peft_type="NOT_A_METHOD")
    with pytest.raises(ValueError, match="NOT_A_METHOD") as exc:
        PeftConfig.from_pretrained(folder)
    assert "LORA" in str(exc.value)  # names the methods that exist
    model = mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match="NOT_A_METHOD"):
        PeftModel.from_pretrained(model, folder)
    assert_unchanged(model, before)
    assert no_adapter_layers(model)


def test_adapter_for_another_architecture(saved):
    """The folder's target_modules (fc1, fc2) exist nowhere in the model it is loaded onto."""
    folder, _ = saved
    model = llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match="q_proj"):
        PeftModel.from_pretrained(model, folder)
    assert_unchanged(model, before)
    assert no_adapter_layers(model)


def test_load_adapter_existing_name_replaces_values(saved):
    """As in PEFT (and as Trainer's resume needs): the file's values go into the existing adapter, in place."""
    folder, out = saved
    model = get_peft_model(mlp(), lora(r=4))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            if "lora_" in name:
                p.add_(1.0)
        assert not torch.allclose(model(X), out)
    model.load_adapter(folder, adapter_name="default", is_trainable=True)
    assert all(p is params[n] for n, p in model.named_parameters())  # an optimizer keeps its parameters
    with torch.no_grad():
        torch.testing.assert_close(model(X), out)


def test_load_adapter_existing_name_other_shapes_keeps_model(saved):
    folder, _ = saved
    model = get_peft_model(mlp(), lora(r=8))
    before = snapshot(model)
    with pytest.raises(ValueError, match="do not fit"):
        model.load_adapter(folder, adapter_name="default")
    assert_unchanged(model, before)


def test_truncated_file_in_load_adapter_keeps_model(saved, tmp_path):
    folder, out = saved
    model = PeftModel.from_pretrained(mlp(), folder)
    before = snapshot(model)
    bad = str(tmp_path / "bad")
    model.save_pretrained(bad)
    path = os.path.join(bad, "adapter_model.safetensors")
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(data[:-16])
    with pytest.raises(Exception, match="adapter_model.safetensors"):
        model.load_adapter(bad, adapter_name="other")
    assert_unchanged(model, before)
    assert list(model.peft_config) == ["default"]


def test_missing_peft_type(saved):
    folder, _ = saved
    path = os.path.join(folder, "adapter_config.json")
    with open(path) as fh:
        cfg = json.load(fh)
    del cfg["peft_type"]
    with open(path, "w") as fh:
        json.dump(cfg, fh)
    with pytest.raises(ValueError, match="peft_type"):
        PeftConfig.from_pretrained(folder)


def test_unknown_peft_type_in_load_adapter_keeps_model(saved, tmp_path):
    folder, out = saved
    model = PeftModel.from_pretrained(mlp(), folder)
    before = snapshot(model)
    bad = str(tmp_path / "bad")
    model.save_pretrained(bad)
    _edit_config(bad, peft_type="NOT_A_METHOD")
    with pytest.raises(ValueError, match="NOT_A_METHOD"):
        model.load_adapter(bad, adapter_name="other")
    assert_unchanged(model, before)
    assert list(model.peft_config) == ["default"]


def test_extra_config_keys_warn_and_load(saved):
    folder, out = saved
    _edit_config(folder, some_future_option=True, another_new_field={"a": 1})
    with pytest.warns(UserWarning, match="some_future_option"):
        cfg = PeftConfig.from_pretrained(folder)
    assert isinstance(cfg, LoraConfig) and cfg.r == 4
    with pytest.warns(UserWarning, match="another_new_field"):
        model = PeftModel.from_pretrained(mlp(), folder)
    with torch.no_grad():
        torch.testing.assert_close(model(X), out)


def test_runtime_config_key_is_ignored_silently(saved):
    folder, _ = saved
    _edit_config(folder, runtime_config={"ephemeral_gpu_offload": False})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = PeftConfig.from_pretrained(folder)
    assert cfg.r == 4


def test_invalid_config_values():
    with pytest.raises(ValueError, match="bias"):
        LoraConfig(target_modules=["fc1"], bias="some")
    with pytest.raises(ValueError, match="r"):
        LoraConfig(target_modules=["fc1"], r=0)
    with pytest.raises(ValueError, match="task_type"):
        LoraConfig(target_modules=["fc1"], task_type="NOT_A_TASK")


# --------------------------------------------------------------------------- missing / bad weight files
def test_missing_folder(tmp_path):
    model = mlp()
    before = snapshot(model)
    with pytest.raises(FileNotFoundError):
        PeftModel.from_pretrained(model, str(tmp_path / "does_not_exist"))
    assert_unchanged(model, before)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    model = mlp()
    before = snapshot(model)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        PeftModel.from_pretrained(model, str(tmp_path / "empty"))
    assert_unchanged(model, before)
    assert no_adapter_layers(model)


def test_missing_weights_file(saved):
    folder, _ = saved
    os.remove(os.path.join(folder, "adapter_model.safetensors"))
    model = mlp()
    before = snapshot(model)
    with pytest.raises(FileNotFoundError, match="adapter_model"):
        PeftModel.from_pretrained(model, folder)
    assert_unchanged(model, before)
    assert no_adapter_layers(model)


def test_missing_subfolder_in_load_adapter(saved):
    folder, _ = saved
    model = PeftModel.from_pretrained(mlp(), folder)
    before = snapshot(model)
    with pytest.raises(FileNotFoundError):
        model.load_adapter(folder, adapter_name="other", subfolder="other")
    assert_unchanged(model, before)
    assert list(model.peft_config) == ["default"]


def _rewrite_weights(folder: str, change) -> None:
    path = os.path.join(folder, "adapter_model.safetensors")
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


BAD_KEY = "base_model.model.fc1.lora_A.weight"


def test_shape_mismatch_names_key(saved):
    folder, _ = saved
    _rewrite_weights(folder, lambda t: t.__setitem__(BAD_KEY, torch.zeros(3, 8)))
    model = mlp()
    before = snapshot(model)
    with pytest.raises((ValueError, RuntimeError)) as exc:
        PeftModel.from_pretrained(model, folder)
    assert BAD_KEY in str(exc.value) or "fc1.lora_A" in str(exc.value)
    assert "(3, 8)" in str(exc.value) or "[3, 8]" in str(exc.value)
    # the user's base model is left as it was: no adapter layers, nothing on the meta device
    assert_unchanged(model, before)
    assert no_adapter_layers(model)


def test_shape_mismatch_from_config_rank(saved):
    """The config says r=8 but the file holds r=4 tensors."""
    folder, _ = saved
    _edit_config(folder, r=8)
    with pytest.raises((ValueError, RuntimeError), match="lora_A"):
        PeftModel.from_pretrained(mlp(), folder)


def test_shape_mismatch_in_load_adapter_keeps_model(saved, tmp_path):
    folder, out = saved
    model = PeftModel.from_pretrained(mlp(), folder)
    before = snapshot(model)
    bad = str(tmp_path / "bad")
    model.save_pretrained(bad)
    _rewrite_weights(bad, lambda t: t.__setitem__(BAD_KEY, torch.zeros(3, 8)))
    with pytest.raises((ValueError, RuntimeError), match="fc1"):
        model.load_adapter(bad, adapter_name="other")
    assert_unchanged(model, before)
    assert list(model.peft_config) == ["default"]
    with torch.no_grad():
        torch.testing.assert_close(model(X), out)


def test_set_peft_model_state_dict_mismatch_changes_nothing(saved):
    folder, _ = saved
    model = PeftModel.from_pretrained(mlp(), folder)
    before = snapshot(model)
    state = peftkit.get_peft_model_state_dict(model)
    state = {k: v + 1 for k, v in state.items()}
    state["base_model.model.fc2.lora_B.weight"] = torch.zeros(5, 4)
    with pytest.raises(ValueError, match="fc2.lora_B"):
        peftkit.set_peft_model_state_dict(model, state)
    assert_unchanged(model, before)  # the good tensors were not written either


def test_unexpected_keys_in_file_warn(saved):
    folder, out = saved
    _rewrite_weights(folder, lambda t: t.__setitem__("base_model.model.nowhere.lora_A.weight", torch.zeros(4, 8)))
    with pytest.warns(UserWarning, match="nowhere"):
        model = PeftModel.from_pretrained(mlp(), folder)
    with torch.no_grad():
        torch.testing.assert_close(model(X), out)


def test_missing_keys_in_file_warn_and_leave_no_meta_tensors(saved):
    folder, _ = saved
    _rewrite_weights(folder, lambda t: [t.pop(k) for k in list(t) if ".fc2." in k])
    with pytest.warns(UserWarning, match="fc2"):
        model = PeftModel.from_pretrained(mlp(), folder)
    assert all(v.device.type != "meta" for v in model.state_dict().values())
    with torch.no_grad():
        assert torch.isfinite(model(X)).all()
    # fc1 got the file's values
    t = load_file(os.path.join(folder, "adapter_model.safetensors"))
    torch.testing.assert_close(model.base_model.model.fc1.lora_A["default"].weight, t["base_model.model.fc1.lora_A.weight"])


@pytest.mark.parametrize("keep", [0, 7, 100, -10], ids=["empty", "header_cut", "mid_header", "data_cut"])
def test_truncated_safetensors(saved, keep):
    folder, _ = saved
    path = os.path.join(folder, "adapter_model.safetensors")
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(data[:keep] if keep >= 0 else data[:keep])
    model = mlp()
    before = snapshot(model)
    with pytest.raises(Exception) as exc:
        PeftModel.from_pretrained(model, folder)
    assert not isinstance(exc.value, (KeyError, AttributeError, IndexError, TypeError))
    assert "adapter_model.safetensors" in str(exc.value)
    assert_unchanged(model, before)
    assert no_adapter_layers(model)


def test_truncated_bin(saved):
    folder, _ = saved
    os.remove(os.path.join(folder, "adapter_model.safetensors"))
    path = os.path.join(folder, "adapter_model.bin")
    torch.save({"base_model.model.fc1.lora_A.weight": torch.zeros(4, 8)}, path)
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])
    model = mlp()
    before = snapshot(model)
    with pytest.raises(Exception, match="adapter_model.bin"):
        PeftModel.from_pretrained(model, folder)
    assert_unchanged(model, before)


# --------------------------------------------------------------------------- safe merge
def _with_nan(lora_B_of: str = "fc2") -> PeftModel:
    torch.manual_seed(1)
    model = get_peft_model(mlp(), lora(r=4)).eval()
    layer = model.base_model.model.get_submodule(lora_B_of)
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    return model


@pytest.mark.parametrize("bad", ["fc1", "fc2"])
def test_safe_merge_and_unload_nan(bad):
    model = _with_nan(bad)
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaN|nan|inf"):
        model.merge_and_unload(safe_merge=True)
    assert_unchanged(model, before)
    assert not any(layer.merged for _, layer in model.base_model.adapter_layers())
    assert isinstance(model.base_model.model.fc1, peftkit.LoraLayer)  # still wrapped


@pytest.mark.parametrize("bad", ["fc1", "fc2"])
def test_safe_merge_adapter_nan(bad):
    model = _with_nan(bad)
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaN|nan|inf"):
        model.merge_adapter(safe_merge=True)
    assert_unchanged(model, before)
    assert not any(layer.merged for _, layer in model.base_model.adapter_layers())
    with torch.no_grad():
        out = model(X)
    assert torch.isnan(out).any()  # the adapter still runs unmerged, as it was


def test_safe_merge_nan_in_lora_bias():
    torch.manual_seed(1)
    model = get_peft_model(mlp(), lora(r=4, lora_bias=True)).eval()
    with torch.no_grad():
        model.base_model.model.fc1.lora_B["default"].bias[0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError):
        model.merge_and_unload(safe_merge=True)
    assert_unchanged(model, before)


def test_safe_merge_ignores_nan_in_inactive_adapter():
    """Only the adapters being merged are checked: a NaN in another adapter does not block the merge."""
    torch.manual_seed(1)
    model = get_peft_model(mlp(), lora(r=4)).eval()
    model.add_adapter("broken", lora(r=2))
    with torch.no_grad():
        model.base_model.model.fc1.lora_B["broken"].weight.fill_(float("nan"))
        expected = model(X)
    merged = model.merge_and_unload(safe_merge=True)
    with torch.no_grad():
        out = merged(X)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_safe_merge_succeeds_when_finite():
    torch.manual_seed(1)
    model = get_peft_model(mlp(), lora(r=4)).eval()
    with torch.no_grad():
        expected = model(X)
    merged = model.merge_and_unload(safe_merge=True)
    assert isinstance(merged, MLP)
    with torch.no_grad():
        torch.testing.assert_close(merged(X), expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- adapter names
def test_delete_unknown_adapter():
    model = get_peft_model(mlp(), lora())
    model.add_adapter("other", lora(r=2))
    before = snapshot(model)
    with pytest.raises(ValueError, match="nope"):
        model.delete_adapter("nope")
    assert_unchanged(model, before)
    assert list(model.peft_config) == ["default", "other"]
    assert model.active_adapter == "default"


def test_set_unknown_adapter():
    model = get_peft_model(mlp(), lora())
    before = snapshot(model)
    with pytest.raises(ValueError, match="nope"):
        model.set_adapter("nope")
    assert_unchanged(model, before)
    assert model.active_adapter == "default"


def test_merge_unknown_adapter():
    model = get_peft_model(mlp(), lora())
    before = snapshot(model)
    with pytest.raises(ValueError, match="nope"):
        model.merge_and_unload(adapter_names=["nope"])
    assert_unchanged(model, before)
    assert isinstance(model.base_model.model.fc1, peftkit.LoraLayer)


def test_save_unknown_selected_adapter(tmp_path):
    model = get_peft_model(mlp(), lora())
    with pytest.raises(ValueError, match="nope"):
        model.save_pretrained(str(tmp_path / "x"), selected_adapters=["nope"])
    assert not os.path.exists(tmp_path / "x" / "adapter_model.safetensors")


def test_save_into_a_file_path(tmp_path):
    model = get_peft_model(mlp(), lora())
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ValueError):
        model.save_pretrained(str(f))
    assert f.read_text() == "x"
