"""LoRA's math on the engine: ``out = base(x) + scaling · B(A(dropout(x)))``, never forming ``B @ A`` in forward."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.layer import AdapterLayer
from ...kernels.lora import lora_linear


class LoraLayer(AdapterLayer):
    """LoRA on a Linear, transformers Conv1D, Embedding or Conv1d/2d/3d base layer."""

    prefix = "lora_"
    adapter_attrs = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
    other_attrs = ("lora_dropout", "r", "lora_alpha", "scaling", "lora_bias")

    def __init__(self, base_layer: nn.Module, ops: Any = None) -> None:
        super().__init__(base_layer, ops)
        if self.ops.kind == "conv" and getattr(base_layer, "groups", 1) != 1:
            raise TypeError(f"LoRA on a grouped convolution (groups={base_layer.groups}) is not supported.")
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_bias: dict[str, bool] = {}

    # ------------------------------------------------------------------ create
    def create(self, adapter: str, config: Any, *, r: int, alpha: float, device: Any = None) -> None:
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got r={r} for adapter {adapter!r}.")
        base = self.base_layer
        kind = self.ops.kind
        if config.lora_bias and kind == "embedding":
            raise ValueError("lora_bias=True is not supported on embedding layers.")
        if config.lora_bias and getattr(base, "bias", None) is None:
            warnings.warn(f"lora_bias=True on a {type(base).__name__} without bias: this adapter will not merge.")
        device = device if device is not None else base.weight.device
        dtype = self.adapter_dtype()
        fk = {"device": device, "dtype": dtype}
        if kind == "embedding":
            self.lora_embedding_A[adapter] = nn.Parameter(torch.empty(r, self.in_features, **fk))
            self.lora_embedding_B[adapter] = nn.Parameter(torch.empty(self.out_features, r, **fk))
        elif kind == "linear":
            self.lora_A[adapter] = _skip_init(nn.Linear, self.in_features, r, bias=False, **fk)
            self.lora_B[adapter] = _skip_init(nn.Linear, r, self.out_features, bias=config.lora_bias, **fk)
        else:
            conv = type(base)
            ones = (1,) * self.ops.conv_dim
            self.lora_A[adapter] = _skip_init(
                conv, self.in_features, r, base.kernel_size, base.stride, base.padding, dilation=base.dilation,
                bias=False, **fk,
            )
            self.lora_B[adapter] = _skip_init(conv, r, self.out_features, ones, ones, bias=config.lora_bias, **fk)
        p = config.lora_dropout
        self.lora_dropout[adapter] = nn.Dropout(p) if p > 0 else nn.Identity()
        self.r[adapter] = r
        self.lora_alpha[adapter] = alpha
        self.scaling[adapter] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        self.lora_bias[adapter] = bool(config.lora_bias)
        if torch.device(device).type != "meta":
            self.reset_parameters(adapter, config.init_lora_weights)

    @torch.no_grad()
    def reset_parameters(self, adapter: str, init: bool | str) -> None:
        """Initialise one adapter: True/"gaussian" start at the base model, False is random (tests)."""
        if adapter in self.lora_embedding_A:
            a, b = self.lora_embedding_A[adapter], self.lora_embedding_B[adapter]
            if init is False:
                a.normal_(), b.normal_()
            else:  # B random, A zero: PEFT's choice for embeddings
                a.zero_(), b.normal_()
            return
        a, b = self.lora_A[adapter], self.lora_B[adapter]
        if init == "gaussian":
            nn.init.normal_(a.weight, std=1 / self.r[adapter])
        else:
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(b.weight, a=math.sqrt(5))
            if b.bias is not None:
                nn.init.uniform_(b.bias, -0.1, 0.1)
        else:
            b.weight.zero_()
            if b.bias is not None:
                b.bias.zero_()

    # ------------------------------------------------------------------ math
    def _factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A as (r, fan_in) and B as (out, r)."""
        if adapter in self.lora_embedding_A:
            return self.lora_embedding_A[adapter], self.lora_embedding_B[adapter]
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        return a.view(a.shape[0], -1), b.view(b.shape[0], -1)

    def delta_weight(self, adapter: str) -> torch.Tensor:
        a, b = self._factors(adapter)
        return (b @ a) * self.scaling[adapter]

    def merge_into(self, adapter: str, w2d: torch.Tensor, sign: float) -> None:
        a, b = self._factors(adapter)
        if a.dtype == w2d.dtype:
            w2d.addmm_(b, a, alpha=sign * self.scaling[adapter])  # no (out, in) temporary
        else:
            w2d.add_(((b @ a) * self.scaling[adapter]).to(w2d.dtype), alpha=sign)

    def bias_delta(self, adapter: str) -> torch.Tensor | None:
        if not self.lora_bias.get(adapter):
            return None
        return self.lora_B[adapter].bias * self.scaling[adapter]

    def fused_forward(self, adapter: str, x: torch.Tensor) -> torch.Tensor | None:
        """Training path for plain linear layers: one autograd node for base + adapter."""
        if not self._fusable or not torch.is_grad_enabled() or adapter not in self.lora_A:
            return None
        a_mod, b_mod = self.lora_A[adapter], self.lora_B[adapter]
        base = self.base_layer
        w, bias = self.ops.weight2d(base), base.bias
        if (
            b_mod.bias is not None
            or w.requires_grad
            or (bias is not None and bias.requires_grad)
            or x.dtype != a_mod.weight.dtype
            or w.dtype != x.dtype
            or (self.training and isinstance(self.lora_dropout[adapter], nn.Dropout))
            or base._forward_hooks
            or base._forward_pre_hooks
        ):
            return None
        return lora_linear(x, w, bias, a_mod.weight, b_mod.weight, self.scaling[adapter])

    @property
    def _fusable(self) -> bool:
        """Only the stock layers: a subclass (quantized, hooked) keeps its own forward."""
        base = self.base_layer
        return self.ops.kind == "linear" and (type(base) is nn.Linear or (self.ops.transposed and type(base).__name__ == "Conv1D"))

    def adapt(self, adapter: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        scale = self.scaling[adapter]
        kind = self.ops.kind
        if kind == "embedding":
            base = self.base_layer
            a, b = self.lora_embedding_A[adapter], self.lora_embedding_B[adapter]
            h = F.embedding(x, a.t(), base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
            return _add_scaled(out, h, b, None, scale)
        drop = self.lora_dropout[adapter]
        a_mod, b_mod = self.lora_A[adapter], self.lora_B[adapter]
        if x.dtype != a_mod.weight.dtype:
            x = x.to(a_mod.weight.dtype)
        if self.training and isinstance(drop, nn.Dropout):
            x = drop(x)
        if kind == "conv":
            return out + (b_mod(a_mod(x)) * scale).to(out.dtype)
        h = F.linear(x, a_mod.weight)  # (..., r)
        return _add_scaled(out, h, b_mod.weight, b_mod.bias, scale)


def _add_scaled(out: torch.Tensor, h: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``out + scale · (h @ Bᵀ + bias)`` as one addmm: no separate scale and add passes."""
    if out.dtype != h.dtype or bias is not None:
        return out + (F.linear(h, b, bias) * scale).to(out.dtype)
    o2 = out.reshape(-1, out.shape[-1])  # (N, out)
    h2 = h.reshape(-1, h.shape[-1])  # (N, r)
    if not torch.is_grad_enabled() or not (o2.requires_grad or h2.requires_grad or b.requires_grad):
        return o2.addmm_(h2, b.t(), alpha=scale).view(out.shape)
    return torch.addmm(o2, h2, b.t(), alpha=scale).view(out.shape)


def _skip_init(cls: type[nn.Module], *args: Any, device: Any, dtype: torch.dtype, **kwargs: Any) -> nn.Module:
    """Build a layer without its default initialisation (``reset_parameters`` sets the values)."""
    module = cls(*args, device="meta", dtype=dtype, **kwargs)
    return module if torch.device(device).type == "meta" else module.to_empty(device=device)
