"""The block-orthogonal kernels against dense, independent constructions of the same matrices.

Skew blocks from packed triangles, the exact and Neumann Cayley transforms (PEFT's own series
is the oracle), the butterfly permutations (PEFT's ``block_butterfly_perm``), ``rotate_blocks``
and ``butterfly`` against ``x @ M`` with ``M = B_{N-1} ⋯ B_0`` built as dense matrices.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from peftkit.kernels.orthogonal import (
    butterfly, butterfly_perm, butterfly_perms, cayley, drop_blocks, inverse_transpose, packed_from_skew,
    packed_size, rotate_blocks, skew_from_packed, skew_part,
)


def _dense_skew(vec: torch.Tensor, bs: int) -> torch.Tensor:
    """Loop construction: row-major strict upper triangle, mirrored with a minus sign."""
    out = torch.zeros(vec.shape[0], bs, bs, dtype=vec.dtype)
    for n in range(vec.shape[0]):
        k = 0
        for i in range(bs):
            for j in range(i + 1, bs):
                out[n, i, j] = vec[n, k]
                out[n, j, i] = -vec[n, k]
                k += 1
    return out


def _peft_perm(n: int, block_num: int, block_size: int, factor: int) -> torch.Tensor:
    """PEFT's permutation of butterfly factor ``factor`` (0-based), as PEFT's BOFT layer builds it."""
    from peft.tuners.boft.layer import BOFTLayer

    # block_butterfly_perm does not use self; n_butterfly_factor only needs to be non-zero past factor 0
    return BOFTLayer.block_butterfly_perm(None, n, block_num // 2**factor, block_size // 2, max(factor, 1))


def _perm_matrix(perm: torch.Tensor | None, n: int) -> torch.Tensor:
    p = torch.zeros(n, n, dtype=torch.float64)
    idx = torch.arange(n) if perm is None else perm
    p[torch.arange(n), idx] = 1.0  # P[j, perm[j]] = 1
    return p


def _dense_m(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """M = B_{N-1} ⋯ B_0, B_i = P_i blockdiag(blocks[i]) P_iᵀ, with PEFT's permutations."""
    factors, d, bs, _ = blocks.shape
    m = torch.eye(n, dtype=torch.float64)
    for i in range(factors):
        bd = torch.block_diag(*[blocks[i, j if blocks.shape[1] > 1 else 0].double() for j in range(n // bs)])
        p = _perm_matrix(None if i == 0 else _peft_perm(n, n // bs, bs, i), n)
        m = (p @ bd @ p.T) @ m
    return m


@pytest.mark.parametrize("bs", [1, 2, 3, 5, 8])
def test_skew_from_packed_matches_loop_and_inverts(bs):
    vec = torch.randn(4, packed_size(bs), dtype=torch.float64)
    q = skew_from_packed(vec, bs)
    assert packed_size(bs) == bs * (bs - 1) // 2
    assert_close(q, _dense_skew(vec, bs), rtol=0, atol=0)
    assert_close(q, -q.transpose(1, 2), rtol=0, atol=0)
    assert_close(packed_from_skew(q), vec, rtol=0, atol=0)


def test_skew_part():
    r = torch.randn(2, 3, 4, 4)
    s = skew_part(r)
    assert_close(s, -s.transpose(-1, -2))
    assert_close(s + 0.5 * (r + r.transpose(-1, -2)), r)


@pytest.mark.parametrize("bs", [2, 4, 7])
def test_exact_cayley_is_orthogonal_and_matches_formula(bs):
    q = skew_from_packed(torch.randn(5, packed_size(bs), dtype=torch.float64), bs)
    r = cayley(q)
    eye = torch.eye(bs, dtype=torch.float64)
    assert_close(r.transpose(1, 2) @ r, eye.expand_as(r), atol=1e-12, rtol=0)
    assert_close(r, (eye - q) @ torch.linalg.inv(eye + q), atol=1e-12, rtol=0)
    # det +1: a rotation, never a reflection
    assert_close(torch.linalg.det(r), torch.ones(5, dtype=torch.float64), atol=1e-10, rtol=0)
    # zero skew -> identity
    assert_close(cayley(torch.zeros(2, bs, bs)), torch.eye(bs).expand(2, bs, bs), rtol=0, atol=0)


@pytest.mark.parametrize("terms", [1, 2, 3, 4, 5, 6, 9])
@pytest.mark.parametrize("bs", [2, 4, 6])
def test_neumann_matches_peft_series(terms, bs):
    from peft.tuners.oft.layer import OFTRotationModule

    vec = torch.randn(3, packed_size(bs), dtype=torch.float64) * 0.3
    module = OFTRotationModule(3, packed_size(bs), bs, 3 * bs)
    expected = module._cayley_batch(vec, bs, use_cayley_neumann=True, num_neumann_terms=terms)
    got = cayley(skew_from_packed(vec, bs), terms)
    assert_close(got, expected, atol=1e-12, rtol=1e-12)


def test_exact_cayley_matches_peft():
    from peft.tuners.oft.layer import OFTRotationModule

    bs = 5
    vec = torch.randn(3, packed_size(bs)) * 0.5
    module = OFTRotationModule(3, packed_size(bs), bs, 3 * bs)
    expected = module._cayley_batch(vec, bs, use_cayley_neumann=False)
    assert_close(cayley(skew_from_packed(vec, bs)), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale,tol", [(1e-2, 1e-4), (1e-3, 1e-8)])
def test_neumann_nearly_orthogonal_for_small_q(scale, tol):
    bs = 6
    q = skew_from_packed(torch.randn(4, packed_size(bs), dtype=torch.float64) * scale, bs)
    r = cayley(q, 5)
    err = (r.transpose(1, 2) @ r - torch.eye(bs, dtype=torch.float64)).abs().max()
    assert err < tol
    # ... and close to the exact (I + Q)(I - Q)^-1
    eye = torch.eye(bs, dtype=torch.float64)
    assert (r - (eye + q) @ torch.linalg.inv(eye - q)).abs().max() < 10 * scale**4 * bs**4
    # not exactly orthogonal for a large Q: the series is a truncation
    big = cayley(q * 300, 5)
    assert (big.transpose(1, 2) @ big - eye).abs().max() > 1e-3


def test_inverse_transpose():
    bs = 4
    q = skew_from_packed(torch.randn(3, packed_size(bs)), bs)
    exact = cayley(q)
    assert inverse_transpose(exact, True) is exact
    approx = cayley(q, 3)
    assert_close(inverse_transpose(approx, False), torch.linalg.inv(approx).transpose(-1, -2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n,bs,factors",
                         [(16, 4, 2), (16, 2, 4), (24, 2, 3), (32, 4, 3), (48, 6, 3), (8, 8, 1), (12, 2, 2)])
def test_butterfly_perm_matches_peft(n, bs, factors):
    d = n // bs
    if factors > 1 and (d % 2 ** (factors - 1) or bs % 2):
        pytest.skip("not a valid butterfly layout")
    assert butterfly_perm(n, bs, 0) is None
    for i in range(1, factors):
        perm = butterfly_perm(n, bs, i)
        assert torch.equal(perm, _peft_perm(n, d, bs, i)), i
        assert torch.equal(torch.sort(perm).values, torch.arange(n))
    pairs = butterfly_perms(n, bs, factors)
    assert pairs[0] is None and len(pairs) == factors
    for pair in pairs[1:]:
        perm, inv = pair
        assert torch.equal(perm[inv], torch.arange(n))


def test_butterfly_factor_mixes_every_feature():
    """After log2(D)+1 factors every output depends on every input (the butterfly's point)."""
    n, bs = 16, 2
    factors = 4  # D = 8 blocks: log2(8) + 1
    blocks = cayley(skew_part(torch.randn(factors, n // bs, bs, bs, dtype=torch.float64)))
    m = _dense_m(blocks, n)
    assert (m.abs() > 1e-12).all()
    # one factor fewer does not connect everything
    assert not (_dense_m(blocks[:-1], n).abs() > 1e-12).all()


@pytest.mark.parametrize("d,bs", [(3, 4), (1, 5), (6, 2)])
@pytest.mark.parametrize("shared", [False, True])
def test_rotate_blocks_equals_block_diag(d, bs, shared):
    blocks = torch.randn(1 if shared else d, bs, bs, dtype=torch.float64)
    x = torch.randn(2, 3, d * bs, dtype=torch.float64)
    dense = torch.block_diag(*[blocks[0 if shared else j] for j in range(d)])
    assert_close(rotate_blocks(x, blocks), x @ dense, atol=1e-12, rtol=0)


@pytest.mark.parametrize("n,bs,factors",
                         [(8, 4, 1), (8, 2, 3), (16, 4, 2), (16, 2, 4), (24, 4, 2), (32, 4, 3), (12, 2, 2)])
def test_butterfly_equals_dense_product(n, bs, factors):
    blocks = cayley(skew_part(torch.randn(factors, n // bs, bs, bs, dtype=torch.float64)))
    perms = butterfly_perms(n, bs, factors)
    m = _dense_m(blocks, n)
    x = torch.randn(5, n, dtype=torch.float64)
    assert_close(butterfly(x, blocks, perms), x @ m, atol=1e-12, rtol=0)
    assert_close(butterfly(x, blocks, perms, transpose=True), x @ m.T, atol=1e-12, rtol=0)
    # the dense product of exactly orthogonal factors is orthogonal
    assert_close(m.T @ m, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    # leading batch axes pass through
    x3 = torch.randn(2, 3, n, dtype=torch.float64)
    assert_close(butterfly(x3, blocks, perms), x3 @ m, atol=1e-12, rtol=0)


@settings(max_examples=25, deadline=None)
@given(
    log_d=st.integers(0, 4), half=st.integers(1, 3), factors=st.integers(1, 5), rows=st.integers(1, 4),
    shared=st.booleans(), seed=st.integers(0, 2**16),
)
def test_butterfly_property(log_d, half, factors, rows, shared, seed):
    d, bs = 2**log_d, 2 * half
    factors = min(factors, log_d + 1)
    n = d * bs
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(factors, 1 if shared else d, bs, bs, generator=g, dtype=torch.float64)
    blocks = cayley(skew_part(raw))
    perms = butterfly_perms(n, bs, factors)
    m = _dense_m(blocks, n)
    x = torch.randn(rows, n, generator=g, dtype=torch.float64)
    assert_close(butterfly(x, blocks, perms), x @ m, atol=1e-10, rtol=0)
    assert_close(butterfly(x, blocks, perms, transpose=True), x @ m.T, atol=1e-10, rtol=0)


def test_drop_blocks():
    bs = 3
    blocks = torch.randn(2, 4, bs, bs)
    torch.manual_seed(0)
    out = drop_blocks(blocks, 0.5)
    eye = torch.eye(bs)
    is_eye = torch.tensor([[torch.equal(out[i, j], eye) for j in range(4)] for i in range(2)])
    kept = torch.tensor([[torch.equal(out[i, j], blocks[i, j]) for j in range(4)] for i in range(2)])
    assert int(is_eye.sum()) == 2  # int(0.5 * 4) blocks of one factor
    assert is_eye.any(dim=1).sum() == 1
    assert bool((is_eye | kept).all())
    assert drop_blocks(blocks, 0.1) is blocks  # int(0.1 * 4) == 0
    shared = torch.randn(1, 1, bs, bs)
    assert drop_blocks(shared, 0.9) is shared
