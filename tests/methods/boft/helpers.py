"""BOFT test helpers: the OFT helpers' models, plus an independent dense construction of ``M``.

``dense_m`` builds the rotation the way the paper and PEFT do: ``P_i[j, perm_i[j]] = 1`` with
PEFT's own ``block_butterfly_perm``, ``B_i = P_i · blockdiag(R_i) · P_iᵀ`` with ``R_i`` the exact
Cayley transform of the skew part of ``boft_R[i]`` (computed here with an explicit inverse), and
``M = B_{N−1} ⋯ B_0``.
"""

from __future__ import annotations

from functools import partial

import torch
from peft.tuners.boft.layer import BOFTLayer as PeftBOFTLayer

from tests.methods.oft.helpers import (  # noqa: F401
    DIRECTION_IDS, DIRECTIONS, HF_TARGETS, adapter_state, base_of, build, fresh_net, load, merged_weights, net_inputs,
    norm, out, perturb, quiet_call, read_config, save, saved_shapes, saved_tensors,
)
from tests.methods.oft.helpers import make as _make

make = partial(_make, "BOFTConfig")


def peft_perm_matrix(n: int, block_num: int, block_size: int, factor: int) -> torch.Tensor:
    """PEFT's permutation matrix of butterfly factor ``factor`` (0-based) for ``n`` features."""
    if factor == 0:
        return torch.eye(n, dtype=torch.float64)
    perm = PeftBOFTLayer.block_butterfly_perm(None, n, block_num // 2**factor, block_size // 2, factor)
    p = torch.zeros(n, n, dtype=torch.float64)
    p[torch.arange(n), perm] = 1.0
    return p


def dense_m(boft_r: torch.Tensor) -> torch.Tensor:
    """``M = B_{N−1} ⋯ B_0`` (float64) from a (N, D, bs, bs) ``boft_R``."""
    r = boft_r.detach().double()
    factors, d, bs, _ = r.shape
    n = d * bs
    eye = torch.eye(bs, dtype=torch.float64)
    m = torch.eye(n, dtype=torch.float64)
    for i in range(factors):
        q = 0.5 * (r[i] - r[i].transpose(-1, -2))
        blocks = [(eye - q[j]) @ torch.linalg.inv(eye + q[j]) for j in range(d)]
        p = peft_perm_matrix(n, d, bs, i)
        m = (p @ torch.block_diag(*blocks) @ p.T) @ m
    return m


def layer_of(model, name: str):
    return dict(model.get_base_model().named_modules())[name]
