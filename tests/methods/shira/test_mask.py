"""The default random mask: deterministic per (seed, layer), uniform, exactly r·(m+n) distinct positions."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import peftkit
from peftkit.methods.shira import random_mask
from peftkit.methods.shira.mask import layer_seed, random_positions

from .helpers import build, make, shira_config, shira_layers


def _indices(model) -> dict[str, torch.Tensor]:
    return {k: m.shira_indices["default"].clone() for k, m in shira_layers(model).items()}


# --------------------------------------------------------------------------- random_positions
@pytest.mark.parametrize("numel,k", [(1000, 10), (1000, 249), (1000, 250), (1000, 999), (7, 7), (1, 1), (5, 0)])
def test_positions_distinct_sorted_in_range(numel, k):
    for seed in range(5):
        p = random_positions(numel, k, seed)
        assert p.dtype == torch.int64 and p.shape == (k,)
        assert torch.equal(p, torch.unique(p))  # distinct and sorted
        if k:
            assert int(p.min()) >= 0 and int(p.max()) < numel
        assert torch.equal(random_positions(numel, k, seed), p)  # deterministic


def test_positions_differ_between_seeds():
    draws = {tuple(random_positions(10_000, 50, s).tolist()) for s in range(20)}
    assert len(draws) == 20
    dense = {tuple(random_positions(40, 20, s).tolist()) for s in range(20)}  # the randperm branch
    assert len(dense) == 20


def test_draws_are_the_same_in_other_threads():
    """The generator is one per thread, re-seeded per draw: a draw depends on its seed only."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(50_000, 700, s) for s in range(12)]
    alone = [random_positions(*j) for j in jobs]
    with ThreadPoolExecutor(3) as pool:
        threaded = list(pool.map(lambda j: random_positions(*j), jobs))
    assert all(torch.equal(a, b) for a, b in zip(alone, threaded))


@pytest.mark.parametrize("numel,k", [(3 * 2**30, 400), (2**29 + 7, 2_000)], ids=["int64_path", "int32_path"])
def test_positions_of_huge_weights(numel, k):
    """Large weights: int32 gaps and positions while they surely fit, int64 past that; no wrap-around."""
    p = random_positions(numel, k, 3)
    assert p.dtype == torch.int64 and p.shape == (k,)
    assert torch.equal(p, torch.unique(p)) and int(p.min()) >= 0 and int(p.max()) < numel
    assert int(p.max()) > numel // 2  # spread over the whole range


def test_short_first_pass_is_topped_up(monkeypatch):
    """When the first pass keeps fewer than k positions (rare), the rest are drawn from the unused ones."""
    from peftkit.methods.shira import mask

    real = mask._bernoulli_positions
    monkeypatch.setattr(mask, "_bernoulli_positions", lambda rng, numel, p: real(rng, numel, p * 0.9))
    for seed in range(5):
        p = random_positions(100_000, 2_000, seed)
        assert p.shape == (2_000,) and torch.equal(p, torch.unique(p)) and int(p.max()) < 100_000
        assert torch.equal(random_positions(100_000, 2_000, seed), p)


def test_too_many_positions_raise():
    with pytest.raises(ValueError, match="cannot choose 11 entries out of 10"):
        random_positions(10, 11, 0)


