"""A LoRA linear layer as one autograd node: ``y = x Wᵀ + b + s · (x Aᵀ) Bᵀ``.

Autograd over the unfused graph runs the base linear, the two thin products, a scale and an
add, and in backward adds the base and adapter input-gradients in a separate pass. Here the
adapter is folded into the base output with one ``addmm_`` and, in backward, into the base
input-gradient with another, so no full-size tensor is written twice. It saves the same
tensors autograd would (the input, shared with the base layer, and the thin ``x Aᵀ``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .autocast import autocast_apply


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale):  # type: ignore[override]
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        out = F.linear(x2, weight, bias)  # (N, out)
        h = x2 @ a.t()  # (N, r)
        out.addmm_(h, b.t(), alpha=scale)
        ctx.save_for_backward(x2, weight, a, b, h)
        ctx.scale = scale
        ctx.x_shape = x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x2, weight, a, b, h = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        return (*_linear_lora_grads(ctx, g, x2, weight, a, b, h), None)


def _linear_lora_grads(ctx, g, x2, weight, a, b, h) -> tuple:
    """Gradients of ``x Wᵀ + s·(x Aᵀ) Bᵀ`` at output gradient ``g``: (x, W, bias, A, B, scale) slots."""
    gh = torch.mm(g, b).mul_(ctx.scale)  # (N, r)
    grad_x = grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.mm(g, weight).addmm_(gh, a).view(ctx.x_shape)  # base and adapter paths in one buffer
    if ctx.needs_input_grad[3]:
        grad_a = gh.t() @ x2
    if ctx.needs_input_grad[4]:
        grad_b = torch.mm(g.t(), h).mul_(ctx.scale)
    return grad_x, None, None, grad_a, grad_b


def lora_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, scale: float
) -> torch.Tensor:
    """``F.linear(x, weight, bias) + scale · F.linear(F.linear(x, a), b)`` for a frozen ``weight`` and ``bias``.

    Under ``torch.autocast`` every tensor runs in autocast's dtype, as the unfused ops would.

    Args:
        x: input (..., in).
        weight: the frozen base weight (out, in) (a transposed view is fine).
        bias: the frozen base bias (out,) or None.
        a: LoRA A (r, in).
        b: LoRA B (out, r).
        scale: ``lora_alpha / r``.
    """
    return autocast_apply(_LoraLinear.apply, x, weight, bias, a, b, scale)


def lora_linear_reference(x, weight, bias, a, b, scale):
    """The definition ``lora_linear`` must match."""
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(x, a), b)


class _DoraLinear(torch.autograd.Function):
    """``y = b + f ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ)`` with ``f = m / n`` (n a constant) as one autograd node."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale, magnitude, norm):  # type: ignore[override]
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        t = F.linear(x2, weight)  # (N, out), the direction's output before rescaling
        h = x2 @ a.t()  # (N, r)
        t.addmm_(h, b.t(), alpha=scale)
        f = magnitude / norm  # (out,)
        y = t * f if bias is None else torch.addcmul(bias, t, f)
        ctx.save_for_backward(x2, weight, a, b, h, t, f, norm)
        ctx.scale = scale
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x2, weight, a, b, h, t, f, norm = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        grad_m = (g * t).sum(0).div_(norm) if ctx.needs_input_grad[6] else None
        gt = g * f  # gradient at the direction's output
        return (*_linear_lora_grads(ctx, gt, x2, weight, a, b, h), None, grad_m, None)


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
) -> torch.Tensor:
    """A DoRA linear layer over a frozen ``weight``/``bias``; ``norm`` (out,) is treated as a constant.

    Args:
        x: input (..., in).
        weight: frozen base weight (out, in).
        bias: frozen base bias (out,) or None.
        a: LoRA A (r, in).
        b: LoRA B (out, r).
        scale: the LoRA scaling.
        magnitude: the trained magnitude (out,).
        norm: ``‖W + s·BA‖`` per output row, detached.
    """
    return autocast_apply(_DoraLinear.apply, x, weight, bias, a, b, scale, magnitude, norm)


def dora_linear_reference(x, weight, bias, a, b, scale, magnitude, norm):
    """The definition ``dora_linear`` must match."""
    y = (F.linear(x, weight) + scale * F.linear(F.linear(x, a), b)) * (magnitude / norm.detach())
    return y if bias is None else y + bias
