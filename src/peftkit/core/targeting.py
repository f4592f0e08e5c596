"""Which modules of a model an adapter config selects, and with which rank and alpha.

The rules are PEFT's, so that a config selects the same modules in both libraries:

- ``target_modules`` as a string: ``re.fullmatch`` against the full module name;
  as a list: the exact name, or a name that ends in ``"." + entry``;
  ``"all-linear"``: every linear layer except the model's output head.
- ``exclude_modules``: the same two forms; ``modules_to_save`` are never targets.
- ``layers_to_transform`` (list targets only): the layer index is the number after
  ``layers_pattern``, or after the first numbered path segment.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from torch import nn

from ..types import NoMatchingPeftModuleError

ALL_LINEAR = "all-linear"


def _matches_list(key: str, names: Iterable[str]) -> bool:
    return any(key == n or key.endswith("." + n) for n in names)


def _layer_index(key: str, layers_pattern: str | list[str] | None) -> int | None:
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        m = None
        for pattern in patterns:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if m is not None:
                break
    return int(m.group("idx")) if m else None


def is_excluded(config: Any, key: str) -> bool:
    """True when ``exclude_modules`` or ``modules_to_save`` rule the module out."""
    exclude = getattr(config, "exclude_modules", None)
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return True
        elif _matches_list(key, exclude):
            return True
    for m in getattr(config, "modules_to_save", None) or ():
        if re.match(rf"(^|.*\.){m}($|\..*)", key):
            return True
    return False


def is_target(config: Any, key: str) -> bool:
    """True when the config adapts the module called ``key``."""
    if is_excluded(config, key):
        return False
    targets = config.target_modules
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if not _matches_list(key, targets):
        return False
    layers = getattr(config, "layers_to_transform", None)
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    idx = _layer_index(key, getattr(config, "layers_pattern", None))
    if idx is None:
        return False
    return idx == layers if isinstance(layers, int) else idx in layers


def expand_all_linear(modules: list[tuple[str, nn.Module]], model: nn.Module, linear_types: tuple[type, ...]) -> set[str]:
    """Turn ``"all-linear"`` into the set of linear module suffixes, without the output head.

    Args:
        modules: (name, module) pairs to consider, with already-wrapped layers given as their base layer.
        model: the model, asked for its output head.
        linear_types: the module types that count as linear.
    """
    names = {name.rsplit(".", 1)[-1] for name, mod in modules if isinstance(mod, linear_types)}
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None:
        for name, mod in model.named_modules():
            if mod is head:
                names.discard(name.rsplit(".", 1)[-1])
    return names


def pattern_value(pattern: dict[str, Any], key: str, default: Any) -> Any:
    """The value of the first pattern key (dict order) that matches the module name, else ``default``."""
    for pat, value in pattern.items():
        if re.match(rf"(.*\.)?({pat})$", key):
            return value
    return default


def no_match_error(config: Any, modules: list[tuple[str, nn.Module]], model: nn.Module) -> NoMatchingPeftModuleError:
    """An error for a config that selects nothing, naming a few modules that do exist."""
    leaves = [n for n, m in modules if n and (not list(m.children()) or hasattr(m, "base_layer"))]
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in leaves})
    sample = ", ".join(suffixes[:12]) + (", ..." if len(suffixes) > 12 else "")
    return NoMatchingPeftModuleError(
        f"target_modules={config.target_modules!r} matched no module of {type(model).__name__}"
        + (f" (exclude_modules={config.exclude_modules!r})" if getattr(config, "exclude_modules", None) else "")
        + f". Module names in this model end in: {sample}. Pass some of these as target_modules."
    )
