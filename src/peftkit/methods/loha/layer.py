"""LoHa's math on the engine: ``out = base(x) + scale · ((W1a W1b) ⊙ (W2a W2b)) x``.

The Hadamard product of two rank-r matrices factors through their face-splitting
(row-wise Khatri–Rao) products: with ``U[i, (a, b)] = W1a[i, a] · W2a[i, b]`` (out, r²)
and ``V[(a, b), j] = W1b[a, j] · W2b[b, j]`` (r², in), ``ΔW = U V``. So the update can run as
two thin products ``(x Vᵀ) Uᵀ`` (the *bypass*, N·r²·(in+out) multiply-adds for N rows) or
by forming ΔW (2r·in·out) and folding it into the base GEMM, ``x (W + ΔW)ᵀ`` (the *dense*
path: no extra GEMM in forward; in training one more, ``gᵀx``, for ΔW's gradient). The
cheaper one is picked per call from the FLOP counts (``_bypass_is_cheaper``). The dense
path runs through ``_FoldedHada``, which keeps only x and the factors for backward and
recomputes the out×in products there, so no out×in tensor lives between forward and backward.

Measured on CPU (2 threads, float32, r=16, one layer with a frozen base weight; best of 30
runs on a shared machine, so ±30%; "train" is forward + backward with the input's gradient):

    ================  ======  =====================  =====================  ==================
    layer (in → out)  tokens  infer: dense | bypass  train: dense | bypass  FLOP rule picks
    ================  ======  =====================  =====================  ==================
    512 → 512         512     1.8 ms | 3.1 ms        6.1 ms | 8.5 ms        dense (both)
    512 → 1376        512     4.5 ms | 7.3 ms        15.8 ms | 18.0 ms      dense (both)
    1376 → 512        512     5.4 ms | 6.8 ms        15.7 ms | 18.0 ms      dense (both)
    512 → 512         4       0.27 ms | 0.21 ms      1.3 ms | 0.73 ms       bypass (both)
    512 → 1376        4       0.74 ms | 0.40 ms      4.0 ms | 1.6 ms        bypass (both)
    1376 → 512        4       2.7 ms | 0.70 ms       8.7 ms | 2.8 ms        bypass (both)
    ================  ======  =====================  =====================  ==================

(HF PEFT, which forms ΔW and runs a second GEMM, took 4.4 / 13.9 ms at 512 → 512 and
9.1 / 24.6 ms at 512 → 1376 with 512 tokens.) So at r=16 with 512 tokens folding ΔW into the
base GEMM wins — the bypass pays N·r²·(in+out) while forming ΔW costs 2r·in·out once, whatever
N — and for a few tokens (decoding) the thin products win; the FLOP rule chose the faster
path in every measured case. It underweights the memory-bound Hadamard of the dense path,
so near the boundary (512 → 1376 training) the two paths are within noise of each other.

Convolutions: without ``use_effective_conv2d`` the factors are (out, r) and
(r, in·prod(k)), so the bypass is a convolution to r² channels with V as kernel followed by
a 1×1 convolution with U. With the CP form (PEFT's ``hada_t1``/``hada_t2``,
``hada_w*_a`` (r, out), ``hada_w*_b`` (r, in)) ΔW is U ×₁ T ×₂ V with the core
``T[(i, i'), (j, j')] = t1[i, j] · t2[i', j']`` (r², r², *k): a 1×1, a k×k and a 1×1 convolution.
Grouped convolutions form ΔW (one kernel, small). Gradients of the CP form come from
autograd: PEFT's hand-written CP backward returns wrong gradients for ``hada_w1_a`` and
``hada_w2_a`` (forward and the other four agree), so training with it differs from PEFT there.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.autocast import autocast_apply
from ..lycoris import LycorisLayer


# ---------------------------------------------------------------------- pure math
def face_split_rows(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """(m, r), (m, s) -> (m, r·s): row i is kron(a1[i], a2[i])."""
    return (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)


def face_split_cols(b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """(r, n), (s, n) -> (r·s, n): column j is kron(b1[:, j], b2[:, j])."""
    return (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])


def hada_delta(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor) -> torch.Tensor:
    """(w1a @ w1b) ⊙ (w2a @ w2b), unscaled, (out, fan_in)."""
    return (w1a @ w1b) * (w2a @ w2b)


def cp_rebuild(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """A CP factor: core (r, r, *k), wa (r, out), wb (r, in) -> (out, in, *k)."""
    return torch.einsum("ij...,ip,jq->pq...", t, wa, wb)


class _FoldedHada(torch.autograd.Function):
    """``F.linear(x, W + diag(s) · (w1a w1b ⊙ w2a w2b), bias)`` saving only x and the factors.

    ``W`` and ``bias`` may be None (the update alone); ``s`` is the (out,) per-row scale
    (alpha / r, times the rank-dropout mask in training).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, s, w1a, w1b, w2a, w2b):  # type: ignore[override]
        w = hada_delta(w1a, w1b, w2a, w2b).mul_(s[:, None])
        if weight is not None:
            w.add_(weight)
        ctx.save_for_backward(x, weight, s, w1a, w1b, w2a, w2b)
        ctx.has_bias = bias is not None
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, weight, s, w1a, w1b, w2a, w2b = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_factors = any(ctx.needs_input_grad[4:])
        out_f = g.shape[-1]
        g2 = g.reshape(-1, out_f)  # (N, out)
        p1, p2 = w1a @ w1b, w2a @ w2b  # recomputed: (out, in) each
        grad_x = grad_w = grad_b = None
        g1a = g1b = g2a = g2b = None
        if need_x:
            w = (p1 * p2).mul_(s[:, None])
            if weight is not None:
                w.add_(weight)
            grad_x = (g2 @ w).reshape(x.shape)
            del w
        if need_w or need_factors:
            gw = g2.t() @ x.reshape(-1, x.shape[-1])  # (out, in)
            if need_w:
                grad_w = gw
            if need_factors:
                gw = gw * s[:, None]
                t = gw * p2
                g1a, g1b = t @ w1b.t(), w1a.t() @ t
                t = gw.mul_(p1)
                g2a, g2b = t @ w2b.t(), w2a.t() @ t
        if need_b and ctx.has_bias:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b, None, g1a, g1b, g2a, g2b


