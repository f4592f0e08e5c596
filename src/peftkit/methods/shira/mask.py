"""SHiRA masks: the default random one, drawn fast, and checks for user masks."""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn


def layer_seed(seed: int | None, name: str) -> int:
    """One seed per (adapter seed, layer name), so layers and seeds get independent masks."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())  # follows torch.manual_seed
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def random_positions(numel: int, k: int, seed: int) -> torch.Tensor:
    """``k`` distinct positions in ``[0, numel)``, uniform over k-subsets, sorted; deterministic in ``seed``.

    A full ``randperm(numel)`` (PEFT's draw) costs O(numel) per layer, and drawing with repeats
    then sorting costs O(k log k). Here every position is first kept independently with a
    probability a little above ``k / numel``, walking the weight by geometric gaps (a Bernoulli
    process comes out sorted, in O(k)); given its size, that set is a uniform subset. Dropping
    a uniform choice of the few extra positions (or, rarely, adding missing ones from the rest)
    leaves a uniform k-subset.
    """
    if k > numel:
        raise ValueError(f"cannot choose {k} entries out of {numel}")
    gen = torch.Generator().manual_seed(seed)
    if 4 * k >= numel:
        return torch.randperm(numel, generator=gen)[:k].sort().values
    p = min(0.5, (k + 4.0 * math.sqrt(k) + 8.0) / numel)
    log_q = math.log1p(-p)
    parts, last = [], -1
    while last < numel - 1:  # positions = last + running sum of Geometric(p) gaps
        n = int((numel - 1 - last) * p * 1.02) + 32
        u = torch.rand(n, generator=gen, dtype=torch.float64)
        gaps = torch.log1p(-u).div_(log_q).floor_().add_(1).to(torch.int64)
        pos = gaps.cumsum_(0).add_(last)
        parts.append(pos)
        last = int(pos[-1])
    pos = torch.cat(parts) if len(parts) > 1 else parts[0]
    pos = pos[: int(torch.searchsorted(pos, numel))]
    extra = pos.numel() - k
    if extra > 0:
        keep = torch.ones(pos.numel(), dtype=torch.bool)
        keep[_distinct(pos.numel(), extra, gen)] = False
        return torch.masked_select(pos, keep)  # stays sorted
    if extra < 0:
        taken = torch.zeros(numel, dtype=torch.bool)
        taken[pos] = True
        rest = (~taken).nonzero().squeeze(1)
        add = rest[_distinct(rest.numel(), -extra, gen)]
        return torch.cat([pos, add]).sort().values
    return pos


def _distinct(n: int, m: int, gen: torch.Generator) -> torch.Tensor:
    """``m`` distinct values of ``[0, n)``, a uniform choice (unsorted)."""
    if 4 * m >= n:
        return torch.randperm(n, generator=gen)[:m]
    got = torch.empty(0, dtype=torch.int64)
    while got.numel() < m:
        got = torch.unique(torch.cat([got, torch.randint(n, (m - got.numel() + 8,), generator=gen)]))
    return got[torch.randperm(got.numel(), generator=gen)[:m]]


def random_mask(base_layer: nn.Module, r: int, random_seed: int | None = None, **kwargs: object) -> torch.Tensor:
    """The default mask as a dense 0/1 tensor shaped like ``base_layer.weight`` (for users' own mask code).

    peftkit itself never builds this tensor: it draws the same positions directly (pass the
    layer's module ``name`` to get the mask peftkit draws for that layer).
    """
    weight = base_layer.weight
    k = r * sum(weight.shape)
    flat = random_positions(weight.numel(), k, layer_seed(random_seed, str(kwargs.get("name", "")))).to(weight.device)
    mask = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
    mask[flat] = 1
    return mask.view(weight.shape)


def positions_from_mask(mask: torch.Tensor, weight: torch.Tensor, k: int, where: str) -> torch.Tensor:
    """Check a user mask and return its ones as (2, k) int32 (row, col) in the weight's layout."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"SHiRA mask_fn returned a {type(mask).__name__} for {where}; return a torch.Tensor.")
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(
            f"SHiRA mask for {where} has shape {tuple(mask.shape)}; it must match the weight, {tuple(weight.shape)}."
        )
    ones = mask == 1
    if not bool((ones | (mask == 0)).all()):
        raise ValueError(f"SHiRA mask for {where} is not binary: use only 0 and 1.")
    count = int(ones.sum())
    if count != k:
        raise ValueError(
            f"SHiRA mask for {where} has {count} ones; it must have r·(m+n) = {k} (r={k // sum(weight.shape)})."
        )
    rows, cols = torch.nonzero(ones, as_tuple=True)
    return torch.stack([rows, cols]).to(torch.int32)
