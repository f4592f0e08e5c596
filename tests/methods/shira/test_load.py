"""Loading SHiRA files: any entry order, file-sized entry counts, and clear errors for broken files."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch.testing import assert_close

import peftkit

from .helpers import build, make, run, save, saved_tensors, shira_layers

NAME = "llama"
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def _rewrite(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = saved_tensors(str(src))
    edit(tensors)
    save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    return dst


def test_entries_in_any_order_load_and_merge_exactly(tmp_path):
    model = make("peftkit", NAME)
    expected = run(model, NAME)
    save(model, tmp_path / "a")

    def shuffle(t):
        for key in [k for k in t if k.endswith("shira_indices")]:
            perm = torch.randperm(t[key].shape[1], generator=torch.Generator().manual_seed(len(key)))
            t[key] = t[key][:, perm].contiguous()
            vkey = key[: -len("indices")] + "weight"
            t[vkey] = t[vkey][perm].contiguous()

    path = _rewrite(tmp_path / "a", tmp_path / "shuffled", shuffle)
    loaded = peftkit.PeftModel.from_pretrained(build(NAME), str(path)).eval()
    assert_close(run(loaded, NAME), expected)
    before = {k: v.clone() for k, v in loaded.get_base_model().state_dict().items()}
    loaded.merge_adapter()
    assert_close(run(loaded, NAME), expected, atol=1e-5, rtol=1e-5)
    loaded.unmerge_adapter()
    assert all(torch.equal(v, before[k]) for k, v in loaded.get_base_model().state_dict().items())
    for key, layer in shira_layers(loaded).items():  # the dense delta does not depend on the order
        assert torch.equal(layer.get_delta_weight("default"), shira_layers(model)[key].get_delta_weight("default"))


def test_fewer_entries_than_r_allows(tmp_path):
    """Files decide each layer's entry count (a pruned or combined adapter)."""
    model = make("peftkit", NAME)
    save(model, tmp_path / "a")

    def prune(t):
        t[Q0 + ".shira_indices"] = t[Q0 + ".shira_indices"][:, :5].contiguous()
        t[Q0 + ".shira_weight"] = t[Q0 + ".shira_weight"][:5].contiguous()

    path = _rewrite(tmp_path / "a", tmp_path / "pruned", prune)
    loaded = peftkit.PeftModel.from_pretrained(build(NAME), str(path), is_trainable=True)
    q0 = shira_layers(loaded)["model.layers.0.self_attn.q_proj"]
    assert q0.shira_weight["default"].shape == (5,) and q0.shira_indices["default"].shape == (2, 5)
    assert q0.shira_weight["default"].requires_grad
    ids = torch.randint(3, 60, (1, 4))
    loaded(input_ids=ids, labels=ids).loss.backward()
    assert q0.shira_weight["default"].grad.shape == (5,)


def _out_of_range(t):
    t[Q0 + ".shira_indices"][1, 0] = 16


def _negative(t):
    t[Q0 + ".shira_indices"][0, 3] = -1


def _three_rows(t):
    t[Q0 + ".shira_indices"] = torch.cat([t[Q0 + ".shira_indices"], t[Q0 + ".shira_indices"][:1]])


def _count_mismatch(t):
    t[Q0 + ".shira_weight"] = t[Q0 + ".shira_weight"][:-1].contiguous()


def _no_values(t):
    del t[Q0 + ".shira_weight"]


def _no_positions(t):
    del t[Q0 + ".shira_indices"]


BROKEN = [
    (_out_of_range, r"positions of .*q_proj fall outside its weight \(16, 16\)"),
    (_negative, "fall outside"),
    (_three_rows, r"do not fit together: shira_indices \(3, 64\) must be \(2, n\) for shira_weight \(64,\)"),
    (_count_mismatch, "do not fit together"),
    (_no_values, "has positions but no values"),
    (_no_positions, "has values but no positions"),
]


@pytest.mark.parametrize("edit,match", BROKEN, ids=[f.__name__.strip("_") for f, _ in BROKEN])
def test_broken_files_raise_and_leave_the_model_unchanged(edit, match, tmp_path):
    save(make("peftkit", NAME), tmp_path / "a")
    path = _rewrite(tmp_path / "a", tmp_path / "broken", edit)
    base = build(NAME)
    modules = [n for n, _ in base.named_modules()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=match):
            peftkit.PeftModel.from_pretrained(base, str(path))
    assert [n for n, _ in base.named_modules()] == modules
    assert not hasattr(base, "peft_config")
    # load_adapter into a working model: the model keeps only what it had
    model = make("peftkit", NAME)
    expected = run(model, NAME)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=match):
            model.load_adapter(str(path), adapter_name="broken")
    assert list(model.peft_config) == ["default"]
    assert all(layer.adapters == ["default"] for layer in shira_layers(model).values())
    assert "broken" not in shira_layers(model)["model.layers.0.self_attn.q_proj"].shira_indices
    assert_close(run(model, NAME), expected)
