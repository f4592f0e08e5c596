"""Tiny models shared by the LoRA method tests."""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


class MixedNet(nn.Module):
    """An embedding, a conv and a linear layer: every base-layer kind in one model."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.lin = nn.Linear(8, 6)

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        return self.lin(self.emb(ids)).sum(1) + self.lin(self.conv(img).mean((2, 3)))


def llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=50)
    return LlamaForCausalLM(cfg).eval()


def gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, bos_token_id=0, eos_token_id=0)).eval()


def mixed(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MixedNet().eval()


IDS = torch.arange(12).view(2, 6)
IMG = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))

# name -> (builder, LoRA targets, forward returning a tensor)
MODELS = {
    "llama": (llama, ["q_proj", "v_proj", "down_proj"], lambda m: m(input_ids=IDS).logits),
    "gpt2": (gpt2, ["c_attn", "c_fc"], lambda m: m(input_ids=IDS).logits),
    "mixed": (mixed, ["emb", "conv", "lin"], lambda m: m(IDS[:, :5] % 20, IMG)),
}
