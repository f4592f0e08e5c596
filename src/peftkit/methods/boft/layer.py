"""BOFT on the engine: ``s ⊙ (base(x M) − b) + b`` with ``M`` a product of butterfly factors.

Each adapter keeps ``boft_R`` (n_factors, blocks, bs, bs) — full blocks whose skew-symmetric
part goes through the exact Cayley transform — and ``boft_s``, the output scale ((out, 1), or
(1, out) for a convolution: PEFT's shapes). The butterfly permutations are index vectors, made
once per layer shape; the rotation is applied by ``OrthogonalLayer`` with gathers and batched
``bs × bs`` products, for any butterfly factor, on any device.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from ...kernels.orthogonal import butterfly_perms, drop_blocks
from ...types import PeftWarning
from ..orthogonal import OrthogonalLayer


class BOFTLayer(OrthogonalLayer):
    """BOFT on an nn.Linear, transformers Conv1D or nn.Conv1d/2d/3d base layer."""

    prefix = "boft_"
    adapter_attrs = ("boft_R", "boft_s")
    other_attrs = ("boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "boft_dropout")
    # A PEFT adapter trained without its CUDA extension holds one factor whatever its config says.
    file_sized_attrs = ("boft_R",)
    method_name = "BOFT"

    def __init__(self, base_layer: nn.Module, ops: Any = None) -> None:
        super().__init__(base_layer, ops)
        self.boft_R = nn.ParameterDict()
        self.boft_s = nn.ParameterDict()
        self.boft_block_size: dict[str, int] = {}
        self.boft_block_num: dict[str, int] = {}
        self.boft_n_butterfly_factor: dict[str, int] = {}
        self.boft_dropout: dict[str, float] = {}
        self._perms: dict[tuple[int, int], list] = {}

    # ------------------------------------------------------------------ create
    def _blocks_of(self, config: Any) -> tuple[int, int]:
        """(block count, block size) for this layer, or a ValueError that says what to change."""
        n, factor = self.fan_in, config.boft_n_butterfly_factor
        where = f"{type(self.base_layer).__name__} with {n} input features"
        if config.boft_block_num:
            num = config.boft_block_num
            if n % num:
                raise ValueError(f"BOFT boft_block_num={num} does not divide the {where}: "
                                 f"use a divisor of {n} (or set boft_block_size instead).")
            size = n // num
        else:
            size = config.boft_block_size
            if n % size:
                raise ValueError(f"BOFT boft_block_size={size} does not divide the {where}: "
                                 f"use a divisor of {n} (or set boft_block_num instead).")
            num = n // size
        if factor > 1:
            span = 2 ** (factor - 1)  # blocks a butterfly chunk of the last factor spans
            if num % 2 or size % 2:
                raise ValueError(f"BOFT with boft_n_butterfly_factor={factor} needs an even block count and block "
                                 f"size; the {where} gets {num} blocks of {size}: change the block setting or "
                                 "use boft_n_butterfly_factor=1.")
            if num % span:
                most = int(math.log2(num & -num)) + 1  # the largest factor whose span divides num
                raise ValueError(f"BOFT boft_n_butterfly_factor={factor} is too large for the {num} blocks of the "
                                 f"{where}: the block count must be a multiple of 2^(factor-1) = {span}; "
                                 f"use boft_n_butterfly_factor <= {most} or fewer, larger blocks.")
        return num, size

    def _scale_shape(self) -> tuple[int, int]:
        return (1, self.out_features) if self.ops.kind == "conv" else (self.out_features, 1)

    def create(self, adapter: str, config: Any, *, device: Any = None) -> None:
        num, size = self._blocks_of(config)
        shape = (config.boft_n_butterfly_factor, num, size, size)
        device = torch.device(device if device is not None else self.base_layer.weight.device)
        dtype = self.adapter_dtype()
        if device.type == "meta":
            r, s = torch.empty(shape, device=device), torch.empty(self._scale_shape(), device=device)
        elif config.init_weights:  # identity rotation, unit scale
            r, s = torch.zeros(shape), torch.ones(self._scale_shape())
        else:
            r, s = torch.randn(shape) * 0.1, 1.0 + torch.randn(self._scale_shape()) * 0.1
        self.boft_R[adapter] = nn.Parameter(r.to(device=device, dtype=dtype))
        self.boft_s[adapter] = nn.Parameter(s.to(device=device, dtype=dtype))
        self.boft_block_size[adapter] = size
        self.boft_block_num[adapter] = num
        self.boft_n_butterfly_factor[adapter] = config.boft_n_butterfly_factor
        self.boft_dropout[adapter] = float(config.boft_dropout)

    def check_state(self, tensors: dict[str, torch.Tensor]) -> None:
        layouts = {(self.boft_block_num[a], self.boft_block_size[a], self.boft_block_size[a]) for a in self.boft_R}
        for key, value in tensors.items():
            if key.endswith("boft_R"):
                if value.dim() != 4 or tuple(value.shape[1:]) not in layouts:
                    raise ValueError(f"{key} has shape {tuple(value.shape)}; this layer takes (factors, blocks, bs, bs) "
                                     f"with (blocks, bs, bs) in {sorted(layouts)}: check boft_block_size/num.")
                configured = set(self.boft_n_butterfly_factor.values())
                if value.shape[0] not in configured:
                    warnings.warn(f"{key} holds {value.shape[0]} butterfly factor(s) where the config says "
                                  f"{sorted(configured)}: it runs as saved (PEFT without its CUDA extension "
                                  "trains BOFT with one factor whatever the config says).", PeftWarning)
            elif key.endswith("boft_s") and tuple(value.shape) != self._scale_shape():
                raise ValueError(f"{key} has shape {tuple(value.shape)}; this layer takes {self._scale_shape()}.")

    def factors(self, adapter: str) -> int:
        """Butterfly factors of an adapter (from its tensor: a file may hold fewer than its config says)."""
        return self.boft_R[adapter].shape[0]

    # ------------------------------------------------------------------ rotation
    def _perms_for(self, size: int, factors: int) -> list:
        key = (size, factors)
        if key not in self._perms:
            self._perms[key] = butterfly_perms(self.fan_in, size, factors)
        return self._perms[key]

    def rotation_source(self, adapter: str) -> tuple[tuple, torch.Tensor]:
        r = self.boft_R[adapter]
        return ("full", r.shape[-1], None), r.reshape(-1, r.shape[-1], r.shape[-1])

    def finish_rotation(self, adapter: str, blocks: torch.Tensor) -> tuple[torch.Tensor, list, bool]:
        n, d, bs, _ = self.boft_R[adapter].shape
        blocks = blocks.view(n, d, bs, bs)
        if self.training and self.boft_dropout[adapter] > 0:
            blocks = drop_blocks(blocks, self.boft_dropout[adapter])
        return blocks, self._perms_for(bs, n), True

    def out_scale(self, adapter: str) -> torch.Tensor:
        return self.boft_s[adapter].reshape(-1)

    # ------------------------------------------------------------------ unmerge guard
    def check_unmerge(self, adapters: list[str] | tuple[str, ...]) -> None:
        floor = max(torch.finfo(self.base_layer.weight.dtype).tiny, 1e-8)
        for adapter in adapters:
            if adapter not in self.boft_s:
                continue
            s = self.boft_s[adapter].detach()
            bad = ~(s.abs() >= floor)
            if bool(bad.any()):
                raise ValueError(
                    f"Cannot unmerge BOFT adapter {adapter!r}: {int(bad.sum())} entries of its boft_s are 0, "
                    f"non-finite or below {floor:.3g} in magnitude, so dividing them out would give inf/NaN. "
                    "The weights stay merged; reload the base model to get the original weights back."
                )