def _chi_square(counts: torch.Tensor) -> float:
    expected = counts.float().mean()
    return float(((counts.float() - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("numel,k", [(60, 4), (60, 20)], ids=["sparse_branch", "dense_branch"])
def test_positions_are_uniform(numel, k):
    """Every position is picked equally often (chi-square, 59 degrees of freedom: mean 59, sd ~11)."""
    counts = torch.zeros(numel, dtype=torch.int64)
    mins = torch.zeros(numel, dtype=torch.float64)
    trials = 3000
    for seed in range(trials):
        p = random_positions(numel, k, seed)
        counts[p] += 1
        mins[p[0]] += 1  # the smallest pick: its law depends on the joint law, not only the marginals
    assert int(counts.sum()) == trials * k
    assert _chi_square(counts) < 59 + 6 * 11, counts
    # the smallest pick is distributed as the minimum of a uniform k-subset
    law = torch.tensor([math.comb(numel - 1 - i, k - 1) / math.comb(numel, k) for i in range(numel)],
                       dtype=torch.float64)
    assert abs(float(law.sum()) - 1) < 1e-9
    keep = law * trials >= 5  # the usual chi-square validity rule
    stat = float((((mins - law * trials) ** 2) / (law * trials))[keep].sum())
    assert stat < int(keep.sum()) + 6 * (2 * int(keep.sum())) ** 0.5


def test_layer_seed_depends_on_seed_and_name():
    assert layer_seed(3, "a.q_proj") == layer_seed(3, "a.q_proj")
    assert layer_seed(3, "a.q_proj") != layer_seed(4, "a.q_proj")
    assert layer_seed(3, "layers.0.q_proj") != layer_seed(3, "layers.1.q_proj")
    torch.manual_seed(1)
    a = layer_seed(None, "x")
    torch.manual_seed(1)
    assert layer_seed(None, "x") == a
    torch.manual_seed(2)
    assert layer_seed(None, "x") != a


# --------------------------------------------------------------------------- masks of a model
def test_same_seed_same_masks_other_seed_other_masks():
    a = _indices(make("peftkit", "llama", random_seed=5))
    b = _indices(make("peftkit", "llama", random_seed=5, seed=99))  # the global torch seed does not matter
    c = _indices(make("peftkit", "llama", random_seed=6))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(not torch.equal(a[k], c[k]) for k in a)


def test_layers_of_one_shape_get_different_masks():
    idx = _indices(make("peftkit", "llama", random_seed=5))
    q0, q1 = idx["model.layers.0.self_attn.q_proj"], idx["model.layers.1.self_attn.q_proj"]
    assert q0.shape == q1.shape and not torch.equal(q0, q1)


def test_random_seed_none_follows_torch_manual_seed():
    a = _indices(make("peftkit", "llama", random_seed=None, seed=3))
    b = _indices(make("peftkit", "llama", random_seed=None, seed=3))
    c = _indices(make("peftkit", "llama", random_seed=None, seed=4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("r", [1, 2, 5])
def test_count_distinct_in_range_row_major(r):
    model = make("peftkit", "llama", r=r)
    layers = shira_layers(model)
    assert len(layers) == 8
    for key, layer in layers.items():
        w = layer.base_layer.weight
        idx = layer.shira_indices["default"]
        m, n = w.shape
        assert idx.dtype == torch.int32 and idx.shape == (2, r * (m + n)), key
        assert layer.shira_weight["default"].shape == (r * (m + n),)
        assert int(idx[0].min()) >= 0 and int(idx[0].max()) < m and int(idx[1].min()) >= 0 and int(idx[1].max()) < n
        flat = idx[0].long() * n + idx[1].long()
        assert torch.equal(flat, torch.unique(flat)), key  # distinct, in row-major order


def test_csr_columns_share_the_positions_buffer():
    """nn.Linear's row-major positions are already in CSR order: the kernel's columns are a view, not a copy."""
    model = make("peftkit", "llama", r=2)
    for key, layer in shira_layers(model).items():
        pat = layer.pattern("default")
        assert pat.order is None, key
        assert pat.col.data_ptr() == layer.shira_indices["default"][1].data_ptr(), key
        assert pat.crow.dtype == pat.col.dtype == torch.int32


def test_r_too_large_raises_and_leaves_model_unchanged():
    # q_proj (16x16) takes r <= 8; v_proj (8x16) only r <= 5: the error comes at the second layer
    base = build("llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    modules = [n for n, _ in base.named_modules()]
    cfg = peftkit.ShiraConfig(r=6, target_modules=["q_proj", "v_proj"])
    match = r"r=6 asks for r·\(m\+n\) = 144 entries of model\.layers\.0\.self_attn\.v_proj"
    with pytest.raises(ValueError, match=match):
        peftkit.get_peft_model(base, cfg)
    assert [n for n, _ in base.named_modules()] == modules, "adapter layers were left in the model"
    assert not hasattr(base, "peft_config")
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_r_too_large_on_add_adapter_leaves_model_unchanged():
    model = make("peftkit", "llama", r=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="lower r"):
            model.add_adapter("big", shira_config(peftkit, "llama", r=6))
    assert list(model.peft_config) == ["default"]
    assert all(layer.adapters == ["default"] for layer in shira_layers(model).values())


def test_random_mask_matches_the_positions_peftkit_draws():
    model = make("peftkit", "llama", r=3, random_seed=21)
    for key, layer in shira_layers(model).items():
        mask = random_mask(layer.base_layer, 3, random_seed=21, name=key)
        w = layer.base_layer.weight
        assert mask.shape == w.shape and mask.dtype == w.dtype and mask.device == w.device
        assert bool(((mask == 0) | (mask == 1)).all())
        assert int(mask.sum()) == 3 * sum(w.shape)
        rows, cols = torch.nonzero(mask, as_tuple=True)
        assert torch.equal(torch.stack([rows, cols]).int(), layer.shira_indices["default"]), key


def test_random_mask_as_a_mask_fn():
    """``random_mask`` fits the mask_fn signature (PEFT's: ``fn(base_layer, r, **kwargs)``)."""
    layer = nn.Linear(12, 10)
    mask = random_mask(layer, 2, random_seed=0, bias=True)
    assert mask.shape == (10, 12) and int(mask.sum()) == 44
    assert torch.equal(mask, random_mask(layer, 2, random_seed=0))
    assert not torch.equal(mask, random_mask(layer, 2, random_seed=1))
