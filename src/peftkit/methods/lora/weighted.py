"""``add_weighted_adapter`` for LoRA: a new adapter built from a weighted combination of others.

Write ``s_i`` for adapter i's scaling at a layer and ``ΔW_i = s_i · B_i A_i`` for its weight
change (canonical (out, fan_in) layout). The new adapter has ``r = lora_alpha = new_rank``,
so its own scaling is 1 and its ΔW is ``B A``. Per combination type:

- ``svd`` (default): ``ΔW = sum_i w_i ΔW_i``, truncated to ``new_rank`` singular values
  (``new_rank = svd_rank or`` the largest source rank). Exact whenever ``new_rank`` reaches
  the sum of the source ranks. Computed without forming ΔW: with ``B_cat = [B_1 .. B_n]`` and
  ``A_cat = [w_1 s_1 A_1; ..; w_n s_n A_n]``, ``ΔW = B_cat A_cat``; QR both factors and take
  the SVD of the small ``R × R`` core (``R = sum r_i``): exact, and far cheaper than the
  (out × fan_in) SVD PEFT runs. ``svd_clamp`` needs the very singular vectors PEFT gets, so
  with it the dense SVD is used.
- ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``: the matching
  merge of ``core.merge_utils`` over the dense ``ΔW_i``, then the truncated SVD.
- ``cat``: ``A = [w_1 s_1 A_1; ...]``, ``B = [B_1 ... B_n]``: ``ΔW = sum_i w_i ΔW_i`` exactly,
  with rank ``sum r_i`` (checked: PEFT's result is right here, as long as ``use_rslora`` is off,
  see below).
- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the merge runs on the
  *factors*, with weights ``sign(w_i s_i)·sqrt|w_i s_i|`` on the A's and ``sqrt|w_i s_i|`` on the
  B's. This is PEFT's design, kept as is: for ``linear`` the result is
  ``(sum_i c_i B_i)(sum_j c'_j A_j)``, which has cross terms ``B_i A_j`` and is *not*
  ``sum_i w_i ΔW_i`` (it is when there is one adapter, or when the adapters share A or B). All
  sources must have the same rank at every layer. Use ``cat`` or ``svd`` for the exact sum.

With one adapter, every type falls back to ``linear`` (exact: ``w · ΔW``), as PEFT does; a
warning says when ``svd_rank`` / ``density`` / ``svd_clamp`` are therefore ignored. TIES elects
signs on the unweighted pruned values, then averages the weighted values that agree (PEFT's
order). DARE draws its masks from torch's global generator in PEFT's order (new adapter's
initialisation first, then per layer, per adapter, A's before B's; the dense ΔW's in the base
layer's own layout, (in, out) for GPT-2's Conv1D and (num, dim) for embeddings), so a seed gives
PEFT's result.

Where PEFT is wrong, peftkit does the right thing:

- ``use_rslora``: PEFT copies it into the new config, so the new adapter's scaling becomes
  ``new_rank / sqrt(new_rank) = sqrt(new_rank)`` instead of 1 and every result is
  ``sqrt(new_rank)`` times too large. The new config has ``use_rslora=False``.
- Ranks larger than a layer allows (``svd_rank > min(out, fan_in)``) or per-layer ranks below
  ``new_rank`` (``rank_pattern``, ``cat`` over adapters that skip a layer): PEFT stores tensors
  whose shapes disagree with the config (a broken forward, or an adapter that does not
  reload). peftkit pads with zeros to ``new_rank``: ΔW is unchanged and the shapes match.
- ``nn.Conv1d`` / ``nn.Conv3d`` with an SVD type: PEFT runs a batched SVD over the kernel axis
  and fails; peftkit uses the (out, in·prod(k)) matrix as for Conv2d.
- DARE with ``density=0``: zeros, not PEFT's NaN (0/0). ``density`` outside [0, 1] is an error.
- ``lora_bias``: PEFT leaves the new bias at its initial value; peftkit sets it to
  ``sum_i w_i s_i bias_i`` (the bias enters linearly, whatever the combination type).
- ``init_lora_weights`` = "pissa"/"olora" in the first config: PEFT re-runs that
  initialisation for the new adapter, which rewrites the base weights; peftkit uses True.
- ``modules_to_save``: PEFT gives the new adapter fresh copies of the first adapter's modules
  (trained values lost); peftkit copies the trained module of the (only) source that has one.
- Validation happens before the model changes; PEFT raises some errors (unequal per-layer
  ranks, no source at a layer, CPU with ``svd_driver``) halfway, leaving a half-built adapter.
  A layer that the new config targets but no source adapts gets a zero update; a layer a
  source adapts that the new config would miss (different ``layers_to_transform`` or
  ``exclude_modules``) is an error instead of PEFT's silent drop. DoRA sources are refused
  (their magnitude vectors cannot be combined this way).
- An existing ``adapter_name`` is an error (the engine checks it); PEFT returns silently. An
  adapter named twice in ``adapters`` is an error too.
- ``svd_full_matrices`` only changes PEFT's speed, not the truncated result; peftkit uses the
  reduced SVD (it honours the flag with ``svd_clamp``, whose result depends on the exact
  singular vectors). ``svd_driver`` is used on CUDA and ignored (with a warning) on CPU.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ...core import merge_utils as mu
from ...core.layer import AdapterLayer
from ...core.targeting import is_target
from ...core.tuner import parent_of, top_level_modules
from ...core.wrappers import ModulesToSaveWrapper
from ...registry import get_method
from ...types import PeftWarning

FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = FACTOR_TYPES + ("cat",) + SVD_TYPES


MergeFn = Callable[[list[torch.Tensor], list[float]], torch.Tensor]


def _merge_fn(kind: str, density: float | None, sign_method: str) -> MergeFn:
    """The ``core.merge_utils`` merge for a combination type (its ``_svd`` twin shares it)."""
    base = kind.removesuffix("_svd")
    if base in ("linear", "svd"):
        return mu.task_arithmetic
    fns = {
        "ties": lambda ts, ws: mu.ties(ts, ws, density, sign_method),
        "dare_linear": lambda ts, ws: mu.dare_linear(ts, ws, density),
        "dare_ties": lambda ts, ws: mu.dare_ties(ts, ws, density, sign_method),
        "magnitude_prune": lambda ts, ws: mu.magnitude_prune(ts, ws, density),
    }
    return fns[base]


# ---------------------------------------------------------------------------------------------- plan
@dataclasses.dataclass
class _Plan:
    kind: str
    new_rank: int
    config: Any
    msave_sources: dict[str, str]  # modules_to_save key -> the source adapter whose copy is carried


def _source_rank(config: Any) -> int:
    """The largest rank an adapter has at any layer (r, or a larger rank_pattern value)."""
    return max([config.r, *config.rank_pattern.values()])


def _plan(
    tuner: Any,
    adapters: list[str],
    weights: list[float],
    kind: str,
    svd_rank: int | None,
    svd_clamp: float | None,
    svd_driver: str | None,
    density: float | None,
    sign_method: str,
) -> _Plan:
    """Check every argument against the model and work out the new config; changes nothing."""
    if not adapters:
        raise ValueError("add_weighted_adapter needs at least one adapter to combine.")
    if len(set(adapters)) != len(adapters):
        raise ValueError(f"Each adapter may appear once in `adapters`, got {adapters}.")
    if kind not in COMBINATION_TYPES:
        raise ValueError(f"Unknown combination_type {kind!r}: use one of {', '.join(COMBINATION_TYPES)}.")
    if sign_method not in mu.SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {mu.SIGN_METHODS}, got {sign_method!r}.")
    if svd_driver not in (None, "gesvd", "gesvdj", "gesvda"):
        raise ValueError(f"svd_driver must be None, 'gesvd', 'gesvdj' or 'gesvda', got {svd_driver!r}.")
    configs = [tuner.peft_config[a] for a in adapters]
    for name, cfg in zip(adapters, configs):
        if getattr(cfg, "use_dora", False):
            raise NotImplementedError(
                f"Adapter {name!r} uses DoRA: its magnitude vector cannot be combined by add_weighted_adapter."
            )

    if len(adapters) == 1 and kind != "linear":
        ignored = [
            opt for opt, used in (
                ("svd_rank", svd_rank is not None and svd_rank != _source_rank(configs[0])),
                ("density", density is not None and density < 1 and kind not in ("svd", "cat")),
                ("svd_clamp", svd_clamp is not None and kind.endswith("svd")),
            ) if used
        ]
        if ignored:
            warnings.warn(
                f"With a single adapter, add_weighted_adapter combines linearly (an exact w·ΔW, as PEFT does): "
                f"{', '.join(ignored)} ignored.",
                PeftWarning,
            )
        kind = "linear"

    if kind.endswith("svd"):
        if svd_rank is not None and (not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank <= 0):
            raise ValueError(f"svd_rank must be a positive integer, got {svd_rank!r}.")
        if svd_clamp is not None and not 0.0 <= float(svd_clamp) <= 1.0:
            raise ValueError(f"svd_clamp is a quantile and must be in [0, 1], got {svd_clamp!r}.")
    if kind not in ("linear", "svd", "cat"):
        if density is None:
            raise ValueError(
                f"combination_type={kind!r} prunes the task tensors: pass density (the fraction kept, in [0, 1])."
            )
        if not isinstance(density, (int, float)) or not 0.0 <= density <= 1.0:
            raise ValueError(f"density is the fraction of entries to keep and must be in [0, 1], got {density!r}.")

    ranks = [_source_rank(c) for c in configs]
    if kind == "cat":
        new_rank = sum(ranks)
    elif kind.endswith("svd"):
        new_rank = svd_rank or max(ranks)
    else:
        new_rank = max(ranks)
        for key, layer in tuner.adapter_layers():
            layer_ranks = {a: layer.r[a] for a in adapters if a in layer.r}
            if len(set(layer_ranks.values())) > 1:
                raise ValueError(
                    f"combination_type={kind!r} combines the LoRA factors, so the adapters need the same rank at "
                    f"every layer; at {key} they have {layer_ranks}. Use 'cat' or 'svd' for different ranks."
                )

    target_types = {type(c.target_modules) for c in configs}
    if len(target_types) > 1:
        raise ValueError(
            "The adapters' target_modules mix a regex string and a list/set: this cannot be combined into one "
            f"target_modules ({dict(zip(adapters, (c.target_modules for c in configs)))}). Give them the same form."
        )
    if target_types == {str}:
        new_targets: Any = "|".join(f"({c.target_modules})" for c in configs)
    elif target_types <= {set, list, tuple, frozenset}:
        new_targets = set().union(*(set(c.target_modules) for c in configs))
    else:
        raise ValueError(f"Cannot combine target_modules of type {target_types.pop().__name__}.")

    msave_sources: dict[str, str] = {}
    for key, module in tuner.wrappers():
        if isinstance(module, ModulesToSaveWrapper):
            holders = [a for a in adapters if a in module.modules_to_save]
            if len(holders) > 1:
                raise ValueError(
                    f"Adapters {holders} each have their own trained copy of {key} (modules_to_save); such copies "
                    "cannot be combined. Combine adapters of which at most one saves this module."
                )
            if holders:
                msave_sources[key] = holders[0]
    msave_names: list[str] = []
    for c in configs:
        for m in c.modules_to_save or ():
            if m not in msave_names:
                msave_names.append(m)

    first = configs[0]
    init = first.init_lora_weights if first.init_lora_weights in (True, False, "gaussian") else True
    config = dataclasses.replace(
        first,
        r=new_rank,
        lora_alpha=new_rank,
        target_modules=new_targets,
        rank_pattern={},
        alpha_pattern={},
        use_rslora=False,
        init_lora_weights=init,
        lora_bias=any(c.lora_bias for c in configs),
        modules_to_save=msave_names or None,
    )

    # The new adapter must reach every layer a source adapts, or part of the sum would be lost.
    spec = get_method(config.peft_type)
    prepared = tuner.prepare_config(config, spec)
    targets = {key for key, _ in top_level_modules(tuner.model) if key and is_target(prepared, key)}
    missed = [
        key for key, layer in tuner.adapter_layers()
        if key not in targets and any(a in layer.adapters for a in adapters)
    ]
    if missed:
        raise ValueError(
            f"The combined adapter (the first adapter's config, {adapters[0]!r}, with the union of target_modules) "
            f"would not adapt {missed[:5]}{' ...' if len(missed) > 5 else ''}, which the other adapters adapt: "
            "give the adapters the same layers_to_transform / layers_pattern / exclude_modules, or put the one "
            "that covers the most layers first."
        )
    return _Plan(kind, new_rank, config, msave_sources)


# ---------------------------------------------------------------------------------------------- math
def _truncated_svd(
    delta: torch.Tensor, rank: int, clamp: float | None, full_matrices: bool, driver: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``delta ≈ B A`` with B = U_k S_k (out, k) and A = V_kᵀ (k, fan_in), k ≤ rank."""
    kw = {"driver": driver} if driver is not None and delta.is_cuda else {}
    # The truncated result does not depend on full_matrices; only the clamp sees PEFT's exact vectors.
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices if clamp is not None else False, **kw)
    b = u[:, :rank] * s[:rank]  # (out, k): U diag(S)
    a = vh[:rank, :]  # (k, fan_in)
    if clamp is not None:
        hi = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-hi, hi), a.clamp(-hi, hi)
    return a, b


