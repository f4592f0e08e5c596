"""``prepare_model_for_kbit_training``: PEFT's helper for training adapters on a quantized model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.quantized import backend_for, ready_for_training


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
    auto_clear_cache: bool = True,
) -> nn.Module:
    """Get a quantized transformers model ready for adapter training, in place (same name and arguments as PEFT's).

    Every base parameter is frozen; half-precision parameters that are not quantized storage (layer
    norms, embeddings, the lm_head) are cast to float32 for stable training, except on torchao models
    (whose kernels need their own dtype). On a quantized model, ``use_gradient_checkpointing`` turns on
    transformers' gradient checkpointing and, for the reentrant variant (the default), makes the input
    embeddings' output require grad so the checkpointed blocks pass gradients back to the adapters.

    Args:
        model: a transformers ``PreTrainedModel`` (quantized or not).
        use_gradient_checkpointing: enable gradient checkpointing on a quantized model.
        gradient_checkpointing_kwargs: passed to ``model.gradient_checkpointing_enable``
            (e.g. ``{"use_reentrant": False}``).
        auto_clear_cache: release the CUDA allocator's cache after the casts.
    """
    layers = [m for m in model.modules() if backend_for(m) is not None]
    quantized = bool(layers) or getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    for p in model.parameters():
        p.requires_grad_(False)
    torchao = any(type(backend_for(m)).__name__ == "TorchaoInt8" for m in layers)
    if not torchao:
        for p in model.parameters():
            if p.dtype in (torch.float16, torch.bfloat16) and type(p).__name__ != "Params4bit":
                p.data = p.data.float()
        if auto_clear_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()
    ready_for_training(model)
    if quantized and use_gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        kwargs = dict(gradient_checkpointing_kwargs or {})
        if kwargs.get("use_reentrant", True):
            model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)
    return model
