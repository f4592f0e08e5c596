"""Less common layer shapes (non-square / strided Conv2d, Conv3d, strided Conv1d, tied embeddings), both ways."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

from _helpers import DIRECTION_IDS, DIRECTIONS, LIBS, load, make_peft_model, perturb_trainable, run, save, saved_shapes


class Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c2 = nn.Conv2d(3, 5, (3, 1), stride=(1, 2), padding=(1, 0))
        self.c3 = nn.Conv3d(5, 4, 2, bias=False)
        self.c1 = nn.Conv1d(4, 4, 5, stride=2, padding=2)
        self.e = nn.Embedding(11, 4)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        y = self.c2(x)
        z = self.c3(y.unsqueeze(2).expand(-1, -1, 2, -1, -1).contiguous()).flatten(2)
        return torch.cat([self.c1(z).flatten(1), self.e(ids).flatten(1)], 1)


def _base() -> Convs:
    torch.manual_seed(0)
    return Convs().eval()


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"x": torch.randn(2, 3, 8, 8, generator=g), "ids": torch.randint(0, 11, (2, 4), generator=g)}


def _peft_model(lib_name: str, **kw):
    lib = LIBS[lib_name]
    torch.manual_seed(1)
    cfg = lib.LoraConfig(target_modules=["c2", "c3", "c1", "e"], init_lora_weights=False, r=3, lora_alpha=5, **kw)
    model = lib.get_peft_model(_base(), cfg)
    perturb_trainable(model)
    return model.eval()


@pytest.mark.parametrize("src,dst", DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("kw", [{}, {"use_rslora": True, "rank_pattern": {"c3": 2}}], ids=["plain", "rslora-rank"])
def test_conv_shapes_round_trip_and_merge(src, dst, kw, tmp_path):
    model = _peft_model(src, **kw)
    x = _inputs()
    with torch.no_grad():
        expected = model(**x)
        base_out = _base()(**x)
    assert not torch.allclose(expected, base_out, atol=1e-4)
    model.save_pretrained(str(tmp_path / "ad"))
    merged = {}
    for lib in ("peft", "peftkit"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = LIBS[lib].PeftModel.from_pretrained(_base(), str(tmp_path / "ad")).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(**x), expected)
            merged[lib] = loaded.merge_and_unload()
            torch.testing.assert_close(merged[lib](**x), expected, rtol=1e-4, atol=1e-5)
    sa, sb = merged["peft"].state_dict(), merged["peftkit"].state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k])


def test_conv_shapes_same_keys(tmp_path):
    for lib in ("peft", "peftkit"):
        _peft_model(lib).save_pretrained(str(tmp_path / lib))
    assert saved_shapes(str(tmp_path / "peftkit")) == saved_shapes(str(tmp_path / "peft"))


@pytest.mark.parametrize("src,dst", DIRECTIONS, ids=DIRECTION_IDS)
def test_tied_embedding_target_gpt2(src, dst, tmp_path):
    """LoRA on GPT-2's wte (tied to lm_head): same outputs, same merged weights."""
    model = make_peft_model(src, "gpt2", target_modules=["wte", "c_attn"])
    save(model, str(tmp_path / "ad"))
    loaded = load(dst, "gpt2", str(tmp_path / "ad"))
    torch.testing.assert_close(run(loaded, "gpt2"), run(model, "gpt2"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ma = load("peft", "gpt2", str(tmp_path / "ad")).merge_and_unload()
        mb = load("peftkit", "gpt2", str(tmp_path / "ad")).merge_and_unload()
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k])


@pytest.mark.parametrize("lib", ["peft", "peftkit"])
def test_non_default_adapter_name_saved_in_subfolder(lib, tmp_path):
    """An adapter loaded under another name is saved into <dir>/<name>/ by both libraries."""
    model = make_peft_model("peft", "llama")
    save(model, str(tmp_path / "ad"))
    loaded = load(lib, "llama", str(tmp_path / "ad"), adapter_name="foo")
    assert loaded.active_adapter == "foo"
    save(loaded, str(tmp_path / "out"))
    files = {os.path.relpath(os.path.join(d, f), tmp_path / "out")
             for d, _, fs in os.walk(tmp_path / "out") for f in fs if not f.endswith(".md")}
    assert files == {os.path.join("foo", "adapter_config.json"), os.path.join("foo", "adapter_model.safetensors")}
    assert saved_shapes(str(tmp_path / "out" / "foo")) == saved_shapes(str(tmp_path / "ad"))
