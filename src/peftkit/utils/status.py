"""What state a model's adapters are in (PEFT's ``get_layer_status`` / ``get_model_status``), and
``cast_mixed_precision_params``.

The status views answer "which adapters are active, merged, trainable, and where" layer by layer,
and flag a model whose layers disagree ("irregular"), which happens after a layer was changed
directly instead of through the model's verbs.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..core.layer import AdapterLayer
from ..core.quantized import describe
from ..core.wrappers import ModulesToSaveWrapper

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    """One adapter layer (or modules_to_save wrapper): see ``get_layer_status``."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None = None


@dataclass
class TunerModelStatus:
    """The whole model: see ``get_model_status``. A field the layers disagree on is "irregular"."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]] = field(default_factory=dict)
    quantization_backend: str | None | Irregular = None


def _one_or_irregular(values: set) -> Any:
    """The one value every layer (or tensor) has, or "irregular"."""
    return values.pop() if len(values) == 1 else "irregular"


def _engine(model: nn.Module) -> nn.Module:
    """The module whose sub-modules are the adapter layers (PEFT's ``base_model`` for a PeftModel)."""
    from ..peft_model import PeftModel

    if isinstance(model, PeftModel):
        config = model.peft_config[model.active_adapters[0]]
        if config.is_prompt_learning or str(getattr(config.peft_type, "value", config.peft_type)) == "ADAPTION_PROMPT":
            raise TypeError(
                f"get_layer_status() covers weight-space adapters; this model holds a {config.peft_type} adapter "
                "(prompt learning has no adapter layers)."
            )
        return model.base_model
    return model


def _layer_status(name: str, module: nn.Module) -> TunerLayerStatus:
    grads: dict[str, list[bool]] = defaultdict(list)
    devices: dict[str, set[str]] = defaultdict(set)
    if isinstance(module, AdapterLayer):
        for adapter in module.adapters:
            for p in module.adapter_parameters(adapter):
                grads[adapter].append(p.requires_grad)
                devices[adapter].add(p.device.type)
            for attr in module.buffer_attrs:
                container = getattr(module, attr)
                if adapter in container:
                    devices[adapter].add(container[adapter].device.type)
        quant = describe(module.base_layer) if module.ops.quant is not None else None
        available = module.adapters
        active, merged = list(module.active_adapters), list(module.merged_adapters)
        enabled = not module.disable_adapters
    else:  # ModulesToSaveWrapper: the trained copies
        for adapter, copy in module.modules_to_save.items():
            for p in copy.parameters():
                grads[adapter].append(p.requires_grad)
                devices[adapter].add(p.device.type)
        quant, available = None, list(module.adapters)
        active, merged = list(module.active_adapters), []
        enabled = not module._disable_adapters
    return TunerLayerStatus(
        name=name,
        module_type=type(module).__name__,
        enabled=enabled,
        active_adapters=active,
        merged_adapters=merged,
        requires_grad={a: _one_or_irregular(set(v)) for a, v in grads.items()},
        available_adapters=sorted(available),
        devices={a: sorted(v) for a, v in devices.items()},
        quantization_backend=quant,
    )


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """The status of every adapter layer and modules_to_save wrapper of ``model``.

    Args:
        model: a ``PeftModel``, its ``base_model``, or a model with adapters injected in place.

    Each entry holds the layer's ``name``, ``module_type``, whether its adapters are ``enabled``,
    its ``active_adapters`` and ``merged_adapters``, ``requires_grad`` per adapter (True, False, or
    "irregular" when the adapter's tensors disagree), ``available_adapters``, the ``devices`` of
    each adapter's tensors, and the ``quantization_backend`` of a quantized base layer.
    """
    engine = _engine(model)
    found = [(n, m) for n, m in engine.named_modules() if isinstance(m, (AdapterLayer, ModulesToSaveWrapper))]
    if not found:
        raise ValueError(
            "No adapter layers found in the model: build it with get_peft_model or inject_adapter_in_model."
        )
    return [_layer_status(n, m) for n, m in found]


# PEFT's per-method engine class names (peftkit runs every weight-space method on one engine)
_ENGINE_NAMES = {"LORA": "LoraModel", "LOHA": "LoHaModel", "LOKR": "LoKrModel", "IA3": "IA3Model", "OFT": "OFTModel",
                 "BOFT": "BOFTModel", "SHIRA": "ShiraModel"}


def _engine_name(model: Any) -> str:
    name = type(model.base_model).__name__
    if name != "AdapterModel":  # X-LoRA has its own engine
        return name
    return _ENGINE_NAMES.get(str(getattr(model.peft_type, "value", model.peft_type)), name)


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The status of ``model``'s adapters as a whole (see ``get_layer_status`` for one layer's).

    ``enabled``, ``active_adapters`` and ``quantization_backend`` are "irregular" when the layers
    disagree (a state the model's verbs do not make); ``merged_adapters`` lists the adapters merged
    somewhere, "irregular" if one of them is unmerged on a layer that holds it; ``requires_grad``
    per adapter is True or False when every layer says so, else "irregular"; ``available_adapters``
    and ``devices`` are unions over the layers.
    """
    from ..peft_model import PeftModel

    layers = get_layer_status(model)
    if isinstance(model, PeftModel):
        base_model_type = type(model.get_base_model()).__name__
        adapter_model_type = _engine_name(model)
        peft_types = {name: str(getattr(c.peft_type, "value", c.peft_type)) for name, c in model.peft_config.items()}
        trainable, total = model.get_nb_trainable_parameters()
    else:
        from transformers import PreTrainedModel

        base_model_type = type(model).__name__ if isinstance(model, PreTrainedModel) else "other"
        adapter_model_type, peft_types = "None", {}
        trainable, total = PeftModel.get_nb_trainable_parameters(model)
    merged_somewhere = {a for s in layers for a in s.merged_adapters}
    unmerged = any((set(s.available_adapters) - set(s.merged_adapters)) & merged_somewhere for s in layers)
    active = _one_or_irregular({tuple(s.active_adapters) for s in layers})
    grads: dict[str, list[bool | str]] = defaultdict(list)
    devices: dict[str, set[str]] = defaultdict(set)
    for s in layers:
        for adapter, value in s.requires_grad.items():
            grads[adapter].append(value)
        for adapter, where in s.devices.items():
            devices[adapter].update(where)
    return TunerModelStatus(
        base_model_type=base_model_type,
        adapter_model_type=adapter_model_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=_one_or_irregular({s.enabled for s in layers}),
        active_adapters=active if active == "irregular" else list(active),
        merged_adapters="irregular" if unmerged else sorted(merged_somewhere),
        requires_grad={a: _one_or_irregular(set(vals)) for a, vals in grads.items()},
        available_adapters=sorted({a for s in layers for a in s.available_adapters}),
        devices={a: sorted(v) for a, v in devices.items()},
        quantization_backend=_one_or_irregular({s.quantization_backend for s in layers}),
    )


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Frozen parameters to ``dtype`` (float16 / bfloat16), trainable ones to float32, in place.

    For mixed-precision training: the frozen base takes half the memory while the adapters keep
    full precision for the optimizer. Runs on ``model.parameters()`` (buffers are left as they are).
    """
    for p in model.parameters():
        p.data = p.data.to(dtype if not p.requires_grad else torch.float32)
