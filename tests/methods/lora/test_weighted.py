"""LoRA ``add_weighted_adapter``: every combination type against HF PEFT (the oracle) and the math.

The same adapter files (made by PEFT with random weights) are loaded into both libraries on
identical base models; both then build the combined adapter and their ``get_delta_weight``
and outputs are compared. DARE is random: torch is seeded identically before each call.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import warnings
from typing import Any

import peft
import pytest
import torch
from torch import nn

import peftkit
from peftkit.core import merge_utils as mu

LIBS = {"peft": peft, "peftkit": peftkit}
WEIGHTS = [0.7, -0.4, 1.3]


# --------------------------------------------------------------------------- models
class Custom(nn.Module):
    """Embedding, 3x3 Conv2d, 1x1 Conv2d and two Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.conv1 = nn.Conv2d(6, 6, 1)
        self.lin = nn.Linear(6 + 8, 12)
        self.lin2 = nn.Linear(12, 10)

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        e = self.emb(ids).mean(1)
        c = self.conv1(torch.relu(self.conv(img))).mean((2, 3))
        return self.lin2(torch.relu(self.lin(torch.cat([e, c], 1))))


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3, padding=1)
        self.lin = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.conv(x).mean(2))


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=16, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg)


MODELS = {
    "custom": (Custom, ["emb", "conv", "conv1", "lin", "lin2"]),
    "gpt2": (_gpt2, ["c_attn", "c_proj", "wte"]),  # transformers Conv1D and an Embedding
    "conv1d": (Conv1dNet, ["conv", "lin"]),
}


@functools.lru_cache(maxsize=None)
def _prototype(name: str) -> nn.Module:
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MODELS[name][0]().eval()
    torch.random.set_rng_state(state)
    return model


def build(name: str) -> nn.Module:
    """A fresh copy of the base model ``name`` (the same weights every time)."""
    return copy.deepcopy(_prototype(name))


def run(model: nn.Module, name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        if name == "custom":
            return model(ids=torch.randint(0, 20, (2, 5), generator=g), img=torch.randn(2, 2, 5, 5, generator=g))
        if name == "conv1d":
            return model(torch.randn(2, 4, 7, generator=g))
        return model(input_ids=torch.randint(0, 32, (2, 6), generator=g)).logits


# Three adapters: a and b share rank 4 (the factor-space types need equal ranks), c has rank 2.
ADAPTERS = {"a": {"r": 4, "lora_alpha": 8}, "b": {"r": 4, "lora_alpha": 4}, "c": {"r": 2, "lora_alpha": 6}}


def save_adapters(root: str, name: str, **overrides) -> str:
    """Make the adapters with PEFT (random weights) and save each under ``root/<model>/<adapter>``."""
    for i, (ad, kw) in enumerate(ADAPTERS.items()):
        cfg = {"target_modules": MODELS[name][1], "init_lora_weights": False, **kw, **overrides}
        save_one(os.path.join(root, name), name, ad, 10 + i, **cfg)
    return os.path.join(root, name)


def save_one(root: str, name: str, adapter: str, seed: int, **cfg) -> Any:
    """One PEFT adapter with random weights (seeded after the base model is built), saved to ``root/adapter``."""
    base = build(name)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, peft.LoraConfig(**cfg), adapter_name=adapter)
        model.save_pretrained(root, selected_adapters=[adapter])
    return model


def load(lib: str, folder: str, name: str, adapters=("a", "b", "c")):
    """Both libraries save non-default adapters under ``<folder>/<adapter>``."""
    mod = LIBS[lib]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = mod.PeftModel.from_pretrained(build(name), os.path.join(folder, adapters[0]), adapter_name=adapters[0])
        for ad in adapters[1:]:
            model.load_adapter(os.path.join(folder, ad), adapter_name=ad)
    return model.eval()


def lora_layers(model, adapter: str) -> dict[str, nn.Module]:
    return {
        k: m
        for k, m in model.named_modules()
        if hasattr(m, "lora_A") and (adapter in m.lora_A or adapter in m.lora_embedding_A)
    }


def deltas(model, adapter: str) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {k: m.get_delta_weight(adapter).detach().clone() for k, m in lora_layers(model, adapter).items()}


def assert_deltas_close(got: dict, expected: dict, rtol: float = 1e-4) -> None:
    assert sorted(got) == sorted(expected)
    for k in expected:
        scale = expected[k].abs().max().item() + 1e-6
        torch.testing.assert_close(got[k], expected[k], rtol=rtol, atol=rtol * scale, msg=lambda m, k=k: f"{k}: {m}")


