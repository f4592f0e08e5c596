"""BOFT: orthogonal butterfly fine-tuning."""

from __future__ import annotations

from ...registry import MethodSpec, register_method
from ...types import PeftType
from ..lora import DEFAULT_TARGETS
from .config import BOFTConfig
from .layer import BOFTLayer

register_method(
    MethodSpec(peft_type=PeftType.BOFT, config=BOFTConfig, layer=BOFTLayer, prefix="boft_",
               default_targets=DEFAULT_TARGETS)
)

__all__ = ["BOFTConfig", "BOFTLayer"]
