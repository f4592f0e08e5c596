"""Hub ids resolve through huggingface_hub's local cache, with no network."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch.testing import assert_close

import peftkit


def _fake_cache(cache, repo_id: str, folder) -> None:
    """Lay a saved adapter out as huggingface_hub's cache does for a downloaded repo."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    shutil.copytree(folder, repo / "snapshots" / rev)


def test_hub_id_loads_from_cache(tmp_path, monkeypatch):
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(4, 4))
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 4))
    fresh.load_state_dict(base.state_dict())
    model = peftkit.get_peft_model(base, peftkit.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "saved")
    _fake_cache(tmp_path / "hub", "someone/tiny-adapter", tmp_path / "saved")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    loaded = peftkit.PeftModel.from_pretrained(fresh, "someone/tiny-adapter")
    x = torch.randn(3, 4)
    assert_close(loaded(x), model(x))


def test_unknown_hub_id_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        peftkit.PeftConfig.from_pretrained("nobody/nothing-here")
