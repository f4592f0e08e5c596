"""Block-orthogonal rotations for OFT and BOFT, on activations or on weights, never as d×d matrices.

A rotation here is a stack of ``N`` butterfly factors. Factor ``i`` is a block-diagonal matrix
``BD_i`` (``D`` blocks of ``bs × bs``) seen through a permutation ``P_i`` of the features:
``B_i = P_i · BD_i · P_iᵀ``, and the whole rotation is ``M = B_{N−1} ⋯ B_1 · B_0``. OFT is the
case ``N = 1`` with ``P_0`` the identity. Applying ``M`` to row vectors (``x M``) is a gather of
the features, one batched ``bs × bs`` product per block, and a gather back, per factor:
``O(rows · d · bs)`` work instead of the ``O(rows · d²)`` of a dense ``d × d`` matrix.

The blocks come from a skew-symmetric ``Q`` through the Cayley transform
``R = (I − Q)(I + Q)⁻¹`` (orthogonal), or through a truncated Neumann series for
``(I + Q)(I − Q)⁻¹`` (no solve; nearly orthogonal) — the two forms PEFT's files were trained with.
"""

from __future__ import annotations

from functools import lru_cache

import torch


# ---------------------------------------------------------------------------- skew-symmetric blocks
@lru_cache(maxsize=64)
def _triu(bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = torch.triu_indices(bs, bs, offset=1)
    return rows, cols


def packed_size(bs: int) -> int:
    """Entries of the strict upper triangle of a ``bs × bs`` block: what OFT stores per block."""
    return bs * (bs - 1) // 2


def skew_from_packed(vec: torch.Tensor, bs: int) -> torch.Tensor:
    """(n, bs·(bs−1)/2) strict upper triangles, row-major -> (n, bs, bs) skew-symmetric blocks."""
    rows, cols = _triu(bs)
    rows, cols = rows.to(vec.device), cols.to(vec.device)
    upper = vec.new_zeros(vec.shape[0], bs, bs)
    upper[:, rows, cols] = vec
    return upper - upper.transpose(1, 2)


def packed_from_skew(q: torch.Tensor) -> torch.Tensor:
    """Inverse of ``skew_from_packed``: the strict upper triangles of (n, bs, bs) blocks."""
    rows, cols = _triu(q.shape[-1])
    return q[:, rows.to(q.device), cols.to(q.device)]


def skew_part(r: torch.Tensor) -> torch.Tensor:
    """``(R − Rᵀ) / 2`` over the last two axes (BOFT stores full blocks and uses their skew part)."""
    return 0.5 * (r - r.transpose(-1, -2))


def cayley(q: torch.Tensor, neumann_terms: int | None = None) -> torch.Tensor:
    """Orthogonal blocks from skew-symmetric ``q`` (…, bs, bs).

    Args:
        q: skew-symmetric blocks.
        neumann_terms: None: the exact ``(I − Q)(I + Q)⁻¹`` (one small solve per block).
            An int: the series ``I + 2(Q + Q² + … + Q^{k−1}) + Q^k`` for ``(I + Q)(I − Q)⁻¹``
            with ``k = max(3, terms − 1)`` (``I + 2Q`` for 2 terms, ``I`` for 1): the exact
            expansion PEFT's Cayley–Neumann adapters use, so their files give the same rotation.
    """
    bs = q.shape[-1]
    eye = torch.eye(bs, device=q.device, dtype=q.dtype)
    if neumann_terms is None:
        # R (I + Q) = I − Q, solved from the right for every block at once
        return torch.linalg.solve(eye + q, eye - q, left=False)
    if neumann_terms <= 1:
        return eye.expand_as(q).clone()
    if neumann_terms == 2:
        return torch.add(eye, q, alpha=2.0)
    top = max(3, neumann_terms - 1)
    coef = [1.0] + [2.0] * (top - 1) + [1.0]  # of Q⁰ … Q^top
    return _polynomial(q, coef, eye)


def _polynomial(q: torch.Tensor, coef: list[float], eye: torch.Tensor) -> torch.Tensor:
    """``Σ coef[i] Qⁱ`` in powers of ``Q²`` (Paterson–Stockmeyer with step 2): about half the
    block products of a plain Horner scheme, and every step is one fused ``baddbmm``."""
    q2 = q @ q

    def linear(j: int) -> torch.Tensor | None:  # coef[2j] I + coef[2j+1] Q
        c0 = coef[2 * j] if 2 * j < len(coef) else 0.0
        c1 = coef[2 * j + 1] if 2 * j + 1 < len(coef) else 0.0
        if c1 == 0.0:
            return None if c0 == 0.0 else eye * c0
        return torch.add(eye * c0, q, alpha=c1)

    top = (len(coef) - 1) // 2
    acc = linear(top)
    # acc = c·I when the top term has no Q part: then no product is needed (c known here, not read back)
    identity_multiple = coef[2 * top] if 2 * top + 1 >= len(coef) or coef[2 * top + 1] == 0.0 else None
    for j in range(top - 1, -1, -1):
        low = linear(j)
        if identity_multiple is not None:
            acc = torch.add(low, q2, alpha=identity_multiple)
            identity_multiple = None
        else:
            acc = torch.baddbmm(low.expand_as(q), q2, acc)
    return acc


def inverse_transpose(blocks: torch.Tensor, orthogonal: bool) -> torch.Tensor:
    """``R⁻ᵀ`` of each block: ``R`` itself when the blocks are exactly orthogonal, else a solve."""
    if orthogonal:
        return blocks
    return torch.linalg.inv(blocks.double()).transpose(-1, -2).to(blocks.dtype)


def drop_blocks(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """Multiplicative dropout: ``int(p · D)`` random blocks of one random factor become the identity.

    ``blocks`` is (N, D, bs, bs); with a single shared block (D = 1) nothing is dropped.
    """
    n, d, bs, _ = blocks.shape
    k = int(p * d)
    if k == 0 or d == 1:
        return blocks
    mask = torch.zeros(n, d, 1, 1, device=blocks.device, dtype=blocks.dtype)
    mask[int(torch.randint(0, n, (1,))), torch.randperm(d, device=blocks.device)[:k]] = 1.0
    eye = torch.eye(bs, device=blocks.device, dtype=blocks.dtype)
    return blocks * (1 - mask) + eye * mask


# ---------------------------------------------------------------------------- butterfly permutations
def butterfly_perm(features: int, block_size: int, factor: int) -> torch.Tensor | None:
    """The feature permutation of butterfly factor ``factor`` (0-based; None for the identity).

    Factor ``i`` cuts the features into chunks of ``2^i · block_size`` and each chunk into
    half-blocks of ``block_size / 2``; the even-numbered half-blocks of a chunk come first, then
    the odd ones. So a block of factor ``i`` pairs half-blocks ``2^i`` blocks apart, and after
    ``log2(D)`` factors every feature has met every other one (the Cooley–Tukey pattern).
    Entry ``j`` is the source feature of position ``j`` (``P[j, perm[j]] = 1``).
    """
    if factor == 0:
        return None
    half = block_size // 2
    per_chunk = 2 ** (factor + 1)  # half-blocks in a chunk
    idx = torch.arange(features).view(-1, per_chunk, half)
    order = torch.cat([torch.arange(0, per_chunk, 2), torch.arange(1, per_chunk, 2)])
    return idx[:, order, :].reshape(-1)


def butterfly_perms(features: int, block_size: int, factors: int) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """``(perm, inverse)`` index pairs of every factor (None for an identity factor)."""
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    for i in range(factors):
        perm = butterfly_perm(features, block_size, i)
        out.append(None if perm is None else (perm, torch.argsort(perm)))
    return out


# ---------------------------------------------------------------------------- applying rotations
def rotate_blocks(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x`` (…, D·bs) times the block-diagonal matrix of ``blocks`` (D, bs, bs), or one block shared by all."""
    n, bs, _ = blocks.shape
    rows = x.reshape(-1, x.shape[-1] // bs, bs)  # (T, D, bs)
    if n == 1:
        y = rows @ blocks[0]  # one GEMM over every (row, block) pair
    else:
        y = torch.bmm(rows.transpose(0, 1), blocks).transpose(0, 1)  # (D, T, bs) -> (T, D, bs)
    return y.reshape(x.shape)


def butterfly(x: torch.Tensor, blocks: torch.Tensor, perms: list, transpose: bool = False) -> torch.Tensor:
    """``x M`` (or ``x Mᵀ`` with ``transpose``) for row vectors ``x`` (…, d) and ``M = B_{N−1} ⋯ B_0``.

    ``blocks`` is (N, D, bs, bs) (D may be 1: a shared block); ``perms`` from ``butterfly_perms``.
    ``x M`` applies the last factor first; ``x Mᵀ = x B_0ᵀ ⋯ B_{N−1}ᵀ`` the first factor first.
    """
    order = range(blocks.shape[0]) if transpose else reversed(range(blocks.shape[0]))
    pending: torch.Tensor | None = None  # a gather not applied yet (merged with the next one)
    for i in order:
        b = blocks[i].transpose(-1, -2) if transpose else blocks[i]
        if perms[i] is not None:
            perm, inverse = perms[i]
            inverse = inverse.to(x.device)
            gather = inverse if pending is None else pending[inverse]
            x = x.index_select(-1, gather)
            x = rotate_blocks(x, b)
            pending = perm.to(x.device)
        else:
            if pending is not None:
                x, pending = x.index_select(-1, pending), None
            x = rotate_blocks(x, b)
    if pending is not None:
        x = x.index_select(-1, pending)
    return x
