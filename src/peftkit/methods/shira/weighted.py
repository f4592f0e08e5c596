"""``add_weighted_adapter`` for SHiRA: ``ΔW = Σ w_i s_i S_i`` over the union of the positions.

Sparse deltas add exactly, so there is one combination type, "linear". The new adapter's
entry count is the size of the union at each layer (it is not ``r·(m+n)``); peftkit loads such
files, PEFT (which expects ``r·(m+n)`` entries) does not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch


def add_weighted_adapter(
    tuner: Any, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
    combination_type: str = "linear", **unused: Any,
) -> None:
    """Add ``adapter_name`` = the weighted sum of SHiRA ``adapters`` (see the module docstring)."""
    adapters, weights = list(adapters), [float(w) for w in weights]
    if not adapters or len(adapters) != len(weights):
        raise ValueError(f"Give one weight per adapter: got {len(adapters)} adapters and {len(weights)} weights.")
    if combination_type != "linear":
        raise ValueError(f"SHiRA adapters combine linearly (combination_type='linear'), not {combination_type!r}.")
    ignored = sorted(k for k, v in unused.items() if v is not None and k not in ("majority_sign_method",))
    if ignored:
        raise ValueError(f"{', '.join(ignored)} do not apply to SHiRA's linear combination.")
    configs = [tuner.peft_config[a] for a in adapters]
    if len({str(sorted(c.target_modules) if isinstance(c.target_modules, set) else c.target_modules)
            for c in configs}) > 1:
        raise ValueError("add_weighted_adapter needs SHiRA adapters with the same target_modules.")
    config = dataclasses.replace(configs[0], inference_mode=True)
    config.mask_fn = None
    tuner.inject_adapter(adapter_name, config, low_cpu_mem_usage=True)  # on meta: no mask is drawn
    with torch.no_grad():
        for _, layer in tuner.adapter_layers():
            if adapter_name not in layer.adapters:
                continue
            _combine(layer, [(a, w) for a, w in zip(adapters, weights) if a in layer.adapters], adapter_name)
    tuner.freeze_adapter(adapter_name)


def _combine(layer: Any, sources: list[tuple[str, float]], name: str) -> None:
    weight = layer.base_layer.weight
    cols = weight.shape[1]
    device = weight.device
    flats, vals = [], []
    for a, w in sources:
        idx = layer.shira_indices[a].long()
        flats.append(idx[0] * cols + idx[1])
        vals.append(layer.shira_weight[a].detach() * (w * layer.scaling[a]))
    if flats:
        union, inverse = torch.unique(torch.cat(flats), return_inverse=True)  # sorted: row-major order
        values = torch.zeros(union.numel(), dtype=layer.adapter_dtype(), device=device)
        values.index_add_(0, inverse, torch.cat(vals).to(values.dtype))
    else:
        union = torch.empty(0, dtype=torch.int64, device=device)
        values = torch.empty(0, dtype=layer.adapter_dtype(), device=device)
    layer.shira_indices[name] = torch.stack([union // cols, union % cols]).to(torch.int32)
    layer.shira_weight[name] = torch.nn.Parameter(values, requires_grad=False)
