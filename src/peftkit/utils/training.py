"""Training helpers: input gradients for checkpointing, and ``prepare_model_for_kbit_training``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Quantization schemes whose weights must not be cast (PEFT's list; bitsandbytes is handled per tensor).
_NO_UPCAST_METHODS = ("gptq", "aqlm", "eetq", "hqq", "torchao")


def _mark_output_requires_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
    output.requires_grad_(True)


def checkpointing_is_on(model: nn.Module) -> bool:
    """Whether a transformers model has activation (gradient) checkpointing on; False for other modules."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers 5 name first
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def enable_input_require_grads(model: nn.Module) -> None:
    """Make the input embeddings' output require grad, once.

    With a frozen base and reentrant checkpointing, a checkpointed block whose inputs do not require
    grad is cut out of the graph: the adapters inside it would get no gradient.
    """
    if getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None):
        return  # transformers (or an earlier call) already installed it
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
        return
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None:
        raise ValueError(
            f"{type(model).__name__} has no get_input_embeddings(): make the inputs of the checkpointed blocks "
            "require grad yourself, or use non-reentrant checkpointing (use_reentrant=False)."
        )
    model._require_grads_hook = embeddings.register_forward_hook(_mark_output_requires_grad)


def gradient_checkpointing_enable(model: nn.Module, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
    """Turn on the base model's activation checkpointing and make the inputs require grad.

    Args:
        model: the base model (a transformers ``PreTrainedModel``).
        gradient_checkpointing_kwargs: passed to ``torch.utils.checkpoint.checkpoint``
            (``{"use_reentrant": False}`` by default in transformers).
        **kwargs: other options of the base model's method (``every_n_layers``, ``offload``).
    """
    _checkpointing_enable(model, gradient_checkpointing_kwargs, **kwargs)
    enable_input_require_grads(model)


def _checkpointing_enable(model: nn.Module, gradient_checkpointing_kwargs: dict | None, **kwargs: Any) -> None:
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x name
    if enable is not None:
        enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)
    else:
        raise ValueError(
            f"{type(model).__name__} has no gradient_checkpointing_enable(): wrap its blocks with "
            "torch.utils.checkpoint yourself, or use a transformers model."
        )


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict | None = None,
) -> nn.Module:
    """Get a (quantized) base model ready for adapter training, as PEFT's function of the same name does.

    Freezes every parameter; casts float16/bfloat16 parameters to float32 (not bitsandbytes 4-bit
    tensors, and nothing at all for GPTQ/AQLM/EETQ/HQQ/torchao models); and, for a quantized model
    with ``use_gradient_checkpointing``, enables gradient checkpointing, first making the inputs
    require grad unless ``use_reentrant=False`` is asked for. Call it before ``get_peft_model``.

    Args:
        model: the base model, changed in place.
        use_gradient_checkpointing: enable gradient checkpointing (quantized models only, as in PEFT).
        gradient_checkpointing_kwargs: passed to ``torch.utils.checkpoint.checkpoint``.

    Returns:
        The same model.
    """
    from ..core.quantized import backend_for, ready_for_training

    kwargs = dict(gradient_checkpointing_kwargs or {})
    method = str(getattr(model, "quantization_method", None) or "").lower()
    method = method.split(".")[-1]  # a QuantizationMethod enum prints as its value or as Enum.NAME
    backends = [backend_for(m) for m in model.modules()]
    backends = [b for b in backends if b is not None]  # quantized layers, also ones not made by transformers
    in_kbit = bool(backends) or bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False))
    keeps_dtype = (method in _NO_UPCAST_METHODS or getattr(model, "hqq_quantized", False)
                   or any(type(b).__name__ == "TorchaoInt8" for b in backends))

    for param in model.parameters():
        param.requires_grad = False
    if not keeps_dtype:
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
                param.data = param.data.to(torch.float32)

    ready_for_training(model)  # 4-bit layers an eval forward repacked get their trainable layout back
    if (in_kbit or keeps_dtype) and use_gradient_checkpointing:
        if kwargs.get("use_reentrant", True):
            enable_input_require_grads(model)
        _checkpointing_enable(model, kwargs)
    return model
