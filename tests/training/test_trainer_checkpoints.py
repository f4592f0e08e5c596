"""transformers.Trainer writes adapter-only checkpoints for peftkit models and resumes from them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file
from torch.testing import assert_close

from . import trainer_run

HERE = os.path.dirname(os.path.abspath(__file__))
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
FULL_WEIGHTS = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}


def check_run(out: str) -> None:
    checkpoint = os.path.join(out, "full", "checkpoint-3")
    files = set(os.listdir(checkpoint))
    assert ADAPTER_FILES <= files, files
    assert not files & FULL_WEIGHTS, files
    assert {"optimizer.pt", "scheduler.pt", "trainer_state.json"} <= files, files
    saved = load_file(os.path.join(checkpoint, "adapter_model.safetensors"))
    assert saved and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in saved), sorted(saved)[:4]

    full = load_file(os.path.join(out, "final-full", "adapter_model.safetensors"))
    resumed = load_file(os.path.join(out, "final-resumed", "adapter_model.safetensors"))
    at_3 = saved
    assert full.keys() == resumed.keys() == at_3.keys()
    assert any((full[k] - at_3[k]).abs().max() > 1e-4 for k in full)  # steps 4 and 5 changed the adapter
    for key in full:  # same adapter as the uninterrupted run: weights, optimizer and schedule all restored
        assert_close(resumed[key], full[key], rtol=1e-5, atol=1e-6)


def test_trainer_checkpoints_hold_adapter_only_and_resume(tmp_path):
    trainer_run.main(str(tmp_path))
    check_run(str(tmp_path))


@pytest.mark.parametrize("hide_peft", [True], ids=["without-peft"])
def test_same_without_peft_installed(tmp_path, hide_peft):
    """transformers' own PEFT checks all fail when peft is not installed; peftkit must not depend on them."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, os.path.join(HERE, "trainer_run.py"), str(tmp_path), "--hide-peft"]
    result = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    check_run(str(tmp_path))


def test_trainer_imported_after_the_model_is_patched_too():
    code = (
        "import sys, torch, peftkit\n"
        "from torch import nn\n"
        "m = peftkit.get_peft_model(nn.Sequential(nn.Linear(4, 4)), peftkit.LoraConfig(target_modules=['0']))\n"
        "assert 'transformers.trainer' not in sys.modules\n"
        "from transformers import Trainer\n"
        "from transformers import trainer, trainer_utils\n"
        "assert Trainer._save._peftkit_patched and trainer._is_peft_model(m) and trainer_utils._is_peft_model(m)\n"
        "assert not trainer._is_peft_model(nn.Linear(2, 2))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
