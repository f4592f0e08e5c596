"""A LoKr linear layer as one autograd node: ``y = x Wᵀ + bias + vec(W1 X W2ᵀ)``.

Each row of ``x`` is read as a (c, d) matrix X, and ``kron(W1, W2) vec(X) = vec(W1 X W2ᵀ)`` with
W1 (a, c), W2 (b, d), out = a·b, in = c·d. Unlike LoRA's rank-r middle, the middle product here
is as large as the activations, so what costs is the passes over it. Through ``torch.matmul``
the W1 side becomes a transpose copy, a thin GEMM and another copy back, and the result one more
add. Here the W1 side is a batched product with W1 broadcast (no copy), and both sides write
straight into the base output (``baddbmm_`` / ``addmm_``) in forward and into the base input
gradient in backward. It saves what autograd would: the input (shared with the base layer) and
the middle product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .autocast import autocast_apply


class _LoKrLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, w1, w2, w2_first):  # type: ignore[override]
        (a, c), (b, d) = w1.shape, w2.shape
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (n, c·d)
        n = x2.shape[0]
        out = F.linear(x2, weight, bias)  # (n, a·b)
        if w2_first:  # Z = X W2ᵀ (n, c, b), then out += W1 Z
            z = torch.mm(x2.view(n * c, d), w2.t()).view(n, c, b)
            out.view(n, a, b).baddbmm_(w1.expand(n, a, c), z)
        else:  # Z = W1 X (n, a, d), then out += Z W2ᵀ
            z = torch.bmm(w1.expand(n, a, c), x2.view(n, c, d))
            out.view(n * a, b).addmm_(z.view(n * a, d), w2.t())
        ctx.save_for_backward(x2, weight, w1, w2, z)
        ctx.w2_first = w2_first
        ctx.x_shape = x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x2, weight, w1, w2, z = ctx.saved_tensors
        (a, c), (b, d) = w1.shape, w2.shape
        g = grad.reshape(-1, grad.shape[-1]).contiguous()  # (n, a·b)
        n = g.shape[0]
        need_x, need_w1, need_w2 = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        grad_x = grad_w1 = grad_w2 = None
        if ctx.w2_first:
            dz = torch.bmm(w1.t().expand(n, c, a), g.view(n, a, b))  # (n, c, b)
            if need_x:
                grad_x = torch.mm(g, weight)
                grad_x.view(n * c, d).addmm_(dz.view(n * c, b), w2)
            if need_w1:
                grad_w1 = torch.bmm(g.view(n, a, b), z.transpose(1, 2)).sum(0)  # Σ_t G_t Z_tᵀ
            if need_w2:
                grad_w2 = torch.mm(dz.view(n * c, b).t(), x2.view(n * c, d))
        else:
            dz = torch.mm(g.view(n * a, b), w2).view(n, a, d)  # (n, a, d)
            if need_x:
                grad_x = torch.mm(g, weight)
                grad_x.view(n, c, d).baddbmm_(w1.t().expand(n, c, a), dz)
            if need_w1:
                grad_w1 = torch.bmm(dz, x2.view(n, c, d).transpose(1, 2)).sum(0)  # Σ_t dZ_t X_tᵀ
            if need_w2:
                grad_w2 = torch.mm(g.view(n * a, b).t(), z.view(n * a, d))
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, None, None, grad_w1, grad_w2, None


def lokr_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, w1: torch.Tensor, w2: torch.Tensor,
    w2_first: bool,
) -> torch.Tensor:
    """``F.linear(x, weight, bias) + x kron(w1, w2)ᵀ`` for a frozen ``weight`` and ``bias``, never forming the kron.

    Under ``torch.autocast`` every tensor runs in autocast's dtype, as the unfused ops would.

    Args:
        x: input (..., c·d).
        weight: the frozen base weight (a·b, c·d) (a transposed view is fine).
        bias: the frozen base bias (a·b,) or None.
        w1: (a, c), the scale already applied.
        w2: (b, d).
        w2_first: multiply by W2 first (the middle product is (n, c, b)), else by W1 first ((n, a, d)).
    """
    return autocast_apply(_LoKrLinear.apply, x, weight, bias, w1, w2, w2_first)


def lokr_linear_reference(x, weight, bias, w1, w2, w2_first=True):
    """The definition ``lokr_linear`` must match (``w2_first`` changes only the order of the work)."""
    return F.linear(x, weight, bias) + F.linear(x, torch.kron(w1, w2))
