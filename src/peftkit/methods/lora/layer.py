"""LoRA's math on the engine: ``out = base(x) + scaling · B(A(dropout(x)))``, never forming ``B @ A`` in forward."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.layer import AdapterLayer
from ...kernels.lora import dora_linear, lora_linear
from ...types import PeftWarning
from .dora import Magnitude, channel_view, row_norm_of_sum
from .init import olora, parse_pissa, pissa


class LoraLayer(AdapterLayer):
    """LoRA on a Linear, transformers Conv1D, Embedding or Conv1d/2d/3d base layer."""

    prefix = "lora_"
    quantized_ok = True
    adapter_attrs = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    other_attrs = ("lora_dropout", "r", "lora_alpha", "scaling", "lora_bias", "use_dora", "_dora_merge_norm")

    def __init__(self, base_layer: nn.Module, ops: Any = None) -> None:
        super().__init__(base_layer, ops)
        if self.ops.kind == "conv" and getattr(base_layer, "groups", 1) != 1:
            raise TypeError(f"LoRA on a grouped convolution (groups={base_layer.groups}) is not supported.")
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.use_dora: dict[str, bool] = {}
        self._dora_merge_norm: dict[str, torch.Tensor] = {}  # the norm at merge time, for an exact unmerge
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
        if self.ops.quant is not None and _changes_base(config.init_lora_weights):
            raise ValueError(
                f"init_lora_weights={config.init_lora_weights!r} on a quantized base layer is not supported by "
                "peftkit: use another init on the quantized model, or load the base model unquantized."
            )
        if config.lora_bias and getattr(base, "bias", None) is None:
            warnings.warn(
                f"lora_bias=True on a {type(base).__name__} without bias: this adapter will not merge.",
                PeftWarning,
            )
        device = device if device is not None else base.weight.device
        if _changes_base(config.init_lora_weights):
            # PiSSA/OLoRA derive the residual base weight from the original one, also when loading
            # (as PEFT does), so they are never created on the meta device.
            device = base.weight.device
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
        self.use_dora[adapter] = bool(config.use_dora)
        meta = torch.device(device).type == "meta"
        if not meta:
            self.reset_parameters(adapter, config.init_lora_weights)
        if config.use_dora:
            if meta:
                shape = (1, self.out_features, *([1] * self.ops.conv_dim)) if kind == "conv" else (self.out_features,)
                magnitude = torch.empty(shape, device=device, dtype=dtype)
            else:
                a, b = self._factors(adapter)
                w2d = self._weight2d().detach()
                magnitude = row_norm_of_sum(w2d.float().pow(2).sum(1), w2d, a, b, self.scaling[adapter])
            if kind == "conv":  # PEFT keeps a conv magnitude as (1, out, 1, ...)
                magnitude = magnitude.view(1, -1, *([1] * self.ops.conv_dim))
            self.lora_magnitude_vector[adapter] = Magnitude(magnitude)

    def checkpoint_name(self, attr: str, sub: str | None = None) -> str:
        if attr == "lora_magnitude_vector":  # saved as a bare tensor, as PEFT does
            return attr
        return super().checkpoint_name(attr, sub)

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
        if _changes_base(init):
            w2d = self._weight2d()
            r, scale = self.r[adapter], self.scaling[adapter]
            fa, fb = olora(w2d, r) if init == "olora" else pissa(w2d, r, scale, parse_pissa(init))
            a.weight.copy_(fa.view_as(a.weight))
            b.weight.copy_(fb.view_as(b.weight))
            w2d.sub_((fb @ fa).mul_(scale).to(w2d.dtype))  # the residual stays in the base layer
            return
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
        if self.use_dora.get(adapter):
            self._merge_dora(adapter, w2d, a, b, sign)
            return
        if a.dtype == w2d.dtype:
            w2d.addmm_(b, a, alpha=sign * self.scaling[adapter])  # no (out, in) temporary
        else:
            w2d.add_(((b @ a) * self.scaling[adapter]).to(w2d.dtype), alpha=sign)

    def swap_into(self, old: Sequence[str], new: str, w2d: torch.Tensor) -> bool:
        """``W += s_new·B_new A_new − Σ s_old·B_old A_old`` as one addmm over concatenated factors."""
        names = [*old, new]
        if any(self.use_dora.get(n) or self.lora_bias.get(n) for n in names):
            return False
        factors = [self._factors(n) for n in names]
        if any(a.dtype != w2d.dtype for a, _ in factors):
            return False
        a_cat = torch.cat([a for a, _ in factors], 0)  # (R, fan_in)
        b_cat = torch.cat(
            [b * (self.scaling[n] * (1.0 if n == new else -1.0)) for n, (_, b) in zip(names, factors)], 1
        )  # (out, R)
        w2d.addmm_(b_cat, a_cat)
        return True

    def _merge_dora(self, adapter: str, w2d: torch.Tensor, a: torch.Tensor, b: torch.Tensor, sign: float) -> None:
        """W ← (m / ‖W + ΔW‖) ⊙ (W + ΔW); the unmerge divides by the factor used here."""
        delta = ((b @ a) * self.scaling[adapter]).to(w2d.dtype)
        magnitude = self.lora_magnitude_vector[adapter].weight.view(-1)
        if sign > 0:
            norm = torch.linalg.vector_norm(w2d + delta, dim=1).to(magnitude.dtype)
            self._dora_merge_norm[adapter] = norm
            w2d.add_(delta).mul_((magnitude / norm).to(w2d.dtype)[:, None])
        else:
            norm = self._dora_merge_norm.pop(adapter)
            w2d.div_((magnitude / norm).to(w2d.dtype)[:, None]).sub_(delta)

    def bias_delta(self, adapter: str) -> torch.Tensor | None:
        if not self.lora_bias.get(adapter):
            return None
        return self.lora_B[adapter].bias * self.scaling[adapter]

    def fused_forward(self, adapter: str, x: torch.Tensor) -> torch.Tensor | None:
        """Training path for plain linear layers: one autograd node for base + adapter (LoRA or DoRA)."""
        if not torch.is_grad_enabled() or adapter not in self.lora_A:
            return None
        a_mod, b_mod = self.lora_A[adapter], self.lora_B[adapter]
        base = self.fusable_base(x, a_mod.weight, b_mod.weight)
        if (
            base is None
            or b_mod.bias is not None
            or (self.training and isinstance(self.lora_dropout[adapter], nn.Dropout))
        ):
            return None
        w, bias = base
        scale = self.scaling[adapter]
        if self.use_dora[adapter]:
            mag = self.lora_magnitude_vector[adapter]
            norm = mag.direction_norm(w, a_mod.weight, b_mod.weight, scale)
            return dora_linear(x, w, bias, a_mod.weight, b_mod.weight, scale, mag.weight, norm)
        return lora_linear(x, w, bias, a_mod.weight, b_mod.weight, scale)

    def adapt(self, adapter: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.use_dora.get(adapter):
            return self._adapt_dora(adapter, x, out)
        scale = self.scaling[adapter]
        kind = self.ops.kind
        if kind == "embedding":
            return _add_scaled(out, self._embed_a(adapter, x), self.lora_embedding_B[adapter], None, scale)
        a_mod, b_mod = self.lora_A[adapter], self.lora_B[adapter]
        x = self._adapter_input(adapter, x)
        if kind == "conv":
            return out + (b_mod(a_mod(x)) * scale).to(out.dtype)
        h = F.linear(x, a_mod.weight)  # (..., r)
        return _add_scaled(out, h, b_mod.weight, b_mod.bias, scale)

    def mixed_adapt(self, names: Sequence[str], x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        """Per-sample adapters as two batched products over gathered factors, not a loop over adapters.

        Adapters of different ranks are zero-padded to the largest; slot 0 is all zeros (the
        base model). DoRA and convolutions take the engine's grouped path instead.
        """
        present = [n for n in dict.fromkeys(names) if n in self.adapters]
        if not present:
            return out
        if self.ops.kind == "conv" or any(self.use_dora.get(n) for n in present):
            return None
        a, b, bias = self._stacked(tuple(present))  # (k+1, R, in), (k+1, out, R), (k+1, out) | None
        slot = {n: i + 1 for i, n in enumerate(present)}
        idx = torch.tensor([slot.get(n, 0) for n in names], device=x.device)
        n = x.shape[0]
        if self.ops.kind == "embedding":
            h = a.transpose(1, 2)[idx.view(n, *([1] * (x.dim() - 1))).expand_as(x), x]  # (n, ..., R)
            h = h.reshape(n, -1, h.shape[-1])
        else:
            h = torch.bmm(x.to(a.dtype).reshape(n, -1, x.shape[-1]), a[idx].transpose(1, 2))  # (n, T, R)
        delta = torch.bmm(h, b[idx].transpose(1, 2))  # (n, T, out)
        if bias is not None:
            delta = delta + bias[idx][:, None, :]
        return out + delta.view(out.shape).to(out.dtype)

    def _stacked(self, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The factors of ``names`` stacked behind a zero slot, B pre-scaled; cached while unchanged."""
        factors = [self._factors(n) for n in names]
        key = (names, tuple((a._version, b._version, a.data_ptr(), b.data_ptr()) for a, b in factors))
        cached = getattr(self, "_stack_cache", None)
        if cached is not None and cached[0] == key and not torch.is_grad_enabled():
            return cached[1]
        r_max = max(a.shape[0] for a, _ in factors)
        a0, b0 = factors[0]
        a_st = a0.new_zeros(len(names) + 1, r_max, a0.shape[1])
        b_st = b0.new_zeros(len(names) + 1, b0.shape[0], r_max)
        biases = [self.lora_B[n].bias if n in self.lora_B and self.lora_B[n].bias is not None else None for n in names]
        bias_st = b0.new_zeros(len(names) + 1, b0.shape[0]) if any(v is not None for v in biases) else None
        for i, (name, (a, b)) in enumerate(zip(names, factors), start=1):
            a_st[i, : a.shape[0]] = a
            b_st[i, :, : b.shape[1]] = b * self.scaling[name]
            if bias_st is not None and biases[i - 1] is not None:
                bias_st[i] = biases[i - 1] * self.scaling[name]
        result = (a_st, b_st, bias_st)
        if not torch.is_grad_enabled():
            self._stack_cache = (key, result)
        return result

    def _adapter_input(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """The input in the adapter's dtype, with the adapter's dropout in training."""
        dtype = (self.lora_A[adapter].weight if adapter in self.lora_A else self.lora_embedding_A[adapter]).dtype
        if x.is_floating_point() and x.dtype != dtype:
            x = x.to(dtype)
        drop = self.lora_dropout[adapter]
        return drop(x) if self.training and isinstance(drop, nn.Dropout) else x

    def _embed_a(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        base, a = self.base_layer, self.lora_embedding_A[adapter]
        return F.embedding(x, a.t(), base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)

    def _adapt_dora(self, adapter: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out = b + (m/n) ⊙ (y − b + s·BAx)``; with dropout in training the adapter sees the dropped input."""
        scale = self.scaling[adapter]
        a, b = self._factors(adapter)
        mag = self.lora_magnitude_vector[adapter]
        if self.ops.quant is None:
            norm = mag.direction_norm(self._weight2d(), a, b, scale)
        else:  # dequantize only when the norm is not cached (on the packed weight's version)
            norm = mag.direction_norm(self._weight2d, a, b, scale, stored=self.base_layer.weight)
        factor = mag.weight.view(-1) / norm  # (out,)
        f = channel_view(factor, out, 1 if self.ops.kind == "conv" else -1)
        bias = getattr(self.base_layer, "bias", None)
        bias = None if bias is None else channel_view(bias, out, 1 if self.ops.kind == "conv" else -1)
        if self.ops.kind == "embedding":
            return _add_scaled(out, self._embed_a(adapter, x), b, None, scale) * f
        xa = self._adapter_input(adapter, x)
        if xa is not x and xa.dtype == x.dtype:
            # dropout in training: the rescaled base term uses the dropped input (PEFT's formulation)
            lora = self.adapt_lora_only(adapter, xa)
            return out + ((f - 1) * self._base_no_bias(xa) + f * lora).to(out.dtype)
        if self.ops.kind == "conv":
            t = out + (self.lora_B[adapter](self.lora_A[adapter](xa)) * scale).to(out.dtype)
        else:
            b_mod = self.lora_B[adapter]
            t = _add_scaled(out, F.linear(xa, self.lora_A[adapter].weight), b_mod.weight, b_mod.bias, scale)
        f = f.to(t.dtype)
        if bias is None:
            return t * f
        bias = bias.to(t.dtype)  # under autocast the float32 bias would make the output float32
        return torch.addcmul(bias, t - bias, f)  # b + f ⊙ (y − b + l)

    def adapt_lora_only(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """``s·B A x`` alone, in the output layout."""
        a_mod, b_mod = self.lora_A[adapter], self.lora_B[adapter]
        return b_mod(a_mod(x)) * self.scaling[adapter]

    def _base_no_bias(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.ops.kind == "conv":
            conv = getattr(F, f"conv{self.ops.conv_dim}d")
            return conv(x, base.weight, None, base.stride, base.padding, base.dilation, base.groups)
        return F.linear(x, self._weight2d())


def _changes_base(init: Any) -> bool:
    return isinstance(init, str) and (init == "olora" or init.startswith("pissa"))


def _add_scaled(out: torch.Tensor, h: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``out + scale · (h @ Bᵀ + bias)`` as one addmm: no separate scale and add passes."""
    if out.dtype != h.dtype or bias is not None:
        return out + (F.linear(h, b, bias) * scale).to(out.dtype)
    o2 = out.reshape(-1, out.shape[-1])  # (N, out)
    h2 = h.reshape(-1, h.shape[-1])  # (N, r)
    if not torch.is_grad_enabled() or not (o2.requires_grad or h2.requires_grad or b.requires_grad):
        # in place: no autocast here, so B joins h's dtype (under autocast, what autocast gives h)
        return o2.addmm_(h2, b.t().to(h2.dtype), alpha=scale).view(out.shape)
    return torch.addmm(o2, h2, b.t(), alpha=scale).view(out.shape)


def _skip_init(cls: type[nn.Module], *args: Any, device: Any, dtype: torch.dtype, **kwargs: Any) -> nn.Module:
    """Build a layer without its default initialisation (``reset_parameters`` sets the values)."""
    if cls is nn.Linear:
        return _empty_linear(*args, device=device, dtype=dtype, **kwargs)
    module = cls(*args, device="meta", dtype=dtype, **kwargs)
    return module if torch.device(device).type == "meta" else module.to_empty(device=device)


def _empty_linear(in_features: int, out_features: int, bias: bool, device: Any, dtype: torch.dtype) -> nn.Linear:
    """An ``nn.Linear`` with uninitialised tensors: building one the usual way runs a random init we discard."""
    layer = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = in_features, out_features
    layer.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
    if bias:
        layer.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
    else:
        layer.register_parameter("bias", None)
    return layer