def combine(model, adapters, new="new", seed=123, **kw):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_weighted_adapter(list(adapters), WEIGHTS[: len(adapters)], new, **kw)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("weighted"))
    return {name: save_adapters(root, name) for name in MODELS}


# --------------------------------------------------------------------------- against the oracle
CASES = [
    ("svd", "abc", {}),
    ("svd", "abc", {"svd_rank": 3}),
    ("svd", "abc", {"svd_rank": 3, "svd_clamp": 0.9}),
    ("cat", "abc", {}),
    ("linear", "ab", {}),
    ("ties", "ab", {"density": 0.5}),
    ("ties", "ab", {"density": 0.4, "majority_sign_method": "frequency"}),
    ("ties_svd", "abc", {"density": 0.5}),
    ("dare_linear", "ab", {"density": 0.5}),
    ("dare_ties", "ab", {"density": 0.6}),
    ("dare_linear_svd", "abc", {"density": 0.5}),
    ("dare_ties_svd", "abc", {"density": 0.5, "majority_sign_method": "frequency"}),
    ("magnitude_prune", "ab", {"density": 0.5}),
    ("magnitude_prune_svd", "abc", {"density": 0.3, "svd_rank": 5}),
]


CASE_IDS = [f"{c}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for c, _, kw in CASES]


@pytest.mark.parametrize("name", ["custom", "gpt2"])
@pytest.mark.parametrize("ctype,adapters,kw", CASES, ids=CASE_IDS)
def test_same_as_peft(folders, name, ctype, adapters, kw):
    ref, mine = load("peft", folders[name], name), load("peftkit", folders[name], name)
    combine(ref, adapters, combination_type=ctype, **kw)
    combine(mine, adapters, combination_type=ctype, **kw)

    assert_deltas_close(deltas(mine, "new"), deltas(ref, "new"))
    cfg, ref_cfg = mine.peft_config["new"], ref.peft_config["new"]
    assert (cfg.r, cfg.lora_alpha) == (ref_cfg.r, ref_cfg.lora_alpha)
    assert set(cfg.target_modules) == set(ref_cfg.target_modules)
    assert cfg.rank_pattern == {} and cfg.alpha_pattern == {}
    # frozen and not made active, like PEFT
    for layer in lora_layers(mine, "new").values():
        assert all(not p.requires_grad for p in layer.adapter_parameters("new"))
    assert mine.active_adapter == "a"

    for model in (ref, mine):
        model.set_adapter("new")
    torch.testing.assert_close(run(mine, name), run(ref, name), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- against the formula
def _layer_deltas(model, adapters):
    return [deltas(model, a) for a in adapters]


def _weighted_sum(model, adapters) -> dict[str, torch.Tensor]:
    per = _layer_deltas(model, adapters)
    return {k: sum(w * d[k] for w, d in zip(WEIGHTS, per)) for k in per[0]}


@pytest.mark.parametrize("ctype,kw", [("cat", {}), ("svd", {"svd_rank": 10})], ids=["cat", "svd-full-rank"])
@pytest.mark.parametrize("name", ["custom", "gpt2", "conv1d"])
def test_exact_types_give_the_weighted_sum(folders, name, ctype, kw):
    """cat, and svd with rank >= sum of ranks, give sum_i w_i ΔW_i exactly (also nn.Conv1d, where PEFT's svd fails)."""
    model = load("peftkit", folders[name], name)
    expected = _weighted_sum(model, "abc")
    combine(model, "abc", combination_type=ctype, **kw)
    assert_deltas_close(deltas(model, "new"), expected)
    assert model.peft_config["new"].r == 10
    for layer in lora_layers(model, "new").values():  # rank never exceeds the configured one; padding is zero
        assert layer.r["new"] == 10 and layer.scaling["new"] == 1.0
        a, b = layer._factors("new")
        assert a.shape[0] == b.shape[1] == 10


@pytest.mark.parametrize("name", ["custom", "gpt2"])
def test_svd_is_the_best_rank_k_approximation(folders, name):
    """The QR-core route equals a dense truncated SVD of sum_i w_i ΔW_i."""
    model = load("peftkit", folders[name], name)
    combine(model, "abc", combination_type="svd", svd_rank=3)
    for layer in lora_layers(model, "new").values():
        target = sum(w * layer.delta_weight(a) for a, w in zip("abc", WEIGHTS))  # canonical (out, fan_in)
        u, s, vh = torch.linalg.svd(target, full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        torch.testing.assert_close(layer.delta_weight("new"), best, rtol=1e-4, atol=1e-5 * s[0].item())


def test_linear_combines_factors_not_deltas(folders):
    """'linear' is PEFT's factor-space mix: (sum c_i B_i)(sum c'_j A_j), with cross terms; kept as is."""
    model = load("peftkit", folders["custom"], "custom")
    combine(model, "ab", combination_type="linear")
    layer = model.base_model.model.lin
    (a1, b1), (a2, b2) = layer._factors("a"), layer._factors("b")
    c1, c2 = WEIGHTS[0] * layer.scaling["a"], WEIGHTS[1] * layer.scaling["b"]
    sgn = lambda c: math.copysign(math.sqrt(abs(c)), c)  # noqa: E731
    a = sgn(c1) * a1 + sgn(c2) * a2
    b = math.sqrt(abs(c1)) * b1 + math.sqrt(abs(c2)) * b2
    torch.testing.assert_close(layer.delta_weight("new"), b @ a)
    exact = WEIGHTS[0] * layer.delta_weight("a") + WEIGHTS[1] * layer.delta_weight("b")
    assert not torch.allclose(layer.delta_weight("new"), exact, atol=1e-3)


def test_single_adapter_is_linear_and_exact(folders):
    ref, mine = load("peft", folders["custom"], "custom"), load("peftkit", folders["custom"], "custom")
    for m in (ref, mine):
        m.add_weighted_adapter(["c"], [0.5], "new", combination_type="svd")
    assert_deltas_close(deltas(mine, "new"), deltas(ref, "new"))
    assert_deltas_close(deltas(mine, "new"), {k: 0.5 * v for k, v in deltas(mine, "c").items()})
    with pytest.warns(UserWarning, match="single adapter"):
        mine.add_weighted_adapter(["a"], [1.0], "new2", combination_type="svd", svd_rank=2)
    assert mine.peft_config["new2"].r == 4


def test_rslora_scaling_is_one(tmp_path):
    """PEFT keeps use_rslora, so its combined ΔW is sqrt(new_rank) too large; peftkit gives the exact sum."""
    folder = save_adapters(str(tmp_path), "custom", use_rslora=True)
    ref, mine = load("peft", folder, "custom"), load("peftkit", folder, "custom")
    for m in (ref, mine):
        combine(m, "abc", combination_type="cat")
    new_rank = 10
    assert not mine.peft_config["new"].use_rslora
    assert_deltas_close(deltas(mine, "new"), _weighted_sum(mine, "abc"))
    assert_deltas_close({k: v / math.sqrt(new_rank) for k, v in deltas(ref, "new").items()}, deltas(mine, "new"))


def test_rank_above_layer_size_is_padded_and_reloads_in_peft(folders, tmp_path):
    """svd_rank larger than a layer allows: zero-padded to r (PEFT stores tensors that do not fit)."""
    model = load("peftkit", folders["custom"], "custom")
    expected = _weighted_sum(model, "abc")
    combine(model, "abc", combination_type="svd", svd_rank=16)  # emb is 8 x 20, conv1 6 x 6
    got = deltas(model, "new")
    assert_deltas_close(got, expected)
    model.save_pretrained(str(tmp_path), selected_adapters=["new"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(build("custom"), str(tmp_path / "new"), adapter_name="new")
    assert_deltas_close(deltas(back, "new"), got)


def test_rank_pattern_cat(tmp_path):
    folder = save_adapters(str(tmp_path), "custom", rank_pattern={"lin": 2}, alpha_pattern={"conv": 3})
    model = load("peftkit", folder, "custom")
    expected = _weighted_sum(model, "abc")
    combine(model, "abc", combination_type="cat")
    assert_deltas_close(deltas(model, "new"), expected)
    lin = model.base_model.model.lin
    assert lin.r["new"] == 10 and lin.lora_A["new"].weight.shape == (10, 14)


def test_lora_bias_is_combined(tmp_path):
    folder = save_adapters(str(tmp_path), "custom", lora_bias=True, target_modules=["conv", "conv1", "lin", "lin2"])
    for ad in "abc":  # PEFT's biases start at zero with init_lora_weights=False; give them values
        path = os.path.join(folder, ad, "adapter_model.safetensors")
        from safetensors.torch import load_file, save_file

        sd = load_file(path)
        for k in sd:
            if k.endswith("lora_B.bias"):
                sd[k] = torch.randn_like(sd[k])
        save_file(sd, path)
    model = load("peftkit", folder, "custom")
    combine(model, "abc", combination_type="svd", svd_rank=10)
    lin = model.base_model.model.lin
    expected = sum(w * lin.scaling[a] * lin.lora_B[a].bias for a, w in zip("abc", WEIGHTS))
    torch.testing.assert_close(lin.lora_B["new"].bias, expected)
    assert_deltas_close(deltas(model, "new"), _weighted_sum(model, "abc"))


def test_adapters_on_different_layers(tmp_path):
    """A layer only some adapters adapt combines those; the result is still the weighted sum."""
    root = str(tmp_path)
    for i, (ad, targets) in enumerate([("a", ["lin", "conv"]), ("b", ["lin2", "conv"])]):
        save_one(root, "custom", ad, 20 + i, r=4, target_modules=targets, init_lora_weights=False)
    ref, mine = load("peft", root, "custom", ("a", "b")), load("peftkit", root, "custom", ("a", "b"))
    for ctype in ("svd", "cat", "linear"):
        for m in (ref, mine):
            combine(m, "ab", new=ctype, combination_type=ctype)
        assert_deltas_close(deltas(mine, ctype), deltas(ref, ctype))
    assert set(mine.peft_config["svd"].target_modules) == {"lin", "lin2", "conv"}


def test_modules_to_save_copy_is_carried(tmp_path):
    root = str(tmp_path)
    for i, (ad, extra) in enumerate([("a", {}), ("b", {"modules_to_save": ["lin2"]})]):
        m = save_one(root, "custom", ad, 30 + i, r=4, target_modules=["lin"], init_lora_weights=False, **extra)
        if extra:  # give the saved copy trained-looking values
            with torch.no_grad():
                m.base_model.model.lin2.modules_to_save[ad].weight.add_(1.0)
            m.save_pretrained(root, selected_adapters=[ad])
    model = load("peftkit", root, "custom", ("a", "b"))
    combine(model, "ab", combination_type="cat")
    wrapper = model.base_model.model.lin2
    torch.testing.assert_close(wrapper.modules_to_save["new"].weight, wrapper.modules_to_save["b"].weight)
    assert not wrapper.modules_to_save["new"].weight.requires_grad


# --------------------------------------------------------------------------- errors
def _snapshot(model):
    return list(model.peft_config), {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, snap):
    names, sd = snap
    assert list(model.peft_config) == names
    now = model.state_dict()
    assert sorted(now) == sorted(sd)
    assert all(torch.equal(now[k], sd[k]) for k in sd)


@pytest.mark.parametrize(
    "adapters,kw,exc,match",
    [
        (["a", "zz"], {}, ValueError, "Unknown adapter"),
        (["a", "c"], {"combination_type": "linear"}, ValueError, "same rank"),
        (["a", "c"], {"combination_type": "dare_ties", "density": 0.5}, ValueError, "same rank"),
        (["a", "b"], {"combination_type": "ties"}, ValueError, "pass density"),
        (["a", "c"], {"combination_type": "dare_linear_svd"}, ValueError, "pass density"),
        (["a", "b"], {"combination_type": "magnitude_prune", "density": 1.5}, ValueError, r"\[0, 1\]"),
        (["a", "b"], {"combination_type": "nope"}, ValueError, "Unknown combination_type"),
        (["a", "b"], {"combination_type": "ties", "density": 0.5, "majority_sign_method": "x"}, ValueError, "sign"),
        (["a", "b"], {"svd_rank": 0}, ValueError, "svd_rank"),
    ],
)
def test_errors_leave_the_model_unchanged(folders, adapters, kw, exc, match):
    model = load("peftkit", folders["custom"], "custom")
    snap = _snapshot(model)
    with pytest.raises(exc, match=match):
        model.add_weighted_adapter(adapters, [1.0] * len(adapters), "new", **kw)
    _assert_unchanged(model, snap)


def test_dora_and_duplicates_are_refused(folders):
    model = load("peftkit", folders["custom"], "custom")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="appear once"):
        model.add_weighted_adapter(["a", "a"], [1.0, 1.0], "new")
    model.peft_config["b"].use_dora = True  # the flag is all that is checked
    with pytest.raises(NotImplementedError, match="DoRA"):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "new")
    _assert_unchanged(model, snap)


def test_svd_driver_is_ignored_on_cpu(folders):
    model = load("peftkit", folders["custom"], "custom")
    with pytest.warns(UserWarning, match="ignored on CPU"):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "new", svd_driver="gesvdj")


def test_existing_name_is_an_error(folders):
    model = load("peftkit", folders["custom"], "custom")
    with pytest.raises(ValueError, match="already exists"):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "c")


def test_mixed_target_module_types(tmp_path):
    root = str(tmp_path)
    for i, (ad, targets) in enumerate([("a", ["lin"]), ("b", r"lin2")]):
        save_one(root, "custom", ad, i, r=4, target_modules=targets)
    model = load("peftkit", root, "custom", ("a", "b"))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="regex string and a list"):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "new", combination_type="cat")
    _assert_unchanged(model, snap)


