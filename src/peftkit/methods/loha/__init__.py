"""LoHa: low-rank Hadamard-product adaptation."""

from __future__ import annotations

from ...registry import MethodSpec, register_method
from ...types import PeftType
from ..lora import DEFAULT_TARGETS
from ..lycoris import rank_and_alpha
from .config import LoHaConfig
from .layer import LoHaLayer

register_method(
    MethodSpec(
        peft_type=PeftType.LOHA,
        config=LoHaConfig,
        layer=LoHaLayer,
        prefix="hada_",
        default_targets=DEFAULT_TARGETS,
        per_layer=rank_and_alpha,
    )
)

__all__ = ["LoHaConfig", "LoHaLayer"]
