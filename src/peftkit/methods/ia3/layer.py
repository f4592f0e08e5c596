"""(IA)³ on the engine: each adapter is one vector ``l`` that rescales a channel axis.

A normal target scales the layer's output, ``base(x) ⊙ l`` (bias included); a feed-forward target
scales its input, ``base(x ⊙ l)``. Both cost one elementwise multiply next to the base op, and
several active adapters multiply together: the layer runs the base op itself through the
engine's ``forward_active`` / ``mixed_forward`` hooks (an input scaling happens *before* it).

``ia3_l`` is kept in PEFT's shapes: ``(out, 1)`` / ``(1, in)`` for nn.Linear and transformers
Conv1D, ``(1, C, 1, ...)`` for convolutions (C = out or in channels). Merging multiplies the
rows (output scaling, and the bias) or the columns (input scaling) of the weight in place;
unmerging divides them out again and refuses, leaving the weight merged, when an entry of
``l`` is too close to zero to divide by.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...core.context import BASE_ADAPTER, group_rows
from ...core.layer import AdapterLayer


class IA3Layer(AdapterLayer):
    """(IA)³ on an nn.Linear, transformers Conv1D or nn.Conv1d/2d/3d base layer."""

    prefix = "ia3_"
    adapter_attrs = ("ia3_l",)
    other_attrs = ("feedforward",)
    supported_kinds = ("linear", "conv")
    quantized_ok = True

    def __init__(self, base_layer: nn.Module, ops: Any = None) -> None:
        super().__init__(base_layer, ops)
        self.ia3_l = nn.ParameterDict()
        self.feedforward: dict[str, bool] = {}  # adapter -> scales the input (True) or the output

    @property
    def is_feedforward(self) -> bool:
        """PEFT's per-layer flag: whether the (first) adapter scales this layer's input."""
        return next(iter(self.feedforward.values()), False)

    # ------------------------------------------------------------------ create
    def param_shape(self, feedforward: bool) -> tuple[int, ...]:
        """The saved shape of ``ia3_l`` (PEFT's)."""
        if self.ops.kind == "conv":
            channels = self.in_features if feedforward else self.out_features
            return (1, channels) + (1,) * self.ops.conv_dim
        return (1, self.in_features) if feedforward else (self.out_features, 1)

    def create(self, adapter: str, config: Any, *, feedforward: bool = False, device: Any = None) -> None:
        shape = self.param_shape(feedforward)
        device = torch.device(device if device is not None else self.base_layer.weight.device)
        if device.type == "meta":  # loading: the values come from the file
            value = torch.empty(shape, device=device, dtype=self.adapter_dtype())
        elif config.init_ia3_weights:
            value = torch.ones(shape, device=device, dtype=self.adapter_dtype())
        else:
            value = torch.randn(shape).to(device=device, dtype=self.adapter_dtype())  # CPU draw, as PEFT
        self.ia3_l[adapter] = nn.Parameter(value)
        self.feedforward[adapter] = bool(feedforward)

    def check_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, value in tensors.items():
            if not key.endswith("ia3_l"):
                continue
            expected = {self.param_shape(True), self.param_shape(False)}
            if tuple(value.shape) not in expected:
                raise ValueError(
                    f"{key} has shape {tuple(value.shape)}; this layer takes "
                    f"{self.param_shape(False)} (output scaling) or {self.param_shape(True)} (feedforward_modules)."
                )

    # ------------------------------------------------------------------ scales
    def _vector(self, adapter: str) -> torch.Tensor:
        return self.ia3_l[adapter].reshape(-1)  # (C,): a view, so gradients reach ia3_l

    def _products(self, adapters: Sequence[str]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The product of the input scales and of the output scales of these adapters, as (C,) vectors."""
        s_in = s_out = None
        for adapter in adapters:
            if adapter not in self.ia3_l:
                continue
            v = self._vector(adapter)
            if self.feedforward[adapter]:
                s_in = v if s_in is None else s_in * v
            else:
                s_out = v if s_out is None else s_out * v
        return s_in, s_out

    def _channel_view(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``s`` (C,) or per-sample (B, C) shaped to broadcast over the channel axis of ``t``."""
        if self.ops.kind == "conv":
            return s.view(*s.shape, *([1] * self.ops.conv_dim))  # channels before the spatial dims
        if s.dim() == 2:  # (B, C) -> (B, 1, ..., 1, C)
            return s.view(s.shape[0], *([1] * (t.dim() - 2)), s.shape[1])
        return s  # channels last

    def _run(self, x: torch.Tensor, s_in: torch.Tensor | None, s_out: torch.Tensor | None,
             args: tuple, kwargs: dict) -> torch.Tensor:
        if s_in is not None:
            x = (x * self._channel_view(s_in, x)).to(x.dtype)
        out = self.base_layer(x, *args, **kwargs)
        if s_out is not None:
            out = (out * self._channel_view(s_out, out)).to(out.dtype)
        return out

    # ------------------------------------------------------------------ forward
    def forward_active(self, x: torch.Tensor, adapters: Sequence[str], args: tuple, kwargs: dict) -> torch.Tensor:
        s_in, s_out = self._products(adapters)
        return self._run(x, s_in, s_out, args, kwargs)

    def mixed_forward(self, x: torch.Tensor, names: Sequence[str], args: tuple, kwargs: dict) -> torch.Tensor:
        """Each sample with its own adapter in one base call: per-sample scale rows (ones for the base)."""
        present = [n for n in group_rows(names) if n != BASE_ADAPTER and n in self.ia3_l]
        s_in = self._per_sample(names, [n for n in present if self.feedforward[n]], self.in_features, x)
        s_out = self._per_sample(names, [n for n in present if not self.feedforward[n]], self.out_features, x)
        return self._run(x, s_in, s_out, args, kwargs)

    def _per_sample(self, names: Sequence[str], adapters: list[str], size: int, x: torch.Tensor) -> torch.Tensor | None:
        if not adapters:
            return None
        rows = {a: i + 1 for i, a in enumerate(adapters)}  # row 0: ones (base model / other kind)
        vectors = [self._vector(a) for a in adapters]
        table = torch.cat([torch.ones(1, size, dtype=vectors[0].dtype, device=vectors[0].device),
                           torch.stack(vectors)])  # (n + 1, C)
        idx = torch.tensor([rows.get(n, 0) for n in names], device=table.device)
        return table.index_select(0, idx)  # (B, C)

    # ------------------------------------------------------------------ merge
    def _weight_scale(self, adapter: str) -> torch.Tensor:
        """The factor that multiplies the canonical (out, fan_in) weight, broadcastable to it."""
        v = self._vector(adapter).detach()
        if not self.feedforward[adapter]:
            return v.view(-1, 1)  # rows
        if self.ops.kind != "conv":
            return v.view(1, -1)  # columns
        base = self.base_layer
        k = base.weight[0, 0].numel()  # kernel positions per (out, in) pair
        groups = base.groups
        if groups == 1:
            return v.repeat_interleave(k).view(1, -1)
        # grouped conv: output channel o reads input channels of its own group only
        in_g, out_g = self.in_features // groups, self.out_features // groups
        per_out = v.view(groups, 1, in_g).expand(groups, out_g, in_g).reshape(self.out_features, in_g)
        return per_out.repeat_interleave(k, dim=1)

    def delta_weight(self, adapter: str) -> torch.Tensor:
        w = self._weight2d().to(self.ia3_l[adapter].dtype)
        return w * self._weight_scale(adapter) - w

    def merge_into(self, adapter: str, w2d: torch.Tensor, sign: float) -> None:
        s = self._weight_scale(adapter)
        if sign > 0:
            w2d.mul_(s)
        else:
            self._check_invertible([adapter])
            w2d.div_(s)

    def merge_bias(self, adapter: str, bias: torch.Tensor, sign: float) -> None:
        if self.feedforward[adapter]:  # an input scaling leaves the bias alone
            return
        v = self._vector(adapter).detach().to(bias.dtype)
        bias.mul_(v) if sign > 0 else bias.div_(v)

    def _unmerge_floor(self) -> float:
        # Below this |l| (0 included) the merged entries are 0 or lost to underflow in the weight's dtype,
        # and dividing them out gives inf/NaN or noise: 1e-8 (PEFT's division guard) or the dtype's
        # smallest normal number, whichever is larger.
        return max(torch.finfo(self.base_dtype()).tiny, 1e-8)

    def _check_invertible(self, adapters: Sequence[str]) -> None:
        floor = self._unmerge_floor()
        for adapter in adapters:
            if adapter not in self.ia3_l:
                continue
            v = self._vector(adapter).detach()
            bad = ~(v.abs() >= floor)  # also catches NaN
            if bool(bad.any()):
                raise ValueError(
                    f"Cannot unmerge (IA)³ adapter {adapter!r} from {type(self.base_layer).__name__}"
                    f"({self.in_features} -> {self.out_features}): {int(bad.sum())} entries of its ia3_l are 0, "
                    f"non-finite or below {floor:.3g} in magnitude, so dividing them out would give inf/NaN. "
                    "The weights stay merged; reload the base model to get the original weights back."
                )

    def check_unmerge(self, adapters: Sequence[str]) -> None:
        self._check_invertible(adapters)
