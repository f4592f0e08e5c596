"""OFT: orthogonal fine-tuning with block-diagonal rotations of a layer's input."""

from __future__ import annotations

from ...registry import MethodSpec, register_method
from ...types import PeftType
from ..lora import DEFAULT_TARGETS
from .config import OFTConfig
from .layer import OFTLayer, OFTRotation

register_method(
    MethodSpec(peft_type=PeftType.OFT, config=OFTConfig, layer=OFTLayer, prefix="oft_", default_targets=DEFAULT_TARGETS)
)

__all__ = ["OFTConfig", "OFTLayer", "OFTRotation"]
