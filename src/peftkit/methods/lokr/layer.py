"""LoKr's math on the engine: ``out = base(x) + scale · kron(W1, W2) x``, never forming the Kronecker product in forward.

With W1 (a, c), W2 (b, d), out = a·b and in = c·d, the identity
``kron(W1, W2) vec(X) = vec(W1 X W2ᵀ)`` (X the input row reshaped to (c, d)) turns the
update into two small matrix products. On a plain linear layer (nn.Linear, Conv1D) they run with
the base op in one autograd node (``kernels.lokr``: no copies of the activation-sized middle
product; the bench's 3-step profile went from 1.10 s to 0.91 s, LoRA's being 0.80 s); the dropouts
and other layers take the general path (``adapt``). For a convolution, W2 carries the kernel,
(b, d, *k): the input's channels are split into (c, d), W1 mixes the c groups and W2 is an
ordinary convolution from d to b channels, run with the batch widened by a (or c).

Checkpoint layout (PEFT's): ``lokr_w1`` (a, c) or ``lokr_w1_a`` (a, r) / ``lokr_w1_b`` (r, c);
``lokr_w2`` (b, d[, *k]) or ``lokr_w2_a`` (b, r) / ``lokr_w2_b`` (r, d·prod(k)); with an
effective (CP) conv: ``lokr_t2`` (r, r, kh, kw), ``lokr_w2_a`` (r, b), ``lokr_w2_b`` (r, d).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ...kernels.lokr import lokr_linear
from ..lycoris import LycorisLayer


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into ``(m, n)`` with ``m · n == dimension``, as LoKr (PEFT, LyCORIS) does.

    A positive ``factor`` that divides ``dimension`` is used as is: ``(factor, dimension // factor)``
    (so m may exceed n). Otherwise m is the largest divisor with ``m ≤ √dimension`` and
    ``m ≤ cap``, where cap is ``dimension`` for ``factor == -1`` and ``factor`` else; m ≤ n.

    Args:
        dimension: the size to split.
        factor: the wanted size of one side, or -1 for the most balanced split.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    cap = dimension if factor == -1 else factor
    m = 1
    for cand in range(2, math.isqrt(dimension) + 1):
        if cand > cap:
            break
        if dimension % cand == 0:
            m = cand
    return m, dimension // m


def cp_weight(t2: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor) -> torch.Tensor:
    """W2 from its CP factors: (r, r, *k) core, (r, b), (r, d) -> (b, d, *k)."""
    return torch.einsum("ij...,ip,jq->pq...", t2, w2_a, w2_b)


class LoKrLayer(LycorisLayer):
    """LoKr on an nn.Linear, transformers Conv1D, nn.Conv1d or nn.Conv2d base layer."""

    prefix = "lokr_"
    method_name = "LoKr"
    adapter_attrs = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    other_attrs = ("r", "alpha", "scaling", "rank_dropout", "module_dropout", "rank_dropout_scale", "_sides")

    def __init__(self, base_layer: nn.Module, ops: Any = None) -> None:
        super().__init__(base_layer, ops)
        self.rank_dropout_scale: dict[str, bool] = {}
        self._sides: dict[str, tuple[int, int, int, int]] = {}  # (a, b, c, d)

    # ------------------------------------------------------------------ create
    def create(self, adapter: str, config: Any, *, r: int, alpha: float, device: Any = None) -> None:
        self._check_rank(adapter, r)
        in_dim = self.in_features // self._groups
        a, b = factorization(self.out_features, config.decompose_factor)
        c, d = factorization(in_dim, config.decompose_factor)
        kernel = self._kernel
        full_w1 = not (config.decompose_both and r < max(a, c) / 2)
        full_w2 = r >= max(b, d) / 2
        effective = bool(config.use_effective_conv2d) and bool(kernel) and any(k != 1 for k in kernel)
        fk = {"device": device if device is not None else self.base_layer.weight.device, "dtype": self.adapter_dtype()}

        def new(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, **fk))

        if full_w1:
            self.lokr_w1[adapter] = new(a, c)
        else:
            self.lokr_w1_a[adapter] = new(a, r)
            self.lokr_w1_b[adapter] = new(r, c)
        if full_w2:
            self.lokr_w2[adapter] = new(b, d, *kernel)
        elif effective:
            # PEFT keeps a Conv1d core 4-D as well: (r, r, k, 1)
            core = kernel if len(kernel) == 2 else (*kernel, 1)
            self.lokr_t2[adapter] = new(r, r, *core)
            self.lokr_w2_a[adapter] = new(r, b)
            self.lokr_w2_b[adapter] = new(r, d)
        else:
            self.lokr_w2_a[adapter] = new(b, r)
            self.lokr_w2_b[adapter] = new(r, d * math.prod(kernel))
        self._record(adapter, config, r, alpha)
        self.rank_dropout_scale[adapter] = bool(config.rank_dropout_scale)
        self._sides[adapter] = (a, b, c, d)
        if torch.device(fk["device"]).type != "meta":
            self.reset_parameters(adapter, config.init_weights)

    @torch.no_grad()
    def reset_parameters(self, adapter: str, init: bool | str) -> None:
        """True: W1 (or W1's ``_a``) zero; "lycoris": W2 (or W2's ``_b``) zero; False: all random.

        Tensors are drawn in PEFT's order (W1 side, W2 side, core), so one seed gives one adapter.
        """

        def kaiming(p: torch.Tensor) -> None:
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))

        w1_zero = init is True
        w2_zero = init == "lycoris"
        if adapter in self.lokr_w1:
            self.lokr_w1[adapter].zero_() if w1_zero else kaiming(self.lokr_w1[adapter])
        else:
            self.lokr_w1_a[adapter].zero_() if w1_zero else kaiming(self.lokr_w1_a[adapter])
            kaiming(self.lokr_w1_b[adapter])
        if adapter in self.lokr_w2:
            self.lokr_w2[adapter].zero_() if w2_zero else kaiming(self.lokr_w2[adapter])
        elif w2_zero:
            self.lokr_w2_b[adapter].zero_()
            kaiming(self.lokr_w2_a[adapter])
        else:
            kaiming(self.lokr_w2_a[adapter])
            kaiming(self.lokr_w2_b[adapter])
        if adapter in self.lokr_t2:
            kaiming(self.lokr_t2[adapter])

    # ------------------------------------------------------------------ factors
    def _w1(self, adapter: str) -> torch.Tensor:
        if adapter in self.lokr_w1:
            return self.lokr_w1[adapter]
        return self.lokr_w1_a[adapter] @ self.lokr_w1_b[adapter]  # (a, c)

    def _w2(self, adapter: str) -> torch.Tensor:
        """W2 as (b, d) for linear layers, (b, d, *k) for convolutions."""
        _, b, _, d = self._sides[adapter]
        if adapter in self.lokr_w2:
            return self.lokr_w2[adapter]
        if adapter in self.lokr_t2:
            w2 = cp_weight(self.lokr_t2[adapter], self.lokr_w2_a[adapter], self.lokr_w2_b[adapter])
        else:
            w2 = self.lokr_w2_a[adapter] @ self.lokr_w2_b[adapter]  # (b, d·prod(k))
        return w2.reshape(b, d, *self._kernel)

    def _scrambled(self, adapter: str) -> bool:
        """A full 3-D ``lokr_w2`` on a Conv1d: PEFT's ``kron`` of a 2-D W1 with it broadcasts W1 as
        (1, a, c), so its ΔW is that (b, a·d, c·k) product reshaped to (out, in, k). The file means
        that layout, so peftkit follows it (and forms ΔW for this case)."""
        return self.ops.conv_dim == 1 and adapter in self.lokr_w2

    # ------------------------------------------------------------------ math
    def delta_weight(self, adapter: str) -> torch.Tensor:
        # Kronecker products as broadcast outer products (torch.kron rejects some strided inputs)
        w1, w2 = self._w1(adapter), self._w2(adapter)
        if self._scrambled(adapter):  # kron((1, a, c), (b, d, k)) = (b, a·d, c·k), read as (out, in·k)
            delta = torch.einsum("ip,jqk->jiqpk", w1, w2)
        else:  # kron((a, c), (b, d·prod(k))) = (a·b, c·d·prod(k))
            delta = torch.einsum("ip,jq->ijpq", w1, w2.reshape(w2.shape[0], -1))
        return delta.reshape(self.out_features, -1) * self.scaling[adapter]

    def adapt(self, adapter: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self._skip_module(adapter):
            return out  # module dropout: the adapter sits this forward out
        dtype = self.adapter_dtype()
        x = x.to(dtype)
        y = self._linear_delta(adapter, x) if self.ops.kind == "linear" else self._conv_delta(adapter, x)
        p = self.rank_dropout[adapter]
        if self.training and p:
            keep = (torch.rand(self.out_features) > p).to(device=y.device, dtype=y.dtype)
            if self.rank_dropout_scale[adapter]:
                keep = keep / keep.mean().clamp_min(1e-12)  # (PEFT gives NaN when all are dropped)
            feature_dim = 1 if self.ops.kind == "linear" else 1 + self.ops.conv_dim
            y = y * keep.view(-1, *([1] * (feature_dim - 1)))
        return out + y.to(out.dtype)

    def fused_forward(self, adapter: str, x: torch.Tensor) -> torch.Tensor | None:
        """Plain linear layers: the base op and LoKr in one autograd node (``kernels.lokr``)."""
        dropouts = self.training and (self.module_dropout.get(adapter) or self.rank_dropout.get(adapter))
        if adapter not in self._sides or dropouts:
            return None  # the dropouts take the general path
        base = self.fusable_base(x, *self.adapter_parameters(adapter))
        if base is None:
            return None
        w1 = self._w1(adapter) * self.scaling[adapter]
        return lokr_linear(x, *base, w1, self._w2(adapter), self._w2_first(adapter))

    def _w2_first(self, adapter: str) -> bool:
        """Whether X W2ᵀ then W1 (N·c·b·(d + a) multiply-adds) is cheaper than W1 X then W2ᵀ (N·a·d·(c + b))."""
        a, b, c, d = self._sides[adapter]
        return c * b * (d + a) <= a * d * (c + b)

    def _linear_delta(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """(..., c·d) -> (..., a·b): vec(W1 X W2ᵀ), in the cheaper of the two orders."""
        a, b, c, d = self._sides[adapter]
        w1 = self._w1(adapter) * self.scaling[adapter]  # the scale on the small factor: no activation-sized pass
        w2 = self._w2(adapter)
        xs = x.reshape(-1, c, d)  # (N, c, d)
        if self._w2_first(adapter):
            y = torch.matmul(w1, xs @ w2.t())  # (N, c, b) -> (N, a, b)
        else:
            y = torch.matmul(w1, xs) @ w2.t()  # (N, a, d) -> (N, a, b)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _conv_delta(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """(N, c·d, *S) -> (N, a·b, *S'): W1 mixes the c channel groups, W2 convolves d -> b channels."""
        base = self.base_layer
        if self._groups != 1 or self._scrambled(adapter):  # ΔW is formed (small: one conv kernel)
            return base._conv_forward(x, self.delta_weight(adapter).view(base.weight.shape), None)
        a, b, c, d = self._sides[adapter]
        w1 = self._w1(adapter) * self.scaling[adapter]  # (a, c), scaled: no activation-sized pass
        w2 = self._w2(adapter)  # (b, d, *k)
        unbatched = x.dim() == self.ops.conv_dim + 1
        if unbatched:
            x = x.unsqueeze(0)
        n, spatial = x.shape[0], x.shape[2:]
        xs = x.reshape(n, c, d, *spatial)
        if a <= c:  # mix first: the convolution then runs on n·a images
            z = torch.einsum("ij,nj...->ni...", w1, xs).reshape(n * a, d, *spatial)
            y = base._conv_forward(z, w2, None)  # (n·a, b, *S')
            y = y.reshape(n, a * b, *y.shape[2:])
        else:  # convolve first: n·c images
            y = base._conv_forward(xs.reshape(n * c, d, *spatial), w2, None)  # (n·c, b, *S')
            y = y.reshape(n, c, b, *y.shape[2:])
            y = torch.einsum("ij,nj...->ni...", w1, y).reshape(n, a * b, *y.shape[3:])
        return y.squeeze(0) if unbatched else y
