"""Hot-swapping: replace a loaded LoRA adapter's weights in place, without re-injecting layers.

The layers, their parameters and the model's structure stay the same objects, so a
``torch.compile``d model keeps its compiled graph. Two things would otherwise force a
recompile and are avoided here:

- a different rank changes tensor shapes: ``prepare_model_for_compiled_hotswap`` pads every
  adapter to one rank first (zero rows of A, zero columns of B: the function is unchanged), and
  a swapped-in adapter of lower rank is zero-padded into the same tensors;
- a different scaling (``alpha / r``) would change a Python constant: instead, the ratio of
  the new scaling to the layer's current one is folded into B, so the layer's ``scaling`` never
  changes. The model computes exactly the new adapter's function.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..config import PeftConfig
from ..core.layer import AdapterLayer
from ..core.targeting import pattern_value
from ..io.keys import adapter_key_map
from ..io.serialization import read_adapter_weights
from ..mapping import _normalise_key, _tuner

_MUST_MATCH = ("peft_type", "use_dora", "lora_bias")


def hotswap_adapter(
    model: nn.Module, model_name_or_path: str | os.PathLike, adapter_name: str = "default", torch_device: Any = None, **kwargs: Any
) -> None:
    """Load the adapter at ``model_name_or_path`` into the existing adapter ``adapter_name`` in place.

    Args:
        model: a ``PeftModel`` that already holds ``adapter_name`` (possibly compiled).
        model_name_or_path: a folder written by ``save_pretrained`` (peftkit or PEFT), or a Hub id.
        adapter_name: the adapter whose weights are replaced.
        torch_device: unused (tensors go to each parameter's own device); kept for PEFT's signature.
    """
    config = PeftConfig.from_pretrained(model_name_or_path, subfolder=kwargs.get("subfolder"))
    state = read_adapter_weights(model_name_or_path, kwargs.get("subfolder"))
    hotswap_adapter_from_state_dict(model, state, adapter_name, config)


def hotswap_adapter_from_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str, config: PeftConfig
) -> None:
    """Replace ``adapter_name``'s tensors with ``state_dict`` (checkpoint keys); checks all before changing any."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper
    tuner = _tuner(model)
    if adapter_name not in tuner.peft_config:
        raise ValueError(f"No adapter {adapter_name!r} to hot-swap into: this model has {list(tuner.peft_config)}.")
    old = tuner.peft_config[adapter_name]
    for key in _MUST_MATCH:
        if getattr(old, key, None) != getattr(config, key, None):
            raise ValueError(f"Cannot hot-swap: {key} is {getattr(old, key, None)!r} here and {getattr(config, key, None)!r} in the new adapter.")
    layers = [layer for _, layer in tuner.adapter_layers()]
    if any(adapter_name in layer.merged_adapters for layer in layers):
        raise ValueError(f"Adapter {adapter_name!r} is merged: call unmerge_adapter() before hot-swapping it.")

    slots = adapter_key_map(tuner, adapter_name)
    state = {_normalise_key(k): v for k, v in state_dict.items()}
    unexpected = [k for k in state if k not in slots]
    if unexpected:
        raise RuntimeError(f"Cannot hot-swap: the new adapter has tensors for modules this one lacks: {unexpected[:5]}")
    for key, value in state.items():
        old_shape = tuple(slots[key].get().shape)
        if len(old_shape) != value.dim() or any(n > o for n, o in zip(value.shape, old_shape)):
            raise ValueError(
                f"Cannot hot-swap {key}: new shape {tuple(value.shape)} does not fit {old_shape}. Pad every adapter "
                "to the largest rank first with prepare_model_for_compiled_hotswap(model, target_rank=...)."
            )

    with torch.no_grad():
        for key, slot in slots.items():
            tensor = slot.get()
            tensor.zero_()  # modules the new adapter does not touch contribute nothing
            if key in state:
                value = state[key]
                tensor[tuple(slice(0, n) for n in value.shape)].copy_(value)
        for path, layer in tuner.adapter_layers():
            if adapter_name in layer.adapters:
                _fold_scaling(layer, adapter_name, config, path)


def _fold_scaling(layer: AdapterLayer, adapter: str, config: Any, path: str) -> None:
    """Keep the layer's scaling constant: put new_scaling / current_scaling into B."""
    rank = pattern_value(config.rank_pattern, path, config.r)
    alpha = pattern_value(config.alpha_pattern, path, config.lora_alpha)
    new = alpha / (rank**0.5 if config.use_rslora else rank)
    ratio = new / layer.scaling[adapter]
    if ratio == 1.0:
        return
    if adapter in layer.lora_B:
        layer.lora_B[adapter].weight.mul_(ratio)
        if layer.lora_B[adapter].bias is not None:
            layer.lora_B[adapter].bias.mul_(ratio)
    else:
        layer.lora_embedding_B[adapter].mul_(ratio)


def prepare_model_for_compiled_hotswap(model: nn.Module, target_rank: int | None = None, config: Any = None) -> None:
    """Pad every LoRA adapter to ``target_rank`` (default: the largest rank present) before compiling.

    Zero rows are added to A and zero columns to B, so outputs do not change; afterwards any
    adapter of rank ≤ ``target_rank`` can be hot-swapped in without new tensor shapes.

    Args:
        model: the ``PeftModel`` (not yet compiled).
        target_rank: the rank to pad to.
        config: unused; kept for PEFT's signature.
    """
    if hasattr(model, "_orig_mod"):
        raise ValueError("Call prepare_model_for_compiled_hotswap before torch.compile.")
    tuner = _tuner(model)
    layers = [layer for _, layer in tuner.adapter_layers()]
    if not layers:
        raise ValueError("No LoRA layers found: nothing to prepare.")
    ranks = [r for layer in layers for r in layer.r.values()]
    target = target_rank if target_rank is not None else max(ranks)
    if max(ranks) > target:
        raise ValueError(f"target_rank={target} is smaller than an existing rank ({max(ranks)}).")
    for layer in layers:
        for adapter, r in list(layer.r.items()):
            if r < target:
                _pad(layer, adapter, target)


def _pad(layer: AdapterLayer, adapter: str, target: int) -> None:
    def grown(p: torch.Tensor, dim: int) -> nn.Parameter:
        shape = list(p.shape)
        shape[dim] = target
        new = p.new_zeros(shape)
        new.narrow(dim, 0, p.shape[dim]).copy_(p.detach())
        return nn.Parameter(new, requires_grad=p.requires_grad)

    if adapter in layer.lora_A:
        a, b = layer.lora_A[adapter], layer.lora_B[adapter]
        a.weight = grown(a.weight, 0)
        b.weight = grown(b.weight, 1)
        for mod, attr, dim in ((a, "out_features", 0), (a, "out_channels", 0), (b, "in_features", 1), (b, "in_channels", 1)):
            if hasattr(mod, attr):
                setattr(mod, attr, target)
    else:
        layer.lora_embedding_A[adapter] = grown(layer.lora_embedding_A[adapter], 0)
        layer.lora_embedding_B[adapter] = grown(layer.lora_embedding_B[adapter], 1)
    # the function is unchanged: keep scaling = alpha / r_original, only the storage grows
    layer.r[adapter] = target
