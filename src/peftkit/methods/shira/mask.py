"""SHiRA masks: the default random one, drawn fast, and checks for user masks."""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch
from torch import nn


def layer_seed(seed: int | None, name: str) -> int:
    """One seed per (adapter seed, layer name), so layers and seeds get independent masks."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())  # follows torch.manual_seed
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def random_positions(numel: int, k: int, seed: int) -> torch.Tensor:
    """``k`` distinct positions in ``[0, numel)``, uniform over k-subsets, sorted int64; deterministic in ``seed``."""
    return torch.from_numpy(_draw(numel, k, seed))


def random_indices(shape: tuple[int, int], k: int, seed: int) -> torch.Tensor:
    """A weight's random mask as (2, k) int32 (row, col), in row-major order: ``random_positions`` split."""
    rows_n, cols = shape
    flat = _draw(rows_n * cols, k, seed)
    out = np.empty((2, k), dtype=np.int64 if rows_n * cols >= 2**31 else np.int32)
    flat = flat.astype(out.dtype, copy=False)
    np.floor_divide(flat, cols, out=out[0])
    np.subtract(flat, out[0] * cols, out=out[1])
    return torch.from_numpy(out.astype(np.int32, copy=False))


def _draw(numel: int, k: int, seed: int) -> np.ndarray:
    """The positions behind ``random_positions``, drawn with numpy's PCG64 generator.

    A full ``randperm(numel)`` (PEFT's draw) costs O(numel) per layer, and drawing with repeats
    then sorting costs O(k log k). Here every position is first kept independently with a
    probability a little above ``k / numel``, walking the weight by geometric gaps (a Bernoulli
    process comes out sorted, in O(k)); given its size, that set is a uniform subset. Dropping
    a uniform choice of the few extra positions (or, rarely, adding missing ones from the rest)
    leaves a uniform k-subset. numpy, not torch, because a layer's draw is a dozen small array
    operations, where numpy's call overhead (and its generator) are about half of torch's:
    0.27 -> 0.16 ms for a 512 x 512 layer, 0.53 -> 0.25 ms for 512 x 1376.
    """
    if k > numel:
        raise ValueError(f"cannot choose {k} entries out of {numel}")
    rng = np.random.default_rng(seed)
    if 4 * k >= numel:
        return np.sort(rng.permutation(numel)[:k])
    p = min(0.5, (k + 4.0 * math.sqrt(k) + 8.0) / numel)
    log_q = math.log1p(-p)
    parts, last = [], -1
    while last < numel - 1:  # positions = last + running sum of Geometric(p) gaps
        n = int((numel - 1 - last) * p * 1.02) + 32
        u = rng.random(n)
        np.negative(u, out=u)
        np.log1p(u, out=u)  # log(1 - u), u in [0, 1): finite
        u /= log_q
        np.floor(u, out=u)
        u += 1
        pos = np.cumsum(u.astype(np.int64))
        pos += last
        parts.append(pos)
        last = int(pos[-1])
    pos = np.concatenate(parts) if len(parts) > 1 else parts[0]
    pos = pos[: int(np.searchsorted(pos, numel))]
    extra = pos.size - k
    if extra > 0:
        keep = np.ones(pos.size, dtype=bool)
        keep[rng.choice(pos.size, extra, replace=False)] = False
        return pos[keep]  # stays sorted
    if extra < 0:
        taken = np.zeros(numel, dtype=bool)
        taken[pos] = True
        rest = np.flatnonzero(~taken)
        return np.sort(np.concatenate([pos, rest[rng.choice(rest.size, -extra, replace=False)]]))
    return pos


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