def _low_rank_svd(
    b_cat: torch.Tensor, a_cat: torch.Tensor, rank: int, driver: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The truncated SVD of ``b_cat @ a_cat`` through QR of each factor; never forms the product."""
    qb, rb = torch.linalg.qr(b_cat)  # (out, m), (m, R)
    qa, ra = torch.linalg.qr(a_cat.t())  # (fan_in, n), (n, R)
    kw = {"driver": driver} if driver is not None and b_cat.is_cuda else {}
    u, s, vh = torch.linalg.svd(rb @ ra.t(), full_matrices=False, **kw)  # core (m, n)
    b = (qb @ u[:, :rank]) * s[:rank]  # (out, k)
    a = vh[:rank, :] @ qa.t()  # (k, fan_in)
    return a, b


def _combine_layer(
    layer: Any, sources: list[tuple[str, float]], plan: _Plan, opts: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The new adapter's (A, B) at one layer as (k, fan_in), (out, k) with k ≤ new_rank."""
    kind = plan.kind
    factors = [layer._factors(a) for a, _ in sources]  # A (r, fan_in), B (out, r)
    scaled = [w * layer.scaling[a] for a, w in sources]
    dtype = factors[0][0].dtype
    if kind == "cat":
        a = torch.cat([fa * c for (fa, _), c in zip(factors, scaled)], dim=0)
        b = torch.cat([fb for _, fb in factors], dim=1)
        return a, b
    merge = _merge_fn(kind, opts["density"], opts["majority_sign_method"])
    if kind in FACTOR_TYPES:
        wa = [(1.0 if c >= 0 else -1.0) * abs(c) ** 0.5 for c in scaled]
        wb = [abs(c) ** 0.5 for c in scaled]
        a = merge([fa.detach() for fa, _ in factors], wa)
        b = merge([fb.detach() for _, fb in factors], wb)
        return a.to(dtype), b.to(dtype)

    work = torch.promote_types(dtype, torch.float32)  # SVD needs float32 at least
    fa_w = [fa.detach().to(work) for fa, _ in factors]
    fb_w = [fb.detach().to(work) for _, fb in factors]
    rank = plan.new_rank
    total = sum(fa.shape[0] for fa in fa_w)
    out, fan_in = fb_w[0].shape[0], fa_w[0].shape[1]
    if kind == "svd" and opts["svd_clamp"] is None and total < min(out, fan_in):
        b_cat = torch.cat(fb_w, dim=1)  # (out, R)
        a_cat = torch.cat([fa * c for fa, c in zip(fa_w, scaled)], dim=0)  # (R, fan_in)
        a, b = _low_rank_svd(b_cat, a_cat, rank, opts["svd_driver"])
    else:
        deltas = [(fb @ fa) * layer.scaling[name] for fa, fb, (name, _) in zip(fa_w, fb_w, sources)]  # (out, fan_in)
        # Merge in the base layer's own layout, as PEFT does: DARE draws its mask in that order.
        flip = layer.ops.kind == "embedding" or layer.ops.transposed
        delta = merge([d.t() for d in deltas] if flip else deltas, [w for _, w in sources])
        delta = delta.t() if flip else delta
        a, b = _truncated_svd(delta, rank, opts["svd_clamp"], opts["svd_full_matrices"], opts["svd_driver"])
    return a.to(dtype), b.to(dtype)


# ---------------------------------------------------------------------------------------------- writing
def _write(layer: Any, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """Copy 2-D factors into the new adapter's tensors, zero-padded up to its rank."""
    if name in layer.lora_embedding_A:
        pa, pb = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    else:
        pa, pb = layer.lora_A[name].weight, layer.lora_B[name].weight
    pa.zero_(), pb.zero_()
    k = a.shape[0]
    pa.view(pa.shape[0], -1)[:k].copy_(a)
    pb.view(pb.shape[0], -1)[:, :k].copy_(b)


def _write_bias(layer: Any, name: str, sources: list[tuple[str, float]]) -> None:
    if not layer.lora_bias.get(name):
        return
    bias = layer.lora_B[name].bias
    bias.zero_()
    for a, w in sources:
        if layer.lora_bias.get(a):
            bias.add_(layer.lora_B[a].bias.detach().to(bias.dtype), alpha=w * layer.scaling[a])


def _rollback(tuner: Any, name: str) -> None:
    """Take a half-built adapter out again (no other adapter's state is touched)."""
    tuner.peft_config.pop(name, None)
    for key, module in list(tuner.wrappers()):
        if name not in module.adapters:
            continue
        module.delete_adapter(name)
        if not module.adapters:
            parent, child = parent_of(tuner.model, key)
            setattr(parent, child, module.base_layer if isinstance(module, AdapterLayer) else module.original_module)


def add_weighted_adapter(
    tuner: Any,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> None:
    """Add ``adapter_name``, a weighted combination of LoRA ``adapters`` (see the module docstring).

    Args:
        tuner: the ``AdapterModel`` holding the adapters.
        adapters: names of the adapters to combine.
        weights: one weight per adapter; negative weights subtract.
        adapter_name: the new adapter's name (it is created frozen and not made active).
        combination_type: one of ``COMBINATION_TYPES``.
        svd_rank: the new rank for the ``*svd`` types (default: the largest source rank).
        svd_clamp: clamp the SVD factors to this quantile of their values (``*svd`` types).
        svd_full_matrices: PEFT's flag for ``torch.linalg.svd``; only matters with ``svd_clamp``.
        svd_driver: cuSOLVER driver for the SVD on CUDA (None, "gesvd", "gesvdj", "gesvda").
        density: the fraction of entries kept by the pruning types, in [0, 1].
        majority_sign_method: "total" or "frequency": how TIES elects a sign.
    """
    adapters = list(adapters)
    try:
        weights = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise ValueError(f"Weights must be numbers, got {list(weights)!r}.") from None
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"Weights must be finite, got {weights}.")
    plan = _plan(
        tuner, adapters, weights, combination_type, svd_rank, svd_clamp, svd_driver, density, majority_sign_method
    )
    if svd_driver is not None and plan.kind.endswith("svd"):
        if not any(p.is_cuda for _, layer in tuner.adapter_layers() for p in layer.parameters()):
            warnings.warn(f"svd_driver={svd_driver!r} is a cuSOLVER option; it is ignored on CPU.", PeftWarning)
    opts = {
        "density": density,
        "majority_sign_method": majority_sign_method,
        "svd_clamp": svd_clamp,
        "svd_full_matrices": svd_full_matrices,
        "svd_driver": svd_driver,
    }
    tuner.inject_adapter(adapter_name, plan.config)
    try:
        with torch.no_grad():
            for _, layer in tuner.adapter_layers():
                if adapter_name not in layer.adapters:
                    continue
                sources = [(a, w) for a, w in zip(adapters, weights) if a in layer.adapters]
                if sources:
                    _write(layer, adapter_name, *_combine_layer(layer, sources, plan, opts))
                else:  # no source adapts this layer: its share of the sum is zero
                    for p in layer.adapter_parameters(adapter_name):
                        p.zero_()
                _write_bias(layer, adapter_name, sources)
            for key, source in plan.msave_sources.items():
                wrapper = tuner.model.get_submodule(key)
                if adapter_name in wrapper.modules_to_save:
                    wrapper.modules_to_save[adapter_name].load_state_dict(wrapper.modules_to_save[source].state_dict())
    except BaseException:
        _rollback(tuner, adapter_name)
        raise
    tuner.freeze_adapter(adapter_name)


__all__ = ["COMBINATION_TYPES", "add_weighted_adapter"]
