"""``add_weighted_adapter`` for (IA)³: ``l_new = Σ w_i l_i`` per layer (PEFT's combination).

The new adapter targets the union of the sources' target modules (and feed-forward modules);
a layer a source does not adapt contributes nothing from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from ...core.wrappers import ModulesToSaveWrapper
from .config import is_feedforward


def _union(values: list[Any], what: str) -> Any:
    kinds = {type(v) for v in values}
    if len(kinds) > 1:
        raise ValueError(f"add_weighted_adapter needs (IA)³ adapters whose {what} are all lists or all regex strings.")
    if str in kinds:
        return "|".join(f"({v})" for v in values)
    if kinds == {type(None)}:
        return None
    return set().union(*values)


def add_weighted_adapter(
    tuner: Any, adapters: Sequence[str], weights: Sequence[float], adapter_name: str, **options: Any
) -> None:
    """Add ``adapter_name`` whose vectors are the weighted sums of the ``adapters``' vectors."""
    given = sorted(k for k, v in options.items() if v is not None)
    if given:
        raise ValueError(f"(IA)³ adapters combine linearly; {', '.join(given)} do not apply.")
    adapters, weights = list(adapters), [float(w) for w in weights]
    for _, module in tuner.wrappers():
        if isinstance(module, ModulesToSaveWrapper) and sum(a in module.modules_to_save for a in adapters) > 1:
            raise ValueError("Cannot combine adapters that both train the same module in modules_to_save.")
    configs = [tuner.peft_config[a] for a in adapters]
    config = dataclasses.replace(
        configs[0],
        target_modules=_union([c.target_modules for c in configs], "target_modules"),
        feedforward_modules=_union([c.feedforward_modules for c in configs], "feedforward_modules"),
    )
    for name, layer in tuner.adapter_layers():  # refuse before anything changes
        for a in adapters:
            if a in layer.adapters and layer.feedforward[a] != is_feedforward(config, name):
                raise ValueError(
                    f"Adapter {a!r} scales the {'input' if layer.feedforward[a] else 'output'} of {name}, but the "
                    "combined adapter would scale the other side: they cannot be combined (give the adapters the "
                    "same feedforward_modules)."
                )
    tuner.inject_adapter(adapter_name, config)
    with torch.no_grad():
        for name, layer in tuner.adapter_layers():
            if adapter_name not in layer.ia3_l:
                continue
            target = layer.ia3_l[adapter_name]
            target.zero_()
            for a, w in zip(adapters, weights):
                if a not in layer.ia3_l:
                    continue
                source = layer.ia3_l[a]
                target.add_(source.to(target.dtype), alpha=w)
    tuner.freeze_adapter(adapter_name)
