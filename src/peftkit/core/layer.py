"""``AdapterLayer``: the one wrapper every weight-space method lives in.

The base layer stays inside as ``base_layer`` so that state-dict paths match PEFT's. A
method subclass declares where its per-adapter parameters live and fills in the math
(``create``, ``adapt``, ``delta_weight``); everything else is written here once:
forward with several active adapters, per-sample adapter batches, merge / safe merge /
unmerge, enable / disable, set and delete adapters, dtype and device following.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ..kernels.autocast import autocast_dtype
from ..types import PeftWarning
from .base_ops import BaseOps, ops_for
from .context import BASE_ADAPTER, current_adapter_names, group_rows
from .quantized import describe, warn_rounding


# Attribute values that can never be a parameter, buffer or submodule (see AdapterLayer.__setattr__).
_PLAIN_TYPES = frozenset({dict, list, tuple, bool, int, float, str, BaseOps})


class BufferDict(nn.Module):
    """Per-adapter tensors that follow ``.to()`` but are not parameters (SHiRA's positions).

    They are kept out of ``state_dict()`` (as PEFT keeps them); adapter files carry them.
    """

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._buffers[key]

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.register_buffer(key, value, persistent=False)

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]

    def __contains__(self, key: object) -> bool:
        return key in self._buffers

    def keys(self) -> Iterable[str]:
        return self._buffers.keys()

    def items(self) -> Iterable[tuple[str, torch.Tensor]]:
        return self._buffers.items()


class AdapterLayer(nn.Module):
    """Wraps one base layer and holds any number of named adapters of one method.

    Subclasses set the class attributes and implement ``create``, ``adapt`` and
    ``delta_weight``; they may override ``merge_into`` for a faster in-place merge.
    """

    prefix: ClassVar[str] = ""
    # Attributes holding per-adapter parameters (ModuleDict / ParameterDict): saved, trainable.
    adapter_attrs: ClassVar[tuple[str, ...]] = ()
    # Attributes holding per-adapter tensors that are saved but never trained (``BufferDict``).
    buffer_attrs: ClassVar[tuple[str, ...]] = ()
    # Attributes holding other per-adapter state (plain dicts or parameter-free ModuleDicts).
    other_attrs: ClassVar[tuple[str, ...]] = ()
    # Base layer kinds (``BaseOps.kind``) the method can adapt.
    supported_kinds: ClassVar[tuple[str, ...]] = ("linear", "embedding", "conv")
    # Saved tensors whose size comes from the file when loading (not from the config).
    file_sized_attrs: ClassVar[tuple[str, ...]] = ()
    # Adapters over a float16/bfloat16 base are kept in float32 (PEFT's autocast_adapter_dtype=True).
    upcast_adapters: bool = True
    # Whether the method can adapt quantized linear layers (its forward adds to ``base_layer(x)``
    # and its merge goes through the dequantized weight).
    quantized_ok: ClassVar[bool] = False

    def __init__(self, base_layer: nn.Module, ops: BaseOps | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        ops = ops or ops_for(base_layer)
        if ops is None or ops.kind not in self.supported_kinds:
            raise TypeError(f"{type(self).__name__} cannot wrap a {type(base_layer).__name__}.")
        if ops.quant is not None:
            if not self.quantized_ok:
                raise TypeError(f"{type(self).__name__} cannot adapt a quantized {describe(base_layer)} layer.")
            ops.quant.check(base_layer)
        self.ops = ops
        self.in_features = ops.in_features
        self.out_features = ops.out_features
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self._disable_adapters = False

    def __setattr__(self, name: str, value: Any) -> None:
        # A plain value (the per-adapter dicts, lists, flags, ops) lands where nn.Module.__setattr__
        # would put it, without its chain of isinstance checks against Parameter, Module and Tensor:
        # those were a quarter of building a layer (get_peft_model builds one per target).
        if type(value) in _PLAIN_TYPES and name not in self._parameters and name not in self._modules and (
                name not in self._buffers):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @classmethod
    def can_wrap(cls, module: nn.Module) -> bool:
        """Whether this layer class can wrap ``module`` (by default: its base-layer kind is supported)."""
        ops = ops_for(module)
        return ops is not None and ops.kind in cls.supported_kinds and (ops.quant is None or cls.quantized_ok)

    # ------------------------------------------------------------------ the method's part
    def create(self, adapter: str, config: Any, **per_layer: Any) -> None:
        """Build the parameters of one adapter (on ``self.base_layer``'s device)."""
        raise NotImplementedError

    def adapt(self, adapter: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Return ``out`` plus this adapter's contribution for input ``x`` (may update ``out`` in place)."""
        raise NotImplementedError

    def delta_weight(self, adapter: str) -> torch.Tensor:
        """The adapter's weight change as an (out, fan_in) tensor, in the adapter's dtype."""
        raise NotImplementedError

    def mixed_adapt(self, names: Sequence[str], x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        """Add each sample's own adapter in one vectorised step, when the method can (else None)."""
        return None

    def fused_forward(self, adapter: str, x: torch.Tensor) -> torch.Tensor | None:
        """Base op and one adapter in one step, when the method has a faster path for it (else None)."""
        return None

    def fusable_base(
        self, x: torch.Tensor, *adapter_tensors: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The base weight as (out, in) and its bias, when a fused kernel may stand in for the base op on ``x``.

        Only a stock layer qualifies (nn.Linear, or transformers Conv1D: a subclass, a quantized
        layer or one with hooks keeps its own forward), frozen, and ``x``, the weight and
        ``adapter_tensors`` in one dtype (under ``torch.autocast`` the kernels cast them all to
        autocast's, see ``kernels.autocast``); else None.
        """
        base = self.base_layer
        if self.ops.quant is not None or self.ops.kind != "linear":
            return None
        if not (type(base) is nn.Linear or (self.ops.transposed and type(base).__name__ == "Conv1D")):
            return None
        w, bias = self.ops.weight2d(base), base.bias
        frozen = not w.requires_grad and (bias is None or not bias.requires_grad)
        if not frozen or base._forward_hooks or base._forward_pre_hooks:
            return None
        if autocast_dtype(x.device.type) is None and any(t.dtype != x.dtype for t in (w, *adapter_tensors)):
            return None
        return w, bias

    def forward_active(self, x: torch.Tensor, adapters: Sequence[str], args: tuple, kwargs: dict) -> torch.Tensor | None:
        """Run the base op with these adapters the method's own way (IA3 scales the input first); None: the default."""
        return None

    def mixed_forward(self, x: torch.Tensor, names: Sequence[str], args: tuple, kwargs: dict) -> torch.Tensor | None:
        """Like ``forward_active`` for a batch whose samples name their own adapters; None: the default."""
        return None

    def merge_into(self, adapter: str, w2d: torch.Tensor, sign: float) -> None:
        """Add (sign=1) or remove (sign=-1) the adapter's change to a weight view in place."""
        delta = self.delta_weight(adapter)
        w2d.add_(delta.to(w2d.dtype), alpha=sign)

    def bias_delta(self, adapter: str) -> torch.Tensor | None:
        """The adapter's change to the base bias, if it has one (LoRA's ``lora_bias``)."""
        return None

    def merge_bias(self, adapter: str, bias: torch.Tensor, sign: float) -> None:
        """Fold the adapter's bias change into ``bias`` in place (sign=-1 takes it out); additive by default."""
        db = self.bias_delta(adapter)
        if db is not None:
            bias.add_(db.to(bias.dtype), alpha=sign)

    def check_unmerge(self, adapters: Sequence[str]) -> None:
        """Raise, before anything changes, if these merged adapters cannot be taken out exactly."""

    def check_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Raise if this layer's tensors about to be loaded (checkpoint key -> tensor) do not fit together."""

    # ------------------------------------------------------------------ bookkeeping
    @property
    def adapters(self) -> list[str]:
        """Names of the adapters this layer holds, in creation order."""
        names: dict[str, None] = {}
        for attr in self.adapter_attrs:
            for k in getattr(self, attr).keys():
                names[k] = None
        return list(names)

    @property
    def active_adapter(self) -> str | list[str]:
        return self.active_adapters[0] if len(self.active_adapters) == 1 else list(self.active_adapters)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def adapter_parameters(self, adapter: str) -> Iterable[nn.Parameter]:
        for attr in self.adapter_attrs:
            container = getattr(self, attr)
            if adapter in container:
                entry = container[adapter]
                yield from ([entry] if isinstance(entry, nn.Parameter) else entry.parameters())

    def checkpoint_name(self, attr: str, sub: str | None = None) -> str:
        """The key fragment a tensor is saved under (``lora_A`` + ``weight`` -> ``lora_A.weight``)."""
        return f"{attr}.{sub}" if sub else attr

    @property
    def anchor(self) -> torch.Tensor:
        """The base layer's weight (or first parameter): where and in what dtype adapters live."""
        w = getattr(self.base_layer, "weight", None)
        return w if isinstance(w, torch.Tensor) else next(self.base_layer.parameters())

    def adapter_dtype(self) -> torch.dtype:
        """Adapter weights are kept in float32 over a half-precision or quantized base (stable training),
        unless ``upcast_adapters`` is off (``autocast_adapter_dtype=False``): then in the base's dtype."""
        dtype = self.anchor.dtype
        if self.ops.quant is not None or not dtype.is_floating_point:
            return torch.float32
        return torch.float32 if self.upcast_adapters and dtype in (torch.float16, torch.bfloat16) else dtype

    def base_dtype(self) -> torch.dtype:
        """The floating dtype of the base weight (for a quantized layer: the dtype it was quantized from)."""
        if self.ops.quant is not None:
            return self.ops.quant.dtype(self.base_layer)
        return self.anchor.dtype

    def add_adapter(self, adapter: str, config: Any, *, device: torch.device | str | None = None, **kw: Any) -> None:
        """Create one adapter and make its trainability follow the active set."""
        if adapter in self.adapters:
            raise ValueError(f"Adapter {adapter!r} already exists on this layer.")
        target = torch.device(device if device is not None else self.anchor.device)
        self.create(adapter, config, device=target, **kw)
        dtype = self.adapter_dtype()
        for p in self.adapter_parameters(adapter):
            if target.type != "meta" and (p.device != target or (p.is_floating_point() and p.dtype != dtype)):
                p.data = p.data.to(target, dtype=dtype if p.is_floating_point() else p.dtype)
        if not self.active_adapters:
            self.active_adapters = [adapter]
        self.set_adapter(self.active_adapters)

    def set_adapter(self, adapter_names: str | Sequence[str]) -> None:
        """Make these adapters active: their parameters train, the others are frozen."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for attr in self.adapter_attrs:
            for key, entry in getattr(self, attr).items():
                entry.requires_grad_(key in names)
        self.active_adapters = names

    def enable_adapters(self, enabled: bool) -> None:
        """Turn every adapter on or off; turning off a merged layer unmerges it first."""
        if not enabled and self.merged:
            self.unmerge()
        self._disable_adapters = not enabled

    def delete_adapter(self, adapter: str) -> None:
        """Remove every trace of one adapter; a deleted active adapter hands over to another."""
        if adapter in self.merged_adapters:
            raise ValueError(f"Adapter {adapter!r} is merged: unmerge it before deleting it.")
        for attr in self.adapter_attrs + self.buffer_attrs + self.other_attrs:
            container = getattr(self, attr, None)
            if container is not None and adapter in container:
                del container[adapter]
        if adapter in self.active_adapters:
            remaining = [a for a in self.active_adapters if a != adapter]
            if not remaining:
                left = self.adapters
                remaining = left[:1]
                if left:
                    warnings.warn(
                        f"Adapter {adapter!r} was active and is deleted; {left[0]!r} is active now.",
                        PeftWarning,
                    )
            self.set_adapter(remaining)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.ops.quant is not None and self.training:
            self.ops.quant.ready_for_backward(self.base_layer)
        if self._disable_adapters or not self.active_adapters:
            return self.base_layer(x, *args, **kwargs)
        names = current_adapter_names()
        if names is not None:
            return self._mixed_forward(x, names, *args, **kwargs)
        if self.merged_adapters:
            return self.base_layer(x, *args, **kwargs)
        own = self.forward_active(x, self.active_adapters, args, kwargs)
        if own is not None:
            return own
        if len(self.active_adapters) == 1 and not args and not kwargs:
            fused = self.fused_forward(self.active_adapters[0], x)
            if fused is not None:
                return fused
        out = self.base_layer(x, *args, **kwargs)
        for adapter in self.active_adapters:
            if adapter in self.adapters:
                out = self.adapt(adapter, x, out)
        return out

    def _mixed_forward(self, x: torch.Tensor, names: Sequence[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each sample of the batch runs with its own adapter (``BASE_ADAPTER``: none)."""
        if self.merged_adapters:
            raise ValueError("adapter_names cannot be used while adapters are merged: call unmerge_adapter() first.")
        if len(names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(names)} entries for a batch of {x.shape[0]}.")
        own = self.mixed_forward(x, names, args, kwargs)
        if own is not None:
            return own
        out = self.base_layer(x, *args, **kwargs)
        fast = self.mixed_adapt(names, x, out)
        if fast is not None:
            return fast
        out = out.clone()
        for name, rows in group_rows(names).items():
            if name == BASE_ADAPTER or name not in self.adapters:
                continue
            idx = torch.tensor(rows, device=x.device)
            sub = out.index_select(0, idx)
            out.index_copy_(0, idx, self.adapt(name, x.index_select(0, idx), sub))
        return out

    # ------------------------------------------------------------------ merge
    def _weight2d(self) -> torch.Tensor:
        return self.ops.weight2d(self.base_layer)

    @contextlib.contextmanager
    def _editable_weight(self) -> Iterator[torch.Tensor]:
        """The (out, fan_in) weight to change in place; a quantized layer gets a dequantized copy,
        requantized on a clean exit (with a rounding warning) and left untouched on an error."""
        quant = self.ops.quant
        if quant is None:
            yield self._weight2d()
            return
        w = quant.dequantize(self.base_layer)
        yield w
        warn_rounding(self.base_layer)
        quant.requantize(self.base_layer, w)

    def check_merge(self, adapter_names: Sequence[str]) -> None:
        """Raise if merging these adapters would put a non-finite value into the weight."""
        with torch.no_grad():
            w = self._weight2d().clone()
            bias = getattr(self.base_layer, "bias", None)
            b = bias.detach().clone() if bias is not None else None
            for adapter in adapter_names:
                self.merge_into(adapter, w, 1.0)
                db = self.bias_delta(adapter)
                if b is not None:
                    self.merge_bias(adapter, b, 1.0)
                bad_bias = (db is not None and not torch.isfinite(db).all()) or (b is not None and not torch.isfinite(b).all())
                if not torch.isfinite(w).all() or bad_bias:
                    raise ValueError(
                        f"Merging adapter {adapter!r} would put NaN/inf into {type(self.base_layer).__name__} "
                        "weights; the model was left unchanged. Check the adapter's weights."
                    )

    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the base weight."""
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        names = [a for a in names if a in self.adapters]
        already = [a for a in names if a in self.merged_adapters]
        if already and adapter_names is not None:
            warnings.warn(f"Adapters {already} are already merged; merging the rest.", PeftWarning)
        names = [a for a in names if a not in self.merged_adapters]
        if safe_merge:
            self.check_merge(names)
        if not names:
            return
        quantized = self.ops.quant is not None
        with torch.no_grad(), self._editable_weight() as w:
            for adapter in names:
                self._merge_one(adapter, w, 1.0)
                if not quantized:
                    self.merged_adapters.append(adapter)
        if quantized:  # requantized only now: before this the layer was unchanged
            self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Take merged adapters back out of the base weight, last merged first."""
        if not self.merged_adapters:
            warnings.warn("Nothing to unmerge: no adapter is merged.", PeftWarning)
            return
        self.check_unmerge(self.merged_adapters)
        with torch.no_grad(), self._editable_weight() as w:
            while self.merged_adapters:
                self._merge_one(self.merged_adapters.pop(), w, -1.0)

    def merged_weight(self, adapter_names: Sequence[str] | None = None) -> torch.Tensor:
        """The (out, fan_in) weight with these adapters (default: the active ones) merged in, as a new
        tensor (for a quantized layer: dequantized, not requantized); the base bias takes their bias changes."""
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        names = [a for a in names if a in self.adapters and a not in self.merged_adapters]
        with torch.no_grad():
            w = self._weight2d()
            w = w.clone() if self.ops.quant is None else w
            for adapter in names:
                self._merge_one(adapter, w, 1.0)
        self.merged_adapters.extend(names)
        return w

    def swap_merged(self, adapter: str) -> None:
        """Replace whatever is merged here by ``adapter``, in one pass over the weight where the method can."""
        present = adapter in self.adapters
        self.check_unmerge(self.merged_adapters)
        with torch.no_grad(), self._editable_weight() as w:
            if not (present and self.swap_into(self.merged_adapters, adapter, w)):
                while self.merged_adapters:
                    self._merge_one(self.merged_adapters.pop(), w, -1.0)
                if present:
                    self._merge_one(adapter, w, 1.0)
        self.merged_adapters = [adapter] if present else []

    def swap_into(self, old: Sequence[str], new: str, w2d: torch.Tensor) -> bool:
        """Method hook: remove ``old`` and add ``new`` to ``w2d`` in one step; False if not possible."""
        return False

    def _merge_one(self, adapter: str, w2d: torch.Tensor, sign: float) -> None:
        self.merge_into(adapter, w2d, sign)
        bias = getattr(self.base_layer, "bias", None)
        if bias is None:
            if self.bias_delta(adapter) is not None:
                raise ValueError(f"Adapter {adapter!r} changes the bias, but the base layer has none: it cannot merge.")
            return
        self.merge_bias(adapter, bias, sign)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The weight change in the base layer's own layout (PEFT's name for it)."""
        delta = self.delta_weight(adapter)
        w = self.base_layer.weight
        if self.ops.kind == "conv":
            return delta.view(w.shape)
        if self.ops.kind == "embedding" or self.ops.transposed:
            return delta.t()
        return delta

    def extra_repr(self) -> str:
        return f"adapters={self.adapters}, active={self.active_adapters}, merged={self.merged_adapters}"
