"""SHiRA: sparse high-rank adapters (a fixed set of trained entries per weight)."""

from __future__ import annotations

from typing import Any

from ...registry import MethodSpec, register_method
from ...types import PeftType
from ..lora import DEFAULT_TARGETS
from .config import ShiraConfig
from .layer import ShiraLayer
from .mask import random_mask
from .weighted import add_weighted_adapter


def _per_layer(config: ShiraConfig, key: str) -> dict[str, Any]:
    return {"name": key}  # the layer's name seeds its random mask


register_method(
    MethodSpec(
        peft_type=PeftType.SHIRA,
        config=ShiraConfig,
        layer=ShiraLayer,
        prefix="shira_",
        default_targets={**DEFAULT_TARGETS, "phi": ["q_proj", "v_proj"]},
        per_layer=_per_layer,
        weighted=add_weighted_adapter,
    )
)

__all__ = ["ShiraConfig", "ShiraLayer", "random_mask"]