def test_uncovered_layers_are_an_error(tmp_path):
    """The first adapter's exclude_modules would drop a layer the second adapts: refuse, do not drop it."""
    root = str(tmp_path)
    for i, (ad, extra) in enumerate([("a", {"exclude_modules": ["lin2"]}), ("b", {})]):
        save_one(root, "custom", ad, i, r=4, target_modules=["lin", "lin2"], **extra)
    model = load("peftkit", root, "custom", ("a", "b"))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="would not adapt"):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "new")
    _assert_unchanged(model, snap)
    model.add_weighted_adapter(["b", "a"], [1.0, 1.0], "new")  # the covering adapter first works
    assert "new" in model.base_model.model.lin2.lora_A


def test_two_modules_to_save_copies_are_an_error(tmp_path):
    root = str(tmp_path)
    for i, ad in enumerate("ab"):
        save_one(root, "custom", ad, i, r=4, target_modules=["lin"], modules_to_save=["lin2"])
    model = load("peftkit", root, "custom", ("a", "b"))
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="modules_to_save"):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "new")
    _assert_unchanged(model, snap)


# --------------------------------------------------------------------------- merge primitives
def test_task_arithmetic_and_magnitude_prune():
    t1, t2 = torch.tensor([[1.0, -4.0], [0.5, 2.0]]), torch.tensor([[-3.0, 1.0], [0.25, -0.1]])
    torch.testing.assert_close(mu.task_arithmetic([t1, t2], [2.0, -1.0]), 2 * t1 - t2)
    torch.testing.assert_close(mu.magnitude_prune_tensor(t1, 0.5), torch.tensor([[0.0, -4.0], [0.0, 2.0]]))
    assert torch.equal(mu.magnitude_prune_tensor(t1, 0.0), torch.zeros_like(t1))
    assert torch.equal(mu.magnitude_prune_tensor(t1, 1.0), t1)


