"""Model-merging primitives on plain tensors: task arithmetic, TIES, DARE, magnitude pruning.

Every function takes a list of same-shaped "task tensors" (one per adapter: a weight delta,
or one LoRA factor) and one weight per tensor, and returns one merged tensor. They know
nothing about modules, so any weight-space method (LoRA, SHiRA, ...) can use them.

The semantics are PEFT's (``peft.utils.merge_utils``), so that a merge gives the same
numbers in both libraries:

- pruning keeps a ``density`` fraction of the entries of each task tensor *before* the
  weights are applied: the largest ``int(density * numel)`` magnitudes (TIES, magnitude
  prune), or a Bernoulli(density) random subset rescaled by ``1 / density`` (DARE);
- TIES elects, per entry, the sign whose pruned values sum larger (``"total"``) or occur more
  often (``"frequency"``), then averages the *weighted* values that carry that sign
  (a disjoint mean: entries where no task agrees become 0);
- the "linear" kinds (task arithmetic, DARE-linear, magnitude prune) sum the weighted
  tensors.

One deliberate difference: DARE with ``density == 0`` gives zeros (everything is dropped),
where PEFT divides 0 by 0 and returns NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

SignMethod = Literal["total", "frequency"]
SIGN_METHODS = ("total", "frequency")


def _weights_like(weights: Sequence[float] | torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """Weights as a tensor that broadcasts over a stack of task tensors: (n, 1, ..., 1)."""
    w = torch.as_tensor(weights, dtype=stacked.dtype, device=stacked.device)
    if w.dim() != 1 or w.shape[0] != stacked.shape[0]:
        raise ValueError(f"Expected one weight per task tensor ({stacked.shape[0]}), got shape {tuple(w.shape)}.")
    return w.view(-1, *([1] * (stacked.dim() - 1)))


def _check_density(density: float) -> None:
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density is the fraction of entries to keep and must be in [0, 1], got {density}.")


def magnitude_prune_tensor(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude, zero the rest."""
    _check_density(density)
    if density >= 1.0:
        return tensor
    k = int(density * tensor.numel())
    flat = tensor.reshape(-1)
    keep = torch.zeros_like(flat)
    if k > 0:
        keep[torch.topk(flat.abs(), k=k, largest=True).indices] = 1
    return tensor * keep.view(tensor.shape)


def random_prune_tensor(tensor: torch.Tensor, density: float, rescale: bool = True) -> torch.Tensor:
    """Keep each entry with probability ``density`` (DARE); ``rescale`` divides the survivors by it.

    The mask is drawn with ``torch.bernoulli`` from the global generator, one draw per entry in
    the tensor's logical (row-major) order whatever its strides, as PEFT does: given the same
    seed and a tensor of the same shape, the mask is PEFT's.
    """
    _check_density(density)
    if density >= 1.0:
        return tensor
    if density == 0.0:
        return torch.zeros_like(tensor)
    kept = tensor * torch.bernoulli(torch.full_like(tensor, density))
    return kept / density if rescale else kept


def prune(
    tensor: torch.Tensor, density: float, method: Literal["magnitude", "random"], rescale: bool = False
) -> torch.Tensor:
    """Prune one task tensor by magnitude or at random (see the two functions above)."""
    if method == "magnitude":
        return magnitude_prune_tensor(tensor, density)
    if method == "random":
        return random_prune_tensor(tensor, density, rescale=rescale)
    raise ValueError(f"Unknown pruning method {method!r}: use 'magnitude' or 'random'.")


def majority_sign_mask(stacked: torch.Tensor, method: SignMethod = "total") -> torch.Tensor:
    """Boolean mask (same shape as ``stacked``) of entries whose sign is the elected one.

    Args:
        stacked: task tensors stacked on dim 0.
        method: "total" elects the sign of the sum of values, "frequency" the sign held by
            more tasks; a tie elects +. Zeros (pruned entries) never match.
    """
    sign = stacked.sign()
    if method == "total":
        score = stacked.sum(dim=0)
    elif method == "frequency":
        score = sign.sum(dim=0)
    else:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {method!r}.")
    elected = torch.where(score >= 0, 1.0, -1.0).to(sign.dtype)
    return sign == elected


def disjoint_merge(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0 of the entries the mask keeps (0 where it keeps none)."""
    total = (weighted * mask).sum(dim=0)
    count = mask.sum(dim=0).clamp(min=1)
    return total / count


def task_arithmetic(tensors: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """``sum_i w_i * t_i``."""
    stacked = torch.stack(list(tensors), dim=0)
    return (stacked * _weights_like(weights, stacked)).sum(dim=0)


def magnitude_prune(
    tensors: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor, density: float
) -> torch.Tensor:
    """Task arithmetic over magnitude-pruned task tensors."""
    return task_arithmetic([magnitude_prune_tensor(t, density) for t in tensors], weights)


def dare_linear(
    tensors: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor, density: float
) -> torch.Tensor:
    """Task arithmetic over DARE-pruned (random drop, rescaled) task tensors."""
    return task_arithmetic([random_prune_tensor(t, density, rescale=True) for t in tensors], weights)


def _ties_merge(
    pruned: list[torch.Tensor], weights: Sequence[float] | torch.Tensor, method: SignMethod
) -> torch.Tensor:
    stacked = torch.stack(pruned, dim=0)
    mask = majority_sign_mask(stacked, method)  # elected on the unweighted pruned values, as PEFT
    return disjoint_merge(stacked * _weights_like(weights, stacked), mask)


def ties(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor,
    density: float,
    majority_sign_method: SignMethod = "total",
) -> torch.Tensor:
    """TIES: trim each tensor to its top-``density`` magnitudes, elect signs, disjoint mean."""
    return _ties_merge([magnitude_prune_tensor(t, density) for t in tensors], weights, majority_sign_method)


def dare_ties(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor,
    density: float,
    majority_sign_method: SignMethod = "total",
) -> torch.Tensor:
    """DARE pruning (random drop, rescaled) followed by TIES sign election and disjoint mean."""
    return _ties_merge([random_prune_tensor(t, density, rescale=True) for t in tensors], weights, majority_sign_method)


__all__ = [
    "SIGN_METHODS",
    "dare_linear",
    "dare_ties",
    "disjoint_merge",
    "magnitude_prune",
    "magnitude_prune_tensor",
    "majority_sign_mask",
    "prune",
    "random_prune_tensor",
    "task_arithmetic",
    "ties",
]
