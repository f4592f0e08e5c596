"""Quantized linear base layers: one backend per storage format, shared by every method.

An adapter on a quantized layer runs ``base_layer(x)`` (the quantized op, untouched) plus the
method's own update computed in full precision; only merging touches the stored weight, as
``dequantize → change → requantize``. A backend knows exactly those three things about its
format, so no method has a quantized copy of its own:

- bitsandbytes ``Linear4bit`` (nf4 / fp4, ``Params4bit`` weights),
- bitsandbytes ``Linear8bitLt`` (``Int8Params`` weights, inference mode: ``has_fp16_weights=False``),
- torchao int8 (``Int8Tensor`` weights inside a plain ``nn.Linear``: weight-only or with dynamic
  int8 activations, per-row scales).

Nothing here imports bitsandbytes or torchao at module import: a layer is recognised by the
class of its weight, and the library is imported when a weight has to be rebuilt.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..types import PeftWarning


class QuantBackend:
    """How one quantized storage format is read back and written again (stateless)."""

    name = ""

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def check(self, module: nn.Module) -> None:
        """Raise if this particular layer cannot be adapted (e.g. not quantized yet)."""

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        """A float32 (out, in) copy of the weight the layer computes with."""
        raise NotImplementedError

    def requantize(self, module: nn.Module, w: torch.Tensor) -> None:
        """Store ``w`` (out, in) in the layer, quantized as before (rounds)."""
        raise NotImplementedError

    def dtype(self, module: nn.Module) -> torch.dtype:
        """The floating dtype the weight had before quantization (used when dequantizing a model)."""
        return torch.float32

    def ready_for_backward(self, module: nn.Module) -> None:
        """Put the layer's storage in a form whose forward has a backward (a no-op for most formats)."""

    def label(self, module: nn.Module) -> str:
        return self.name


def _weight_class(module: nn.Module) -> str:
    return type(getattr(module, "weight", None)).__name__


class Bnb4bit(QuantBackend):
    name = "bitsandbytes 4-bit"

    def matches(self, module: nn.Module) -> bool:
        return _weight_class(module) == "Params4bit"

    def check(self, module: nn.Module) -> None:
        if getattr(module.weight, "quant_state", None) is None:
            raise TypeError(
                f"{type(module).__name__} holds an unquantized Params4bit: move the model to its device "
                "(bitsandbytes quantizes on .to(device)) before adding adapters."
            )

    def _standard_layout(self, module: nn.Module) -> None:
        """Undo bitsandbytes' CPU inference repacking (done by an eval forward on CPUs with AVX512-BF16).

        The repacking rounds the block scales to bfloat16 once; bitsandbytes' own inverse then re-quantizes
        them (8-bit, nested), which changes the weight again at every eval/train switch. Here the bfloat16
        scales the packed kernel used are kept, un-nested in float32, so unpacking is exact and repacking
        them is too: the weight changes at most once, on the first eval forward, as it does without adapters.
        """
        w = module.weight
        if getattr(w.quant_state, "packing_format_for_cpu", False):
            w.data, w.quant_state = self._unpacked(module)

    def _unpacked(self, module: nn.Module) -> tuple[torch.Tensor, Any]:
        """The weight's data and quant state in the standard layout, without changing the layer."""
        import copy

        w = module.weight
        state = w.quant_state
        if not getattr(state, "packing_format_for_cpu", False):
            return w.data, state
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        absmax = state.absmax.t().reshape(-1).float()  # packed: (K / blocksize, N) in bfloat16
        state = copy.copy(state)  # the inverse rewrites the state's fields
        state.original_nested = False
        data, state = _convert_weight_packed_for_cpu_inverse(w.data, state)
        state.absmax = absmax
        return data, state

    def ready_for_backward(self, module: nn.Module) -> None:
        # bitsandbytes 0.50's CPU-repacked path (gemv_4bit) has no backward: the input gradient is lost
        # (or an in-place bias add fails), so a layer repacked by an eval forward is unpacked for training
        self._standard_layout(module)

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        import bitsandbytes as bnb

        data, state = self._unpacked(module)  # an eval forward's CPU packing stays in place
        return bnb.functional.dequantize_4bit(data, state).float()

    def requantize(self, module: nn.Module, w: torch.Tensor) -> None:
        import bitsandbytes as bnb

        old = module.weight
        new = bnb.nn.Params4bit(
            w.to(self.dtype(module)).contiguous(), requires_grad=False, blocksize=old.blocksize,
            compress_statistics=old.compress_statistics, quant_type=old.quant_type,
            quant_storage=old.quant_storage, module=module,
        )
        module.weight = new._quantize(old.device)

    def dtype(self, module: nn.Module) -> torch.dtype:
        state = module.weight.quant_state
        return state.original_dtype if getattr(state, "packing_format_for_cpu", False) else state.dtype

    def label(self, module: nn.Module) -> str:
        return f"bitsandbytes 4-bit ({module.weight.quant_type})"


