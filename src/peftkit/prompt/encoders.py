"""The modules that produce virtual token embeddings: a table, or P-tuning's encoder over one.

Every encoder's ``forward()`` returns the (total_virtual_tokens, token_dim) prompt; that output
is what a file stores (``prompt_embeddings``), so a loaded adapter is always a ``PromptTable``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class PromptTable(nn.Module):
    """Prompt tuning's parameters: ``embedding.weight`` (total_virtual_tokens, token_dim)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.embedding = nn.Embedding(weight.shape[0], weight.shape[1], device="meta")
        self.embedding.weight = nn.Parameter(weight)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


class PromptEncoder(nn.Module):
    """P-tuning: a table passed through an MLP, or a bidirectional LSTM and an MLP."""

    def __init__(self, total: int, token_dim: int, config: Any) -> None:
        super().__init__()
        hidden = config.encoder_hidden_size or token_dim
        self.encoder_type = config.encoder_reparameterization_type
        self.embedding = nn.Embedding(total, token_dim)
        if self.encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(token_dim, hidden, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, token_dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(token_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, token_dim))

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight
        if self.encoder_type == "LSTM":
            x = self.lstm_head(x.unsqueeze(0))[0].squeeze(0)  # (total, 2·hidden)
        return self.mlp_head(x)


def initial_table(config: Any, word_embeddings: nn.Module, total: int, token_dim: int) -> torch.Tensor:
    """Prompt tuning's starting table for ``config.prompt_tuning_init`` (float32, on the embeddings' device)."""
    weight = word_embeddings.weight
    init = config.prompt_tuning_init
    # drawn first whatever the init, so a seed gives PEFT's tensors (it draws this table, then maybe overwrites it)
    table = nn.Embedding(total, token_dim).weight.detach().to(weight.device)
    if init == "RANDOM":
        return table
    if init == "SAMPLE_VOCAB":
        ids = torch.randint(0, word_embeddings.num_embeddings, (total,), dtype=torch.long).to(weight.device)
    else:  # TEXT
        from transformers import AutoTokenizer

        kwargs = dict(config.tokenizer_kwargs or {})
        kwargs.pop("trust_remote_code", None)
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
        text_ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
        if not text_ids:
            raise ValueError("prompt_tuning_init_text gives no tokens: give a non-empty text.")
        text_ids = (text_ids * math.ceil(total / len(text_ids)))[:total]
        ids = torch.tensor(text_ids, dtype=torch.long, device=weight.device)
    with torch.no_grad():
        return word_embeddings(ids).detach().clone().float()


class PrefixEncoder(nn.Module):
    """Prefix tuning: the (num_virtual_tokens, num_layers · 2 · token_dim) key/value prefixes,
    learned directly or as a table through a two-layer tanh MLP (``prefix_projection``)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        n, dim, width = config.num_virtual_tokens, config.token_dim, config.num_layers * 2 * config.token_dim
        self.prefix_projection = bool(config.prefix_projection)
        if self.prefix_projection:
            self.embedding = nn.Embedding(n, dim)
            hidden = config.encoder_hidden_size or dim
            self.transform = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
            last = self.transform[-1]
        else:
            self.embedding = nn.Embedding(n, width)
            last = self.embedding
        if config.init_weights == "zero":
            with torch.no_grad():
                for p in last.parameters():
                    p.zero_()

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight
        return self.transform(x) if self.prefix_projection else x
