"""One small class per kind of base layer an adapter can wrap.

Each gives the layer's sizes and a 2-D view of its weight in the canonical
``(out_features, fan_in)`` layout, so a method's merge is one code path for every kind:
``nn.Linear`` (out, in); transformers ``Conv1D`` stores (in, out) and is viewed transposed;
``nn.Embedding`` (num, dim) is a linear map from one-hot ids, viewed as (dim, num);
``nn.ConvNd`` (out, in, *k) is viewed as (out, in·prod(k)). A quantized linear layer
(bitsandbytes 4-/8-bit, torchao int8) is kind "linear" with a ``quant`` backend
(``core/quantized.py``): its weight is read as a dequantized copy and written back by requantizing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .quantized import QuantBackend, backend_for


@dataclass(frozen=True)
class BaseOps:
    """Facts about one base layer.

    Attributes:
        kind: "linear" (nn.Linear and Conv1D), "embedding" or "conv".
        in_features: input features (num_embeddings for an embedding, in_channels for a conv).
        out_features: output features (embedding_dim, out_channels).
        transposed: the stored weight is (in, out) (transformers Conv1D).
        conv_dim: 1, 2 or 3 for convolutions, else 0.
        quant: the backend of a quantized linear layer, else None.
    """

    kind: str
    in_features: int
    out_features: int
    transposed: bool = False
    conv_dim: int = 0
    quant: QuantBackend | None = None

    def weight2d(self, layer: nn.Module) -> torch.Tensor:
        """The base weight as an (out, fan_in) view that writes through to the layer.

        For a quantized layer: a float32 dequantized copy (write it back with ``quant.requantize``).
        """
        if self.quant is not None:
            return self.quant.dequantize(layer)
        w = layer.weight
        if self.kind == "linear":
            return w.t() if self.transposed else w
        if self.kind == "embedding":
            return w.t()
        return w.view(w.shape[0], -1)


def is_transformers_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


_CONV_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


def ops_for(module: nn.Module) -> BaseOps | None:
    """The ops for a module, or None when no adapter can wrap it."""
    quant = backend_for(module)
    if quant is not None:
        return BaseOps("linear", module.in_features, module.out_features, quant=quant)
    if isinstance(module, nn.Linear):
        return BaseOps("linear", module.in_features, module.out_features)
    if is_transformers_conv1d(module):
        return BaseOps("linear", module.weight.shape[0], module.weight.shape[1], transposed=True)
    if isinstance(module, nn.Embedding):
        return BaseOps("embedding", module.num_embeddings, module.embedding_dim)
    for cls, dim in _CONV_DIMS.items():
        if type(module) is cls or isinstance(module, cls):
            return BaseOps("conv", module.in_channels, module.out_channels, conv_dim=dim)
    return None


def linear_types() -> tuple[type, ...]:
    """Module types that ``"all-linear"`` selects."""
    types: list[type] = [nn.Linear]
    try:
        from transformers.pytorch_utils import Conv1D

        types.append(Conv1D)
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    return tuple(types)

