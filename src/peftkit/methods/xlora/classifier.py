"""The X-LoRA gate: a classifier from hidden states to per-token expert weights, and top-k selection."""

from __future__ import annotations

import torch
from torch import nn

from .config import XLoraConfig


class XLoraClassifier(nn.Module):
    """Hidden states (batch, seq, hidden) -> scalings (batch, seq, n_layers, n_experts).

    The module layout (``layers.0``, ``layers.3``, ...) is PEFT's, so classifier files move both
    ways. Without ``layerwise_scalings`` the classifier predicts one weight per expert and token,
    shared by every layer (returned as an expanded view, nothing copied per layer).
    """

    def __init__(
        self, config: XLoraConfig, n_experts: int, n_layers: int, dtype: torch.dtype, device: torch.device | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.n_classes = n_experts
        self.n_layers = n_layers
        self.scalings_logging = False
        self.log_scalings: list[torch.Tensor] = []
        out = n_experts * n_layers if config.layerwise_scalings else n_experts
        width = config.hidden_size
        blocks: list[nn.Module] = []
        for _ in range(config.xlora_depth - 1):
            blocks += [nn.Linear(width, config.xlora_size), nn.ReLU()]
            if config.xlora_dropout_p > 0:
                blocks.append(nn.Dropout(config.xlora_dropout_p))
            width = config.xlora_size
        blocks.append(nn.Linear(width, out))
        self.layers = nn.Sequential(*blocks).to(device=device, dtype=dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, seq = hidden.shape[:2]
        logits = self.layers(hidden.to(self.layers[0].weight.dtype))
        logits = logits.view(batch, seq, -1, self.n_classes)  # (b, s, n_layers or 1, n)
        if self.config.enable_softmax:
            logits = torch.softmax(logits / self.config.softmax_temperature, dim=-1)
        scalings = logits.expand(batch, seq, self.n_layers, self.n_classes)
        if self.scalings_logging:
            self.log_scalings.append(scalings)
        return scalings

    def bucketed_log(self) -> dict[int, tuple[list[int], list[torch.Tensor]]]:
        """The log grouped by sequence length: seq_len -> (positions in the log, scalings)."""
        buckets: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
        for i, s in enumerate(self.log_scalings):
            positions, tensors = buckets.setdefault(s.shape[1], ([], []))
            positions.append(i)
            tensors.append(s)
        return buckets


def expert_weights(scalings: torch.Tensor, top_k: int | None, softmax_topk: bool) -> torch.Tensor:
    """Keep each token's ``top_k`` experts (others 0); with ``softmax_topk`` renormalise the kept ones.

    A softmax over the non-zero entries only: a row with none left stays all zero.
    """
    w = scalings
    if top_k is not None and top_k < w.shape[-1]:
        keep = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, w.topk(top_k, dim=-1).indices, True)
        w = w * keep
    if softmax_topk:
        kept = w != 0
        w = torch.softmax(w.masked_fill(~kept, float("-inf")), dim=-1).masked_fill(~kept, 0.0)
    return w
