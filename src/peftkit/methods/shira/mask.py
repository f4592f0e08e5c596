"""SHiRA masks: the default random one, drawn fast, and checks for user masks."""

from __future__ import annotations

import hashlib
import math
import threading
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
    return torch.from_numpy(_draw(numel, k, seed).astype(np.int64, copy=False))


def random_indices(shape: tuple[int, int], k: int, seed: int) -> torch.Tensor:
    """A weight's random mask as (2, k) int32 (row, col), in row-major order: ``random_positions`` split."""
    rows_n, cols = shape
    flat = _draw(rows_n * cols, k, seed)  # int32 unless the weight has 2³¹ entries or more
    out = np.empty((2, k), dtype=flat.dtype)
    np.floor_divide(flat, cols, out=out[0])
    np.multiply(out[0], cols, out=out[1])
    np.subtract(flat, out[1], out=out[1])
    return torch.from_numpy(out.astype(np.int32, copy=False))


def _draw(numel: int, k: int, seed: int) -> np.ndarray:
    """The positions behind ``random_positions``, drawn with numpy's SFC64 generator.

    A full ``randperm(numel)`` (PEFT's draw) costs O(numel) per layer, and drawing with repeats
    then sorting costs O(k log k). Here every position is first kept independently with a
    probability a little above ``k / numel`` (see ``_bernoulli_positions``: it comes out sorted,
    in O(k)); given its size, that set is a uniform subset. Dropping a uniform choice of the few
    extra positions (or, rarely, adding missing ones from the rest) leaves a uniform k-subset.
    numpy, not torch: a layer's draw is a dozen small array operations, where numpy's call
    overhead and its generators are about half of torch's.
    """
    if k > numel:
        raise ValueError(f"cannot choose {k} entries out of {numel}")
    rng = _generator(seed)
    if 4 * k >= numel:
        return np.sort(rng.permutation(numel)[:k])
    pos = _bernoulli_positions(rng, numel, min(0.5, (k + 3.0 * math.sqrt(k) + 8.0) / numel))
    extra = pos.size - k
    if extra > 0:
        return pos[_all_but(rng, pos.size, extra)]  # stays sorted
    if extra < 0:
        taken = np.zeros(numel, dtype=bool)
        taken[pos] = True
        rest = np.flatnonzero(~taken)
        return np.sort(np.concatenate([pos, rest[~_all_but(rng, rest.size, -extra)]]))
    return pos


_GENERATORS = threading.local()


def _generator(seed: int) -> np.random.Generator:
    """An SFC64 generator started from a hash of ``seed``: one per thread, re-seeded per draw.

    Setting the state from a BLAKE2b digest costs about a tenth of building a generator from
    a seed (numpy's SeedSequence), which is a tenth of a layer's draw.
    """
    rng = getattr(_GENERATORS, "rng", None)
    if rng is None:
        rng = _GENERATORS.rng = np.random.Generator(np.random.SFC64(0))
    digest = hashlib.blake2b(int(seed).to_bytes(16, "little", signed=True), digest_size=24).digest()
    words = np.frombuffer(digest + (1).to_bytes(8, "little"), dtype="<u8")  # a, b, c and the counter w = 1
    rng.bit_generator.state = {"bit_generator": "SFC64", "state": {"state": words.astype(np.uint64)},
                               "has_uint32": 0, "uinteger": 0}
    return rng


def _bernoulli_positions(rng: np.random.Generator, numel: int, p: float) -> np.ndarray:
    """Every position of ``[0, numel)`` kept independently with probability ``p``, sorted.

    int32 while the positions surely fit (``numel`` below about 2³⁰), else int64.

    The gaps between kept positions are 1 + Geometric(p): ``1 + floor(E / λ)`` with E ~ Exp(1)
    and λ = -log(1 - p). E is ``-log(U)`` for U = (x + 1) / 2³² from 32 random bits x, computed
    in float32 (a gap's law is off by ~1e-7 relative; half the memory traffic of float64, and
    two draws per 64-bit output of the generator).
    """
    inv = -1.0 / math.log1p(-p)  # 1 / λ
    top = np.float32(32 * math.log(2.0) * inv)  # -log(U) / λ = (32 log 2 - log(x + 1)) / λ
    bits = rng.bit_generator
    # a block can end past numel by 2 % + 32 / p at most (nearly surely): int32 when that fits
    dtype = np.int32 if 2 * numel + 64 / p < 2**31 else np.int64
    parts, last = [], -1
    while last < numel - 1:
        n = int((numel - 1 - last) * p * 1.02) + 32  # enough gaps to pass the end, nearly always
        u = bits.random_raw((n + 1) // 2).view(np.uint32).astype(np.float32)
        u += 1
        np.log(u, out=u)
        u *= np.float32(-inv)
        u += top  # >= -1e-5 from rounding: truncates to gap 0 like the values in [0, 1)
        gaps = u.astype(np.int32)
        gaps += 1
        pos = np.cumsum(gaps, dtype=dtype)
        pos += last
        parts.append(pos)
        last = int(pos[-1])
    pos = np.concatenate(parts) if len(parts) > 1 else parts[0]
    return pos[: int(np.searchsorted(pos, numel))]


def _all_but(rng: np.random.Generator, n: int, drop: int) -> np.ndarray:
    """A boolean mask over ``n`` items with ``drop`` of them, a uniform choice, set False.

    Draws with repeats until ``drop`` distinct items are hit (each round asks only for the number
    still missing, so it never overshoots): the same set as one-at-a-time rejection, so uniform.
    """
    keep = np.ones(n, dtype=bool)
    dropped = 0
    while dropped < drop:
        keep[rng.integers(0, n, drop - dropped)] = False
        dropped = n - int(np.count_nonzero(keep))
    return keep


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
