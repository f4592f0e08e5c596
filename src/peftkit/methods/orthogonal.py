"""What OFT and BOFT share: a learned rotation ``M`` of the base layer's input features.

The adapted layer computes ``base(x M)`` — for BOFT also a learned scale ``s`` of the output
features, ``s ⊙ (base(x M) − b) + b``. Merging writes ``W ← s ⊙ (W Mᵀ)`` (rows scaled);
unmerging divides ``s`` out and applies ``M⁻ᵀ`` (``M`` itself when the blocks are exactly
orthogonal). ``M`` is a product of block-diagonal factors (``kernels.orthogonal``); it is applied
to activations for Linear and Conv1D layers and to the weight for convolutions (the input of a
convolution is the image, not its patches), so nothing of size d×d is ever built.

Several active adapters compose: the forward runs ``x M_n ⋯ M_1`` (the last active adapter
rotates first), which is exactly what merging them one after the other, first to last, writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.context import BASE_ADAPTER, forward_memo, group_rows
from ..core.layer import AdapterLayer
from ..kernels.orthogonal import butterfly, cayley, inverse_transpose, skew_from_packed, skew_part

_BATCH = "orthogonal_rotations"  # forward-memo key of the batched rotation table


def _versions(params: Sequence[nn.Parameter]) -> tuple:
    """What changes when a parameter's values may have changed (in place, replaced or moved)."""
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)


def _cayley_blocks(recipe: tuple, source: torch.Tensor) -> torch.Tensor:
    """(n, bs, bs) Cayley blocks from a ``rotation_source``."""
    kind, bs, terms = recipe
    q = skew_from_packed(source, bs) if kind == "packed" else skew_part(source)
    return cayley(q, terms)


def _batched_rotations(owner: Any) -> dict:
    """``(id(layer), adapter) -> rotation`` for the active adapters of every orthogonal layer of a model.

    The blocks of all layers that share a recipe (block size, series) go through one skew and one
    Cayley transform: a few ops on a big batch instead of the same ops on every layer, whose cost is
    per-op overhead at these sizes. Gradients flow back to each layer's parameters through the split.
    """
    groups: dict[tuple, list] = {}
    for _, layer in owner.adapter_layers():
        if not isinstance(layer, OrthogonalLayer) or layer.disable_adapters or layer.merged_adapters:
            continue
        for adapter in layer._present(layer.active_adapters):
            recipe, source = layer.rotation_source(adapter)
            groups.setdefault((recipe, source.dtype, source.device), []).append((layer, adapter, source))
    table: dict = {}
    for (recipe, _, _), members in groups.items():
        sources = [m[2] for m in members]
        blocks = _cayley_blocks(recipe, torch.cat(sources) if len(sources) > 1 else sources[0])
        for (layer, adapter, _), part in zip(members, blocks.split([t.shape[0] for t in sources])):
            table[(id(layer), adapter)] = layer.finish_rotation(adapter, part)
    return table


