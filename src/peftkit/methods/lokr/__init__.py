"""LoKr: low-rank Kronecker-product adaptation."""

from __future__ import annotations

from ...registry import MethodSpec, register_method
from ...types import PeftType
from ..lora import DEFAULT_TARGETS
from ..lycoris import rank_and_alpha
from .config import LoKrConfig
from .layer import LoKrLayer, factorization


register_method(
    MethodSpec(
        peft_type=PeftType.LOKR,
        config=LoKrConfig,
        layer=LoKrLayer,
        prefix="lokr_",
        default_targets=DEFAULT_TARGETS,
        per_layer=rank_and_alpha,
    )
)

__all__ = ["LoKrConfig", "LoKrLayer", "factorization"]
