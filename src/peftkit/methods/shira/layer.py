"""SHiRA on the engine: an adapter is ``nnz`` values at fixed positions of the base weight.

Positions are kept as PEFT saves them, ``shira_indices`` (2, nnz) int32 (row, col) in the base
weight's own layout (row-major order of the mask), next to the trained ``shira_weight`` (nnz,).
Everything else works on those nnz entries: forward patches them into the weight for the base
GEMM (``kernels.shira``), merge writes them in place and unmerge writes the saved originals
back (exact), so merging, unmerging and switching merged adapters cost O(nnz).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...core.layer import AdapterLayer, BufferDict
from ...kernels.autocast import autocast_dtype
from ...kernels.shira import SparsePattern, shira_linear, sparse_delta
from .mask import layer_seed, positions_from_mask, random_indices


class ShiraLayer(AdapterLayer):
    """SHiRA on an nn.Linear or transformers Conv1D base layer."""

    prefix = "shira_"
    adapter_attrs = ("shira_weight",)
    buffer_attrs = ("shira_indices",)
    other_attrs = ("r", "scaling", "_patterns", "_merge_saved")
    supported_kinds = ("linear",)
    file_sized_attrs = ("shira_weight", "shira_indices")

    def __init__(self, base_layer: nn.Module, ops: Any = None) -> None:
        super().__init__(base_layer, ops)
        self.shira_weight = nn.ParameterDict()
        self.shira_indices = BufferDict()
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self._patterns: dict[str, tuple[tuple, SparsePattern]] = {}
        self._merge_saved: dict[str, torch.Tensor] = {}  # base values under a merged adapter

    # ------------------------------------------------------------------ create
    def create(self, adapter: str, config: Any, *, name: str = "", device: Any = None) -> None:
        r = config.r
        weight = self.base_layer.weight
        k = r * (self.in_features + self.out_features)
        if k > weight.numel():
            raise ValueError(
                f"SHiRA r={r} asks for r·(m+n) = {k} entries of {name or 'a layer'}, which has only "
                f"{weight.numel()} ({tuple(weight.shape)}): lower r."
            )
        device = torch.device(device if device is not None else weight.device)
        if device.type == "meta":  # loading: positions and values come from the file
            indices = torch.empty(2, k, dtype=torch.int32, device=device)
        elif config.mask_fn is not None:
            kwargs: dict[str, Any] = {"bias": getattr(self.base_layer, "bias", None) is not None}
            if config.mask_type == "random":
                kwargs["random_seed"] = config.random_seed
            mask = config.mask_fn(self.base_layer, r, **kwargs)
            indices = positions_from_mask(mask, weight, k, name or type(self.base_layer).__name__).to(device)
        elif config.mask_type == "random":
            indices = random_indices(tuple(weight.shape), k, layer_seed(config.random_seed, name)).to(device)
        else:
            raise ValueError(
                f"ShiraConfig(mask_type={config.mask_type!r}) needs a mask function: set config.mask_fn = "
                "fn(base_layer, r, **kwargs) returning a 0/1 mask, or use mask_type='random'."
            )
        dtype = self.adapter_dtype()
        values = torch.empty(k, device=device, dtype=dtype)
        if device.type != "meta":
            values.zero_() if config.init_weights else values.normal_()
        self.shira_weight[adapter] = nn.Parameter(values)
        self.shira_indices[adapter] = indices
        self.r[adapter] = r
        self.scaling[adapter] = 1.0

    def set_scale(self, adapter: str, scale: float) -> None:
        """Scale an adapter's values at inference (1.0 while training)."""
        if adapter in self.scaling:
            self.scaling[adapter] = float(scale)

    def check_state(self, tensors: dict[str, torch.Tensor]) -> None:
        idx = next((v for k, v in tensors.items() if k.endswith("shira_indices")), None)
        val = next((v for k, v in tensors.items() if k.endswith("shira_weight")), None)
        where = next(iter(tensors)).rsplit(".", 1)[0]
        if idx is None or val is None:
            raise ValueError(f"The SHiRA adapter file has {'values' if idx is None else 'positions'} but no "
                             f"{'positions' if idx is None else 'values'} for {where}.")
        if idx.dim() != 2 or idx.shape[0] != 2 or val.dim() != 1 or idx.shape[1] != val.shape[0]:
            raise ValueError(
                f"SHiRA tensors of {where} do not fit together: shira_indices {tuple(idx.shape)} must be "
                f"(2, n) for shira_weight {tuple(val.shape)} (n,)."
            )
        shape = self.base_layer.weight.shape
        if idx.numel() and (int(idx.min()) < 0 or int(idx[0].max()) >= shape[0] or int(idx[1].max()) >= shape[1]):
            raise ValueError(f"SHiRA positions of {where} fall outside its weight {tuple(shape)}.")

    # ------------------------------------------------------------------ positions
    def pattern(self, adapter: str) -> SparsePattern:
        """The adapter's positions in kernel form, rebuilt only when ``shira_indices`` changes."""
        idx = self.shira_indices[adapter]
        key = (idx.data_ptr(), idx._version, idx.device, tuple(idx.shape))
        cached = self._patterns.get(adapter)
        if cached is not None and cached[0] == key:
            return cached[1]
        i0, i1 = idx[0], idx[1]  # views of the buffer: the CSR columns can share its memory
        cols = self.base_layer.weight.shape[1]
        rows_c, cols_c = (i1, i0) if self.ops.transposed else (i0, i1)  # canonical (out, in)
        pat = SparsePattern(rows_c, cols_c, i0.long() * cols + i1, (self.out_features, self.in_features))
        self._patterns[adapter] = (key, pat)
        return pat

    def _values(self, adapter: str) -> torch.Tensor:
        return self.shira_weight[adapter] * self.scaling[adapter]

    # ------------------------------------------------------------------ math
    def delta_weight(self, adapter: str) -> torch.Tensor:
        pat = self.pattern(adapter)
        v = self._values(adapter)
        dense = torch.zeros(self.out_features, self.in_features, dtype=v.dtype, device=v.device)
        return dense.index_put_(pat.coo(), pat.values(v))

    def fused_forward(self, adapter: str, x: torch.Tensor) -> torch.Tensor | None:
        """The base GEMM on the patched weight (``kernels.shira``); under autocast, the general path."""
        base = self.fusable_base(x)
        weight = self.base_layer.weight
        if base is None or adapter not in self.shira_weight or not weight.is_contiguous():
            return None
        if autocast_dtype(x.device.type) is not None:
            return None  # the patched weight would be cast to a copy: base GEMM under autocast, then the sparse delta
        w2d, bias = base
        return shira_linear(x, weight, w2d, bias, self.shira_weight[adapter], self.pattern(adapter), self.scaling[adapter])

    def adapt(self, adapter: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out + sparse_delta(x.to(self.shira_weight[adapter].dtype), self._values(adapter), self.pattern(adapter)).to(out.dtype)

    def merge_into(self, adapter: str, w2d: torch.Tensor, sign: float) -> None:
        pat = self.pattern(adapter)
        flat = pat.flat
        live = w2d.data_ptr() == self.base_layer.weight.data_ptr()
        storage = self.base_layer.weight.data.view(-1) if live else None
        if live and sign < 0 and adapter in self._merge_saved:
            storage.index_copy_(0, flat, self._merge_saved.pop(adapter))  # exact: the values before merging
            return
        v = self._values(adapter).detach() * sign
        if live:
            before = storage.index_select(0, flat)
            if sign > 0:
                self._merge_saved[adapter] = before
            storage.index_copy_(0, flat, (before.to(v.dtype) + v).to(storage.dtype))
            return
        w2d.index_put_(pat.coo(), pat.values(v).to(w2d.dtype), accumulate=True)  # a copy (safe-merge check)
