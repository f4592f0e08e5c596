"""OFT on the engine: ``base(x R)`` with ``R`` block-diagonal and orthogonal.

Each adapter keeps one ``OFTRotation`` (``oft_R[adapter].weight``: the packed strict upper
triangles of r skew-symmetric blocks, PEFT's layout). The blocks come from the Cayley transform
(exact, or PEFT's Neumann series) each time they are used, which costs r small products; the
rotation itself is applied by ``OrthogonalLayer``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from ...kernels.orthogonal import drop_blocks, packed_size
from ...types import PeftWarning
from ..orthogonal import OrthogonalLayer


class OFTRotation(nn.Module):
    """One adapter's parameters: ``weight`` (blocks, bs·(bs−1)/2), saved as ``oft_R.weight``."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def extra_repr(self) -> str:
        return f"blocks={self.weight.shape[0]}, packed={self.weight.shape[1]}"


def nearest_divisor(features: int, wanted: int) -> int:
    """The divisor of ``features`` closest to ``wanted`` (the smaller one on a tie; ``features`` if above)."""
    if wanted >= features:
        return features
    lower = next(d for d in range(wanted, 0, -1) if features % d == 0)
    upper = next(d for d in range(wanted, features + 1) if features % d == 0)
    return lower if wanted - lower <= upper - wanted else upper


class OFTLayer(OrthogonalLayer):
    """OFT on an nn.Linear, transformers Conv1D or nn.Conv1d/2d/3d base layer."""

    prefix = "oft_"
    adapter_attrs = ("oft_R", "oft_embedding_R")  # PEFT's names: the second for nn.Embedding
    supported_kinds = ("linear", "conv", "embedding")
    other_attrs = ("r", "oft_block_size", "block_share", "coft", "eps", "neumann_terms", "module_dropout")
    method_name = "OFT"

    def __init__(self, base_layer: nn.Module, ops: Any = None) -> None:
        super().__init__(base_layer, ops)
        self.oft_R = nn.ModuleDict()
        self.oft_embedding_R = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.oft_block_size: dict[str, int] = {}
        self.block_share: dict[str, bool] = {}
        self.coft: dict[str, bool] = {}
        self.eps: dict[str, float] = {}
        self.neumann_terms: dict[str, int | None] = {}
        self.module_dropout: dict[str, float] = {}

    def _blocks_of(self, config: Any) -> tuple[int, int]:
        """(r, block size) for this layer; a value that does not divide fan_in moves to the nearest divisor."""
        n = self.fan_in
        given, field = (config.r, "r") if config.r else (config.oft_block_size, "oft_block_size")
        value = nearest_divisor(n, given)
        if value != given:
            warnings.warn(
                f"OFT {field}={given} does not divide this layer's {n} input features "
                f"({type(self.base_layer).__name__}); using {field}={value}.",
                PeftWarning,
            )
        return (value, n // value) if field == "r" else (n // value, value)

    def create(self, adapter: str, config: Any, *, device: Any = None) -> None:
        r, bs = self._blocks_of(config)
        shape = (1 if config.block_share else r, packed_size(bs))
        device = torch.device(device if device is not None else self.base_layer.weight.device)
        dtype = self.adapter_dtype()
        if device.type == "meta" or config.init_weights:  # zeros: the identity rotation
            weight = torch.zeros(shape, device=device, dtype=dtype)
        else:
            weight = (torch.randn(shape) * 0.1).to(device=device, dtype=dtype)
        container = self.oft_embedding_R if self.ops.kind == "embedding" else self.oft_R
        container[adapter] = OFTRotation(weight)
        self.r[adapter] = r
        self.oft_block_size[adapter] = bs
        self.block_share[adapter] = bool(config.block_share)
        self.coft[adapter] = bool(config.coft)
        self.eps[adapter] = float(config.eps)
        self.neumann_terms[adapter] = config.num_cayley_neumann_terms if config.use_cayley_neumann else None
        self.module_dropout[adapter] = float(config.module_dropout)

    def _rot(self, adapter: str) -> OFTRotation:
        return (self.oft_embedding_R if self.ops.kind == "embedding" else self.oft_R)[adapter]

    def _project(self, adapter: str) -> None:
        """COFT: pull each block's skew matrix back to Frobenius norm ``eps / sqrt(blocks)``."""
        w = self._rot(adapter).weight
        radius = self.eps[adapter] / math.sqrt(w.shape[0])
        with torch.no_grad():
            norm = w.norm(dim=1, keepdim=True) * math.sqrt(2.0)  # a packed entry appears twice in Q
            w.mul_(torch.where(norm > radius, radius / norm, torch.ones_like(norm)))

    def rotation_source(self, adapter: str) -> tuple[tuple, torch.Tensor]:
        if self.coft[adapter]:
            self._project(adapter)
        return ("packed", self.oft_block_size[adapter], self.neumann_terms[adapter]), self._rot(adapter).weight

    def finish_rotation(self, adapter: str, blocks: torch.Tensor) -> tuple[torch.Tensor, list, bool]:
        blocks = blocks.unsqueeze(0)  # (1, r or 1, bs, bs): one factor, no permutation
        if self.training and self.module_dropout[adapter] > 0:
            blocks = drop_blocks(blocks, self.module_dropout[adapter])
        return blocks, [None], self.neumann_terms[adapter] is None
