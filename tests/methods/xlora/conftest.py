"""Tiny Llama models and trained-looking LoRA experts (saved by peftkit) for the X-LoRA tests."""

import os
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit

torch.set_num_threads(1)

CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
# name -> LoraConfig kwargs: different ranks, targets (some layers hold only some experts),
# an embedding target and a lora_bias expert
EXPERTS = {
    "0": dict(r=4, target_modules=["q_proj", "v_proj"]),
    "1": dict(r=2, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"], lora_bias=True),
    "2": dict(r=3, target_modules=["embed_tokens", "up_proj", "v_proj"]),
}


def make_base(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    return model.eval()


@pytest.fixture(scope="session")
def expert_dir(tmp_path_factory):
    """A folder with one saved LoRA adapter per entry of EXPERTS (random, non-zero B)."""
    root = tmp_path_factory.mktemp("experts")
    for i, (name, kw) in enumerate(EXPERTS.items()):
        torch.manual_seed(100 + i)
        model = peftkit.get_peft_model(make_base(), peftkit.LoraConfig(init_lora_weights=False, **kw))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(str(root / f"expert_{name}"))
    return root


@pytest.fixture
def experts(expert_dir):
    """name -> folder for the given expert names (default: the first two)."""

    def pick(*names):
        return {n: str(expert_dir / f"expert_{n}") for n in (names or ("0", "1"))}

    return pick


@pytest.fixture
def ids():
    return torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(7))