class _HadaWeight(torch.autograd.Function):
    """ΔW = (w1a w1b) ⊙ (w2a w2b), keeping only the factors for backward (for convolution kernels)."""

    @staticmethod
    def forward(ctx, w1a, w1b, w2a, w2b):  # type: ignore[override]
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        return hada_delta(w1a, w1b, w2a, w2b)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        t = g * (w2a @ w2b)
        g1a, g1b = t @ w1b.t(), w1a.t() @ t
        t = g * (w1a @ w1b)
        return g1a, g1b, t @ w2b.t(), w2a.t() @ t


class LoHaLayer(LycorisLayer):
    """LoHa on an nn.Linear, transformers Conv1D, nn.Conv1d or nn.Conv2d base layer."""

    prefix = "hada_"
    method_name = "LoHa"
    adapter_attrs = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    other_attrs = ("r", "alpha", "scaling", "rank_dropout", "module_dropout")
    # "bypass" or "dense" forces one forward path (tests, benchmarks); None: the cheaper by FLOPs.
    force_path: ClassVar[str | None] = None

    # ------------------------------------------------------------------ create
    def create(self, adapter: str, config: Any, *, r: int, alpha: float, device: Any = None) -> None:
        self._check_rank(adapter, r)
        kernel = self._kernel
        in_dim = self.in_features // self._groups
        effective = bool(config.use_effective_conv2d) and any(k != 1 for k in kernel)
        fk = {"device": device if device is not None else self.base_layer.weight.device, "dtype": self.adapter_dtype()}

        def new(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, **fk))

        out = self.out_features
        if effective:
            core = kernel if len(kernel) == 2 else (*kernel, 1)  # PEFT keeps a Conv1d core 4-D: (r, r, k, 1)
            for i in ("1", "2"):
                getattr(self, f"hada_t{i}")[adapter] = new(r, r, *core)
                getattr(self, f"hada_w{i}_a")[adapter] = new(r, out)
                getattr(self, f"hada_w{i}_b")[adapter] = new(r, in_dim)
        else:
            fan_in = in_dim * math.prod(kernel)
            for i in ("1", "2"):
                getattr(self, f"hada_w{i}_a")[adapter] = new(out, r)
                getattr(self, f"hada_w{i}_b")[adapter] = new(r, fan_in)
        self._record(adapter, config, r, alpha)
        if torch.device(fk["device"]).type != "meta":
            self.reset_parameters(adapter, config.init_weights)

    @torch.no_grad()
    def reset_parameters(self, adapter: str, init: bool) -> None:
        """True: ``hada_w2_b`` zero; False: all random. Drawn in PEFT's order (w1_a, w1_b, w2_a, w2_b, t1, t2)."""
        for attr in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"):
            params = getattr(self, attr)
            if adapter not in params:
                continue
            if init and attr == "hada_w2_b":
                params[adapter].zero_()
            else:
                nn.init.kaiming_uniform_(params[adapter], a=math.sqrt(5))

    def _factors(self, adapter: str) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, a)[adapter] for a in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))

    def _is_cp(self, adapter: str) -> bool:
        return adapter in self.hada_t1

    # ------------------------------------------------------------------ ΔW
    def delta_weight(self, adapter: str) -> torch.Tensor:
        w1a, w1b, w2a, w2b = self._factors(adapter)
        if self._is_cp(adapter):
            delta = cp_rebuild(self.hada_t1[adapter], w1a, w1b) * cp_rebuild(self.hada_t2[adapter], w2a, w2b)
        else:
            delta = hada_delta(w1a, w1b, w2a, w2b)
        return delta.reshape(self.out_features, -1) * self.scaling[adapter]

    def _kernel_delta(self, adapter: str) -> torch.Tensor:
        """ΔW (unscaled) in the base weight's shape, for a convolution, lean in backward."""
        if self._is_cp(adapter):
            w1a, w1b, w2a, w2b = self._factors(adapter)
            delta = cp_rebuild(self.hada_t1[adapter], w1a, w1b) * cp_rebuild(self.hada_t2[adapter], w2a, w2b)
        else:
            delta = _HadaWeight.apply(*self._factors(adapter))
        return delta.reshape(self.base_layer.weight.shape)

    # ------------------------------------------------------------------ choosing a path
    def _rows(self, x: torch.Tensor) -> int:
        """How many positions the update is applied at (rows for a linear layer, output pixels for a conv)."""
        if self.ops.kind == "linear":
            return x.numel() // max(self.in_features, 1)
        base = self.base_layer
        spatial = x.shape[-self.ops.conv_dim:]
        n = x.numel() // max(self.in_features * math.prod(spatial), 1)
        pix = 1
        for size, k, s, p, d in zip(spatial, base.kernel_size, base.stride, _padding(base), base.dilation):
            pix *= max((size + 2 * p - d * (k - 1) - 1) // s + 1, 1)
        return n * pix

    def _bypass_is_cheaper(self, adapter: str, x: torch.Tensor, folded: bool) -> bool:
        """Compare multiply-adds: thin products through r² vs forming ΔW (folded into the base op or not)."""
        if self._groups != 1:
            return False
        if self.force_path is not None:
            return self.force_path == "bypass"
        r = self.r[adapter]
        n = self._rows(x)
        out_f, kk = self.out_features, math.prod(self._kernel)
        in_f = self.in_features
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.adapter_parameters(adapter))
        if self._is_cp(adapter):
            per_row = r * r * (in_f + r * r * kk + out_f)
            build = r * r * (in_f + out_f + r * r * kk)
        else:
            per_row = r * r * (in_f * kk + out_f)
            build = r * r * (in_f * kk + out_f)
        size = out_f * in_f * kk
        bypass = n * per_row * (3 if grad else 1) + build
        dense = size * (2 * r + 2)
        if not folded:
            dense += n * size * (2 if grad else 1)  # the extra GEMM (and its input gradient)
        if grad:
            dense += n * size + 6 * r * size  # ΔW's gradient gᵀx, then the factors' gradients
        return bypass < dense

    def _can_fold(self) -> bool:
        return self.ops.quant is None and self.base_layer.weight.dtype == self.adapter_dtype()

    # ------------------------------------------------------------------ dropout draws (PEFT's order)
    def _row_scale(self, adapter: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(out,) scale per output feature: alpha / r, times the rank-dropout mask in training."""
        s = torch.full((self.out_features,), self.scaling[adapter], device=device, dtype=dtype)
        p = self.rank_dropout[adapter]
        if self.training and p:
            keep = (torch.rand(self.out_features) > p).to(device=device, dtype=dtype)
            s = s * keep / keep.mean().clamp_min(1e-12)  # (PEFT gives NaN when all are dropped)
        return s

    # ------------------------------------------------------------------ forward
    def fused_forward(self, adapter: str, x: torch.Tensor) -> torch.Tensor | None:
        """One base op with W + ΔW when that is cheaper than the bypass (same dtype only)."""
        if not self._can_fold() or self._bypass_is_cheaper(adapter, x, folded=True):
            return None
        if self._skip_module(adapter):
            return self.base_layer(x)
        base = self.base_layer
        s = self._row_scale(adapter, x.device, self.adapter_dtype())
        if self.ops.kind == "linear":
            return autocast_apply(_FoldedHada.apply, x, self._weight2d(), base.bias, s, *self._factors(adapter))
        delta = self._kernel_delta(adapter) * s.view(-1, *([1] * (base.weight.dim() - 1)))
        return base._conv_forward(x, base.weight + delta, base.bias)

    def adapt(self, adapter: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self._skip_module(adapter):
            return out
        dtype = self.adapter_dtype()
        x = x.to(dtype)
        s = self._row_scale(adapter, x.device, dtype)
        bypass = self._bypass_is_cheaper(adapter, x, folded=False)
        if self.ops.kind == "linear":
            if bypass:
                w1a, w1b, w2a, w2b = self._factors(adapter)
                u, v = face_split_rows(w1a, w2a), face_split_cols(w1b, w2b)  # (out, r²), (r², in)
                y = (x @ v.t()) @ (u * s[:, None]).t()  # (..., r²) -> (..., out)
            else:
                y = autocast_apply(_FoldedHada.apply, x, None, None, s, *self._factors(adapter))
        else:
            y = self._conv_bypass(adapter, x, s) if bypass else self._conv_dense(adapter, x, s)
        return out + y.to(out.dtype)

    def _conv_dense(self, adapter: str, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        delta = self._kernel_delta(adapter)
        delta = delta * s.view(-1, *([1] * (delta.dim() - 1)))
        return self.base_layer._conv_forward(x, delta, None)

    def _conv_bypass(self, adapter: str, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """(N, in, *S) -> (N, out, *S'): V to r² channels, [the r²×r² core,] then U, each a convolution."""
        base, dim = self.base_layer, self.ops.conv_dim
        conv = F.conv1d if dim == 1 else F.conv2d
        w1a, w1b, w2a, w2b = self._factors(adapter)
        ones = (1,) * dim
        if self._is_cp(adapter):
            r = self.r[adapter]
            u = face_split_cols(w1a, w2a).t()  # (out, r²): U[p, (i, i')] = w1a[i, p] · w2a[i', p]
            v = face_split_cols(w1b, w2b)  # (r², in)
            t1, t2 = self.hada_t1[adapter], self.hada_t2[adapter]
            core = (t1[:, None, :, None] * t2[None, :, None, :]).reshape(r * r, r * r, *t1.shape[2:])
            core = core.reshape(r * r, r * r, *self._kernel)  # a Conv1d core is (.., k, 1) in the file
            z = conv(x, v.reshape(r * r, -1, *ones))  # (N, r², *S), pointwise: commutes with padding
            z = base._conv_forward(z, core, None)  # (N, r², *S')
        else:
            u = face_split_rows(w1a, w2a)  # (out, r²)
            v = face_split_cols(w1b, w2b)  # (r², in·prod(k))
            z = base._conv_forward(x, v.reshape(v.shape[0], -1, *self._kernel), None)  # (N, r², *S')
        return conv(z, (u * s[:, None]).reshape(u.shape[0], -1, *ones))


def _padding(conv: nn.Module) -> tuple[int, ...]:
    p = conv.padding
    if isinstance(p, str):  # "same" keeps the input size, "valid" is no padding
        k = conv.kernel_size
        return tuple((d * (kk - 1)) // 2 for kk, d in zip(k, conv.dilation)) if p == "same" else (0,) * len(k)
    return tuple(p)
