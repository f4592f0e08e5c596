"""SHiRA masks: the default random one, drawn fast, and checks for user masks."""

from __future__ import annotations

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

    A full ``randperm(numel)`` costs O(numel) per layer. When ``k`` is a small fraction of
    ``numel``, iid draws with the repeats removed (``unique``) are a uniform subset of their
    size; a few extra draws, then a uniform choice of ``k`` among them, give the k-subset in
    O(k log k).
    """
    if k > numel:
        raise ValueError(f"cannot choose {k} entries out of {numel}")
    gen = torch.Generator().manual_seed(seed)
    if 4 * k >= numel:
        return torch.randperm(numel, generator=gen)[:k].sort().values
    picked = torch.empty(0, dtype=torch.int64)
    while picked.numel() < k:
        need = k - picked.numel()
        draws = torch.randint(numel, (need + need // 8 + 16,), generator=gen)
        picked = torch.unique(torch.cat([picked, draws]))
    if picked.numel() > k:
        picked = picked[torch.randperm(picked.numel(), generator=gen)[:k]].sort().values
    return picked


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