class Bnb8bit(QuantBackend):
    name = "bitsandbytes 8-bit"

    def matches(self, module: nn.Module) -> bool:
        return _weight_class(module) == "Int8Params"

    def _scales(self, module: nn.Module) -> torch.Tensor | None:
        # before the first forward the row scales sit on the weight, afterwards on the layer's state
        scb = getattr(module.weight, "SCB", None)
        return scb if scb is not None else getattr(getattr(module, "state", None), "SCB", None)

    def check(self, module: nn.Module) -> None:
        if module.weight.dtype != torch.int8 or self._scales(module) is None:
            raise TypeError(
                f"{type(module).__name__} is not quantized (has_fp16_weights=True or not moved to its device "
                "yet): peftkit adapts 8-bit layers in inference mode, quantized with has_fp16_weights=False."
            )

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        scb = self._scales(module)
        return module.weight.data.float() * (scb.float().view(-1, 1) / 127.0)

    def requantize(self, module: nn.Module, w: torch.Tensor) -> None:
        import bitsandbytes as bnb

        device = module.weight.device
        new = bnb.nn.Int8Params(w.float().cpu().contiguous(), requires_grad=False, has_fp16_weights=False)
        module.weight = new._quantize(device)
        state = getattr(module, "state", None)
        if state is not None:  # cached scales of the old weight: the next forward takes the new ones
            state.reset_grads()

    def dtype(self, module: nn.Module) -> torch.dtype:
        bias = getattr(module, "bias", None)
        return bias.dtype if bias is not None else torch.float32


class TorchaoInt8(QuantBackend):
    name = "torchao int8"

    def matches(self, module: nn.Module) -> bool:
        w = getattr(module, "weight", None)
        return isinstance(module, nn.Linear) and type(w).__module__.startswith("torchao")

    def check(self, module: nn.Module) -> None:
        w = module.weight
        block = list(getattr(w, "block_size", []) or [])
        if type(w).__name__ != "Int8Tensor" or block != [1, module.in_features]:
            raise TypeError(
                f"torchao weight {type(w).__name__} (block_size={block or None}) is not supported: peftkit adapts "
                "torchao int8 layers with per-row scales (Int8WeightOnlyConfig or "
                "Int8DynamicActivationInt8WeightConfig)."
            )

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return module.weight.dequantize().float()

    def requantize(self, module: nn.Module, w: torch.Tensor) -> None:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

        old = module.weight
        config = Int8WeightOnlyConfig() if old.act_quant_kwargs is None else Int8DynamicActivationInt8WeightConfig()
        # torchao rebuilds the whole layer's weight: quantize a scratch layer, then take its weight
        scratch = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
        scratch.weight = nn.Parameter(w.to(device=old.device, dtype=old.dtype), requires_grad=False)
        quantize_(scratch, config)
        module.weight = nn.Parameter(scratch.weight.detach(), requires_grad=False)

    def dtype(self, module: nn.Module) -> torch.dtype:
        return module.weight.dtype


BACKENDS: tuple[QuantBackend, ...] = (Bnb4bit(), Bnb8bit(), TorchaoInt8())


def backend_for(module: nn.Module) -> QuantBackend | None:
    """The backend of a quantized linear layer, or None for anything else."""
    if not isinstance(getattr(module, "weight", None), torch.Tensor):
        return None
    for backend in BACKENDS:
        if backend.matches(module):
            return backend
    return None


def ready_for_training(model: nn.Module) -> None:
    """Make every quantized layer of ``model`` able to pass gradients back (see ``ready_for_backward``)."""
    for module in model.modules():
        backend = backend_for(module)
        if backend is not None:
            backend.ready_for_backward(module)


def describe(module: nn.Module) -> str:
    """A short name for messages: "bitsandbytes 4-bit (nf4) Linear4bit"."""
    backend = backend_for(module)
    if backend is None:
        return type(module).__name__
    return f"{backend.label(module)} {type(module).__name__}"


def warn_rounding(module: nn.Module) -> None:
    warnings.warn(
        f"Merging into a {describe(module)} layer requantizes the merged weight: the result is rounded, so "
        "outputs differ slightly from the unmerged adapter's and unmerge does not restore the exact original "
        "weight. Use merge_and_unload(dequantize=True) for a full-precision merged model.",
        PeftWarning,
        stacklevel=4,
    )


def full_precision_linear(module: nn.Module, w: torch.Tensor | None = None) -> nn.Linear:
    """A plain ``nn.Linear`` with the layer's dequantized weight (or ``w``) and its bias."""
    backend = backend_for(module)
    assert backend is not None
    dtype = backend.dtype(module)
    w = backend.dequantize(module) if w is None else w
    bias = getattr(module, "bias", None)
    linear = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device="meta", dtype=dtype)
    linear.weight = nn.Parameter(w.to(dtype).contiguous(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    linear.train(module.training)
    return linear


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized linear layer of ``model`` by a full-precision ``nn.Linear``, in place.

    The transformers quantization markers (``is_quantized``, ``config.quantization_config``) are
    removed too, so ``save_pretrained`` writes an ordinary full-precision checkpoint.
    """
    for name, module in list(model.named_modules()):
        if name and backend_for(module) is not None:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, full_precision_linear(module))
    for attr, value in (("is_quantized", False), ("hf_quantizer", None), ("is_loaded_in_4bit", False),
                        ("is_loaded_in_8bit", False)):
        if getattr(model, attr, None):
            try:
                setattr(model, attr, value)
            except AttributeError:  # a read-only property in some transformers versions
                pass
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    return model
