"""X-LoRA: a mixture of trained LoRA experts, weighted per token by a classifier over the hidden states."""

from __future__ import annotations

from ...registry import MethodSpec, register_method
from ...types import PeftType
from .classifier import XLoraClassifier
from .config import XLoraConfig
from .layer import XLoraLayer
from .model import XLoraModel

register_method(MethodSpec(peft_type=PeftType.XLORA, config=XLoraConfig, engine=XLoraModel))

__all__ = ["XLoraClassifier", "XLoraConfig", "XLoraLayer", "XLoraModel"]