def test_ties_by_hand():
    t1 = torch.tensor([3.0, -1.0, 2.0, 0.5])
    t2 = torch.tensor([-1.0, -2.0, 4.0, -0.25])
    # density 1: no trimming. Signs: total -> [+, -, +, +]; frequency -> [+ (tie), -, +, + (tie)]
    got = mu.ties([t1, t2], [1.0, 2.0], density=1.0, majority_sign_method="total")
    torch.testing.assert_close(got, torch.tensor([3.0, (-1.0 - 4.0) / 2, (2.0 + 8.0) / 2, 0.5]))
    # density 0.5 keeps the 2 largest magnitudes of each: t1 -> [3, 0, 2, 0], t2 -> [0, -2, 4, 0]
    got = mu.ties([t1, t2], [1.0, 1.0], density=0.5)
    torch.testing.assert_close(got, torch.tensor([3.0, -2.0, 3.0, 0.0]))


def test_dare_statistics():
    torch.manual_seed(0)
    t = torch.randn(400, 400)
    pruned = mu.random_prune_tensor(t, 0.3, rescale=True)
    kept = pruned != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    torch.testing.assert_close(pruned[kept], t[kept] / 0.3)
    ones = torch.ones(400, 400)
    assert abs(mu.dare_linear([ones], [1.0], 0.3).mean().item() - 1.0) < 0.02  # unbiased
    assert torch.equal(mu.random_prune_tensor(t, 0.0), torch.zeros_like(t))  # PEFT: NaN (0 / 0)