class OrthogonalLayer(AdapterLayer):
    """An ``AdapterLayer`` that rotates the input features; subclasses say how the rotation is stored."""

    supported_kinds = ("linear", "conv")
    method_name = ""

    def __init__(self, base_layer: nn.Module, ops: Any = None) -> None:
        super().__init__(base_layer, ops)
        # the rotated axis: in_features, in_channels/groups · prod(kernel) for a convolution, or the
        # embedding dimension for an embedding (whose *output* is rotated: out = emb(x) M)
        embedding = self.ops.kind == "embedding"
        self.fan_in = self.ops.out_features if embedding else self.ops.weight2d(base_layer).shape[1]
        # adapter -> (parameter versions, rotation): reused while nothing trains (generation, eval)
        self._rotations: dict[str, tuple[tuple, tuple]] = {}

    # ------------------------------------------------------------------ the method's part
    def rotation_source(self, adapter: str) -> tuple[tuple, torch.Tensor]:
        """``(recipe, tensor)``: what the adapter's blocks are made from.

        ``recipe`` is ``("packed", bs, neumann_terms)`` for packed skew triangles (n, bs·(bs−1)/2)
        or ``("full", bs, None)`` for full blocks (n, bs, bs) whose skew part is used.
        """
        raise NotImplementedError

    def finish_rotation(self, adapter: str, blocks: torch.Tensor) -> tuple[torch.Tensor, list, bool]:
        """``(blocks (N, D, bs, bs), perms, orthogonal)`` from the (n, bs, bs) Cayley blocks."""
        raise NotImplementedError

    def out_scale(self, adapter: str) -> torch.Tensor | None:
        """The adapter's (out,) output scale, if it has one."""
        return None

    def rotation(self, adapter: str) -> tuple[torch.Tensor, list, bool]:
        """``(blocks (N, D, bs, bs), perms, orthogonal)`` of one adapter (dropout applied in training)."""
        recipe, source = self.rotation_source(adapter)
        return self.finish_rotation(adapter, _cayley_blocks(recipe, source))

    def _rotation(self, adapter: str) -> tuple[torch.Tensor, list, bool]:
        """``rotation(adapter)``: in a training call taken from one batch made for every layer of the
        model, else remembered between calls while the parameters do not change."""
        params = list(self.adapter_parameters(adapter))
        if self.training or (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            memo = forward_memo()
            if memo is None or memo.get("owner") is None:
                return self.rotation(adapter)
            if _BATCH not in memo:
                memo[_BATCH] = _batched_rotations(memo["owner"])
            hit = memo[_BATCH].get((id(self), adapter))
            return hit if hit is not None else self.rotation(adapter)
        hit = self._rotations.get(adapter)
        if hit is not None and hit[0] == _versions(params):
            return hit[1]
        value = self.rotation(adapter)
        self._rotations[adapter] = (_versions(params), value)  # after: COFT's projection bumps the versions
        return value

    def delete_adapter(self, adapter: str) -> None:
        super().delete_adapter(adapter)
        self._rotations.pop(adapter, None)

    # ------------------------------------------------------------------ weights
    def _rotate_weight(self, w2d: torch.Tensor, adapters: Sequence[str]) -> torch.Tensor:
        """``s ⊙ (W Mᵀ)`` for these adapters merged first to last, in the adapters' dtype."""
        w = w2d
        for adapter in adapters:
            blocks, perms, _ = self._rotation(adapter)
            w = butterfly(w.to(blocks.dtype), blocks, perms, transpose=True)
            s = self.out_scale(adapter)
            if s is not None:
                w = w * s.unsqueeze(1)
        return w

    def merge_into(self, adapter: str, w2d: torch.Tensor, sign: float) -> None:
        if self.ops.kind == "embedding":  # the table's rows are the outputs: E ← E M, or E M⁻¹ to unmerge
            table = w2d.t()  # (num_embeddings, dim), a view of the weight
            blocks, perms, orthogonal = self._rotation(adapter)
            t = table.to(blocks.dtype)
            if sign > 0:
                table.copy_(butterfly(t, blocks, perms))
            else:
                table.copy_(butterfly(t, inverse_transpose(blocks, orthogonal), perms, transpose=True))
            return
        if sign > 0:
            w2d.copy_(self._rotate_weight(w2d, [adapter]))
            return
        blocks, perms, orthogonal = self._rotation(adapter)
        w = w2d.to(blocks.dtype)
        s = self.out_scale(adapter)
        if s is not None:
            w = w / s.unsqueeze(1)
        w2d.copy_(butterfly(w, inverse_transpose(blocks, orthogonal), perms))

    def delta_weight(self, adapter: str) -> torch.Tensor:
        with torch.no_grad():
            w = self._weight2d().detach().to(self.adapter_dtype())
            merged = w.clone()
            self.merge_into(adapter, merged, 1.0)
            return merged - w

    # ------------------------------------------------------------------ forward
    def _present(self, adapters: Sequence[str]) -> list[str]:
        held = set(self.adapters)
        return [a for a in adapters if a in held]

    def _rotate(self, x: torch.Tensor, adapters: Sequence[str]) -> torch.Tensor:
        """Row vectors ``x`` times each adapter's ``M``, in the order given."""
        h = x
        for adapter in adapters:
            blocks, perms, _ = self._rotation(adapter)
            h = butterfly(h.to(blocks.dtype), blocks, perms)
        return h.to(x.dtype)

    def _rotate_input(self, x: torch.Tensor, adapters: Sequence[str]) -> torch.Tensor:
        """An input rotated as merging writes it: ``x M_n ⋯ M_1`` (the last adapter rotates first)."""
        return self._rotate(x, adapters[::-1])

    def _scale_of(self, adapters: Sequence[str]) -> torch.Tensor | None:
        scale = None
        for adapter in adapters:
            s = self.out_scale(adapter)
            if s is not None:
                scale = s if scale is None else scale * s
        return scale

    def _linear(self, h: torch.Tensor, scale: torch.Tensor | None, args: tuple, kwargs: dict) -> torch.Tensor:
        """``base(h)``, with its output features scaled by ``scale`` (bias left as it is)."""
        if scale is None:
            return self.base_layer(h, *args, **kwargs)
        y = F.linear(h, self._weight2d())
        bias = self.base_layer.bias
        if scale.dim() == 2:  # per-sample scales (B, out) over (B, ..., out)
            scale = scale.view(scale.shape[0], *([1] * (y.dim() - 2)), scale.shape[1])
        out = y * scale if bias is None else torch.addcmul(bias, y, scale)
        return out.to(h.dtype)

    def _conv(self, x: torch.Tensor, adapters: Sequence[str]) -> torch.Tensor:
        base = self.base_layer
        w = self._rotate_weight(self._weight2d(), adapters).view(base.weight.shape).to(base.weight.dtype)
        return base._conv_forward(x, w, base.bias)

    def forward_active(self, x: torch.Tensor, adapters: Sequence[str], args: tuple, kwargs: dict) -> torch.Tensor:
        adapters = self._present(adapters)
        if not adapters:
            return self.base_layer(x, *args, **kwargs)
        if self.ops.kind == "conv":
            return self._conv(x, adapters)
        if self.ops.kind == "embedding":
            return self._rotate(self.base_layer(x, *args, **kwargs), adapters)
        return self._linear(self._rotate_input(x, adapters), self._scale_of(adapters), args, kwargs)

    def mixed_forward(self, x: torch.Tensor, names: Sequence[str], args: tuple, kwargs: dict) -> torch.Tensor:
        """Each sample rotated by its own adapter; Linear/Conv1D run the base op once for the batch."""
        groups = group_rows(names)
        present = [n for n in groups if n != BASE_ADAPTER and n in self.adapters]
        if self.ops.kind == "conv":
            out = None
            for name, rows in groups.items():
                idx = torch.tensor(rows, device=x.device)
                sub = x.index_select(0, idx)
                y = self._conv(sub, [name]) if name in present else self.base_layer(sub, *args, **kwargs)
                out = y.new_empty((x.shape[0], *y.shape[1:])) if out is None else out
                out.index_copy_(0, idx, y)
            return out
        if self.ops.kind == "embedding":
            out = self.base_layer(x, *args, **kwargs)
            for name in present:
                idx = torch.tensor(groups[name], device=x.device)
                out = out.index_copy(0, idx, self._rotate(out.index_select(0, idx), [name]))
            return out
        h, scale = x, None
        for name in present:
            idx = torch.tensor(groups[name], device=x.device)
            rotated = self._rotate_input(x.index_select(0, idx), [name])
            h = h.index_copy(0, idx, rotated)
            s = self.out_scale(name)
            if s is not None:
                if scale is None:
                    scale = torch.ones(x.shape[0], self.out_features, device=s.device, dtype=s.dtype)
                scale = scale.index_copy(0, idx, s.unsqueeze(0).expand(len(idx), -1))
        return self._linear(h, scale, args, kwargs)
