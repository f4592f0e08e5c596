"""What LoHa and LoKr (the LyCORIS family) share: storage, scale, dropouts, conv shapes.

Both adapt nn.Linear, transformers Conv1D, nn.Conv1d and nn.Conv2d, scale their update by
``alpha / r``, and in training can skip the whole adapter (``module_dropout``) or drop output
features of the update (``rank_dropout``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..core.layer import AdapterLayer
from ..core.targeting import pattern_value


def rank_and_alpha(config: Any, key: str) -> dict[str, Any]:
    """The per-layer ``create`` arguments: rank and alpha after ``rank_pattern`` / ``alpha_pattern``."""
    return {
        "r": pattern_value(config.rank_pattern, key, config.r),
        "alpha": pattern_value(config.alpha_pattern, key, config.alpha),
    }


class LycorisLayer(AdapterLayer):
    """An ``AdapterLayer`` whose adapter attributes are ParameterDicts of plain factor tensors."""

    supported_kinds = ("linear", "conv")
    quantized_ok = True
    method_name: ClassVar[str] = ""

    def __init__(self, base_layer: nn.Module, ops: Any = None) -> None:
        super().__init__(base_layer, ops)
        if self.ops.kind == "conv" and self.ops.conv_dim not in (1, 2):
            raise TypeError(f"{self.method_name} adapts nn.Conv1d and nn.Conv2d, not {type(base_layer).__name__}.")
        for attr in self.adapter_attrs:
            setattr(self, attr, nn.ParameterDict())
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.module_dropout: dict[str, float] = {}

    @property
    def _kernel(self) -> tuple[int, ...]:
        return tuple(self.base_layer.kernel_size) if self.ops.kind == "conv" else ()

    @property
    def _groups(self) -> int:
        return getattr(self.base_layer, "groups", 1) if self.ops.kind == "conv" else 1

    def _record(self, adapter: str, config: Any, r: int, alpha: float) -> None:
        """Keep an adapter's rank, alpha, scale and dropouts."""
        self.r[adapter] = r
        self.alpha[adapter] = alpha
        self.scaling[adapter] = alpha / r
        self.rank_dropout[adapter] = float(config.rank_dropout)
        self.module_dropout[adapter] = float(config.module_dropout)

    def _check_rank(self, adapter: str, r: int) -> None:
        if r <= 0:
            raise ValueError(f"{self.method_name} rank must be positive, got r={r} for adapter {adapter!r}.")

    def set_scale(self, adapter: str, scale: float) -> None:
        """Scale an adapter's update by ``scale`` (on top of alpha / r)."""
        if adapter in self.scaling:
            self.scaling[adapter] = scale * self.alpha[adapter] / self.r[adapter]

    def _skip_module(self, adapter: str) -> bool:
        """In training, skip the whole adapter for this forward with probability ``module_dropout``.

        The draw happens even at probability 0, as in PEFT (same random stream), except under
        ``torch.compile``, where reading it back would break the graph in every layer.
        """
        if not self.training or (torch.compiler.is_compiling() and not self.module_dropout[adapter]):
            return False
        return not bool(torch.rand(1) > self.module_dropout[adapter])
