"""LoHa: low-rank Hadamard-product adaptation."""

from __future__ import annotations

from typing import Any

from ...core.targeting import pattern_value
from ...registry import MethodSpec, register_method
from ...types import PeftType
from ..lora import DEFAULT_TARGETS
from .config import LoHaConfig
from .layer import LoHaLayer


def _per_layer(config: LoHaConfig, key: str) -> dict[str, Any]:
    return {
        "r": pattern_value(config.rank_pattern, key, config.r),
        "alpha": pattern_value(config.alpha_pattern, key, config.alpha),
    }


register_method(
    MethodSpec(
        peft_type=PeftType.LOHA,
        config=LoHaConfig,
        layer=LoHaLayer,
        prefix="hada_",
        default_targets=DEFAULT_TARGETS,
        per_layer=_per_layer,
    )
)

__all__ = ["LoHaConfig", "LoHaLayer"]
