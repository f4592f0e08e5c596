"""Small models built from transformers configs, shared by tests (and the scripts they start) that need one."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A 2-layer Llama (hidden 32, 4 heads, 2 key/value heads, vocab 64), weights drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).to(dtype)
