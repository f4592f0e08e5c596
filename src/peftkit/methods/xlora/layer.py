"""A LoRA layer whose experts are mixed per token: two thin products for all experts together.

``out = base(x) + Σ_e w_e · s_e · B_e A_e x`` is computed as ``((x A_catᵀ) ⊙ w_cols) B_catᵀ``,
where ``A_cat`` stacks every expert's A (R = Σ r_e rows), ``B_cat`` every expert's B (pre-scaled by
its LoRA scaling) and ``w_cols`` repeats each token's expert weight over that expert's r columns.
The stacked factors are cached while the experts' weights are unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.context import forward_memo
from ..lora.layer import LoraLayer, _add_scaled


class Gate:
    """The expert weights of one pass, as the layers read them.

    Attributes:
        weights: (batch, seq, n_layers or 1, n_experts) per-token weights, or (n_experts,) for
            every token alike, or None when every expert's weight is 0.
        bias_weight: the factor on the experts' ``lora_B`` biases (those ignore the per-token weights).
    """

    def __init__(self, weights: torch.Tensor | None, bias_weight: float) -> None:
        self.weights = weights
        self.bias_weight = bias_weight

    def for_layer(self, index: int) -> torch.Tensor | None:
        w = self.weights
        if w is None or w.dim() == 1:
            return w
        return w[:, :, index if w.shape[2] > 1 else 0, :]


def current_gate() -> Gate | None:
    memo = forward_memo()
    return None if memo is None else memo.get("xlora")


class XLoraLayer(LoraLayer):
    """LoRA with experts named "0", "1", ...; inside an X-LoRA call they are mixed by the gate."""

    xlora_index: int = -1  # this layer's position among the model's X-LoRA layers

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        gate = current_gate()
        if gate is None or self._disable_adapters or self.merged_adapters:
            return super().forward(x, *args, **kwargs)
        return self.mix(x, self.base_layer(x, *args, **kwargs), gate)

    def mix(self, x: torch.Tensor, out: torch.Tensor, gate: Gate) -> torch.Tensor:
        """``out`` plus every expert's output weighted by the gate's weights for this layer."""
        w = gate.for_layer(self.xlora_index)
        if w is None and not any(self.lora_bias.values()):
            return out  # every expert at 0 (the default scaling pass): the base layer alone
        a, b, cols, bias = self._expert_stack()
        if w is not None:
            h = self._expert_hidden(x, a)  # (..., R)
            wc = w.index_select(-1, cols).to(h.dtype)  # (..., R) or (R,)
            if wc.dim() > 1 and wc.shape[:-1] != h.shape[:-1]:  # a layer that sees the tokens flattened
                if wc.numel() != h.numel():
                    raise ValueError(
                        f"X-LoRA scalings cover {tuple(wc.shape[:-1])} tokens but this layer got input of shape "
                        f"{tuple(x.shape)}: the layers must see (batch, seq, ...) inputs."
                    )
                wc = wc.reshape(h.shape)
            out = _add_scaled(out, h * wc, b, None, 1.0)
        if bias is not None and gate.bias_weight != 0:
            out = out + (bias * gate.bias_weight).to(out.dtype)
        return out

    def _expert_hidden(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``x A_catᵀ``; in training each expert sees its own dropout of the input."""
        if self.ops.kind == "embedding":
            base = self.base_layer
            return F.embedding(x, a.t(), base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq)
        if x.dtype != a.dtype:
            x = x.to(a.dtype)
        names = self._experts()
        drops = [self.lora_dropout[n] for n in names]
        if not (self.training and any(isinstance(d, nn.Dropout) for d in drops)):
            return F.linear(x, a)
        ranks = {self.r[n] for n in names}
        if len(ranks) == 1 and len({getattr(d, "p", 0.0) for d in drops}) == 1:
            # one dropout call draws an independent mask per expert; one batched product for all
            r = ranks.pop()
            xe = F.dropout(x.unsqueeze(-2).expand(*x.shape[:-1], len(names), x.shape[-1]), drops[0].p, True)
            h = torch.einsum("...ei,eri->...er", xe, a.view(len(names), r, -1))
            return h.reshape(*x.shape[:-1], -1)
        rows = torch.split(a, [self.r[n] for n in names])
        return torch.cat([F.linear(d(x), ra) for d, ra in zip(drops, rows)], dim=-1)

    def _experts(self) -> list[str]:
        return sorted(self.lora_A or self.lora_embedding_A, key=int)

    def _expert_tensors(self, names: list[str]) -> list[torch.Tensor]:
        """Every tensor the stack is built from (read directly: this runs on every call)."""
        if self.lora_embedding_A:
            return [t for n in names for t in (self.lora_embedding_A[n], self.lora_embedding_B[n])]
        out = []
        for n in names:
            b = self.lora_B[n]
            out += (self.lora_A[n].weight, b.weight) if b.bias is None else (self.lora_A[n].weight, b.weight, b.bias)
        return out

    def _expert_stack(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(A_cat (R, fan_in), B_cat·scaling (out, R), expert index per column (R,), Σ scaling·bias or None).

        Cached while the same tensors hold the same values (checked by identity and version).
        """
        names = self._experts()
        tensors = self._expert_tensors(names)
        differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        cached = getattr(self, "_xlora_stack", None)
        if (
            cached is not None
            and not differentiable
            and len(cached[0]) == len(tensors)
            and all(t is c and t._version == v for t, (c, v) in zip(tensors, cached[0]))
        ):
            return cached[1]
        factors = [self._factors(n) for n in names]
        a = torch.cat([fa for fa, _ in factors], 0)
        b = torch.cat([fb * self.scaling[n] for n, (_, fb) in zip(names, factors)], 1)
        cols = torch.cat([torch.full((fa.shape[0],), int(n), dtype=torch.long) for n, (fa, _) in zip(names, factors)])
        biases = [self.lora_B[n].bias * self.scaling[n] for n in names if n in self.lora_B and self.lora_B[n].bias is not None]
        bias = torch.stack(biases).sum(0) if biases else None
        result = (a, b, cols.to(a.device), bias)
        if differentiable:
            return result
        result = tuple(t.detach() if t is not None else None for t in result)
        self._xlora_stack = ([(t, t._version) for t in tensors], result)
        return result
