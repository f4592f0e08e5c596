"""The model-level engine: injects adapter layers and runs every model-level verb once.

``AdapterModel`` wraps the user's model as ``self.model`` (so state-dict keys read
``base_model.model.<path>`` from the ``PeftModel`` above it) and knows nothing about any one
method: the registry tells it which layer class to build and how.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import PeftConfig
from ..registry import MethodSpec, get_method
from ..types import PeftWarning
from .base_ops import is_transformers_conv1d, linear_types
from .context import BASE_ADAPTER, forward_options
from .layer import AdapterLayer
from .quantized import backend_for, dequantize_model, describe, full_precision_linear, ready_for_training
from .targeting import ALL_LINEAR, _matches_list, expand_all_linear, is_target, no_match_error
from .wrappers import ModulesToSaveWrapper

_WRAPPERS = (AdapterLayer, ModulesToSaveWrapper)


_KIND_NAMES = {"linear": "nn.Linear, transformers Conv1D", "embedding": "nn.Embedding", "conv": "nn.Conv1d/2d/3d"}


def _kinds_text(kinds: Sequence[str]) -> str:
    return " and ".join(", ".join(_KIND_NAMES[k] for k in kinds).rsplit(", ", 1))


def parent_of(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    parent_name, _, child = key.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def top_level_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` without the insides of adapter layers and modules_to_save wrappers.

    A plain depth-first walk that does not descend into wrappers: linear in the model's size.
    """
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module
        if name and isinstance(module, _WRAPPERS):
            continue
        prefix = name + "." if name else ""
        children = [(prefix + k, m) for k, m in module._modules.items() if m is not None]
        stack.extend(reversed(children))


class AdapterModel(nn.Module):
    """Holds the user's model and the configs of its adapters (PEFT's ``LoraModel`` & co.).

    Args:
        model: the model to adapt, changed in place.
        peft_config: the first adapter's config.
        adapter_name: its name.
        low_cpu_mem_usage: create the adapter's tensors on the meta device (to be loaded).
    """

    upcast_adapters: bool = True  # see set_upcast_adapters
    # Where the user's model sits in the PeftModel's state_dict: inside the engine (PEFT's tuners:
    # ``base_model.model.<path>``), or as ``base_model`` itself with the engine kept beside it (PEFT's
    # prompt learning: ``base_model.<path>``, the prompt encoders under ``prompt_encoder.``).
    state_prefix: str = "base_model.model."

    def __init__(
        self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", low_cpu_mem_usage: bool = False
    ) -> None:
        super().__init__()
        self.model = model
        self.training = model.training  # follow the wrapped model's mode
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapter: str | list[str] = adapter_name
        self.inject_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)
        self.model.peft_config = self.peft_config

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def train(self, mode: bool = True) -> AdapterModel:
        super().train(mode)
        if mode:  # quantized layers repacked for inference by an eval forward get a layout with a backward
            ready_for_training(self.model)
        return self

    # ------------------------------------------------------------------ calls
    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        if adapter_names is not None:
            self._check_mixed_batch(adapter_names, args[0] if args else kwargs.get("input_ids"))
        with forward_options(adapter_names, owner=self):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        if adapter_names is not None:
            self._check_mixed_batch(adapter_names, args[0] if args else kwargs.get("input_ids"))
        with forward_options(self._expand_names(adapter_names, kwargs), owner=self):
            return self.model.generate(*args, **kwargs)

    def _check_mixed_batch(self, names: Sequence[str], inputs: Any) -> None:
        """Per-sample adapters: eval mode, known names, nothing merged, one name per sample."""
        if isinstance(names, str):
            raise TypeError("adapter_names takes one adapter name per sample (a list), not a string.")
        if self.model.training:
            raise ValueError("adapter_names works in eval mode only: call model.eval() first.")
        unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in self.peft_config})
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown} in adapter_names; this model has {list(self.peft_config)}.")
        if any(layer.merged for _, layer in self.adapter_layers()):
            raise ValueError("adapter_names cannot be used while adapters are merged: call unmerge_adapter() first.")
        if isinstance(inputs, torch.Tensor) and inputs.dim() > 0 and inputs.shape[0] != len(names):
            raise ValueError(f"adapter_names has {len(names)} entries for a batch of {inputs.shape[0]}.")

    @staticmethod
    def _expand_names(names: Sequence[str] | None, kwargs: dict[str, Any]) -> Sequence[str] | None:
        """Beam search and sampling repeat each input; repeat its adapter name the same way."""
        if names is None:
            return None
        gen_cfg = kwargs.get("generation_config")
        beams = kwargs.get("num_beams", getattr(gen_cfg, "num_beams", 1) or 1)
        ret = kwargs.get("num_return_sequences", getattr(gen_cfg, "num_return_sequences", 1) or 1)
        repeat = max(beams, ret) if beams > 1 else ret
        return [n for n in names for _ in range(repeat)]

    def set_upcast_adapters(self, upcast: bool) -> None:
        """Keep adapters over a float16/bfloat16 base in float32 (True, the default) or in the base's dtype.

        PEFT's ``autocast_adapter_dtype``; applies to the adapters there are and to those added later.
        """
        self.upcast_adapters = upcast
        for _, layer in self.adapter_layers():
            layer.upcast_adapters = upcast
            dtype = layer.adapter_dtype()
            for adapter in layer.adapters:
                for p in layer.adapter_parameters(adapter):
                    if p.is_floating_point() and p.dtype != dtype:
                        p.data = p.data.to(dtype)

    # ------------------------------------------------------------------ views
    @property
    def active_adapters(self) -> list[str]:
        a = self.active_adapter
        return [a] if isinstance(a, str) else list(a)

    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        for name, module in top_level_modules(self.model):
            if isinstance(module, AdapterLayer):
                yield name, module

    def wrappers(self) -> Iterator[tuple[str, nn.Module]]:
        """Adapter layers and modules_to_save wrappers: everything that answers the adapter verbs."""
        for name, module in top_level_modules(self.model):
            if isinstance(module, _WRAPPERS):
                yield name, module

    def _check_adapters(self, names: Sequence[str]) -> None:
        missing = [n for n in names if n not in self.peft_config]
        if missing:
            raise ValueError(f"Unknown adapter(s) {missing}: this model has {list(self.peft_config)}.")

    # ------------------------------------------------------------------ building
    def prepare_config(self, config: PeftConfig, spec: MethodSpec) -> PeftConfig:
        config = config.copy()
        targets = getattr(config, "target_modules", None)
        if targets is None and spec.default_targets is not None:
            model_type = getattr(getattr(self.model, "config", None), "model_type", None)
            if model_type not in spec.default_targets:
                raise ValueError(
                    f"target_modules is not set and peftkit has no default for model_type={model_type!r}: "
                    "pass target_modules (a list of module names, a regex, or 'all-linear')."
                )
            config.target_modules = set(spec.default_targets[model_type])
        elif isinstance(targets, str) and targets.lower() == ALL_LINEAR:
            modules = [(n, getattr(m, "base_layer", m)) for n, m in top_level_modules(self.model)]
            config.target_modules = expand_all_linear(modules, self.model, linear_types())
        if spec.prepare is not None:
            spec.prepare(config, getattr(getattr(self.model, "config", None), "model_type", None))
        return config

    def layer_class(self, spec: MethodSpec) -> type[AdapterLayer]:
        """The adapter-layer class this engine builds for a method (an engine may specialise it)."""
        return spec.layer

    def own_slots(self, adapter_name: str) -> dict[str, Any]:
        """Checkpoint key -> ``io.keys.Slot`` for tensors the engine itself holds (none here)."""
        return {}

    def save_companions(self, folder: str, adapter_name: str, safe_serialization: bool = True, write: bool = True) -> None:
        """Write files an adapter needs besides its own config and tensors (none here); every rank of a
        distributed run calls this (tensors may need gathering), the one with ``write`` writes."""

    @classmethod
    def loading_config(cls, config: PeftConfig, model_id: Any, **kwargs: Any) -> PeftConfig:
        """Adjust a config read from ``model_id`` before the engine is built to load it (unchanged here)."""
        return config

    def inject_adapter(
        self, adapter_name: str, config: PeftConfig, low_cpu_mem_usage: bool = False
    ) -> None:
        """Add one adapter to every module the config selects; on error nothing is changed."""
        spec = get_method(config.peft_type)
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} already exists: pick another name.")
        for other in self.peft_config.values():
            if other.peft_type != config.peft_type:
                raise ValueError(
                    f"This model holds {other.peft_type} adapters; adding a {config.peft_type} adapter to it "
                    "is not supported."
                )
        config = self.prepare_config(config, spec)
        layer_cls = self.layer_class(spec)
        modules = list(top_level_modules(self.model))
        if spec.select is not None:  # the method picks its own modules (Llama-Adapter: the top attention layers)
            targets = spec.select(config, modules)
        else:
            targets = [(key, module) for key, module in modules if key and is_target(config, key)]
        if not targets:
            raise no_match_error(config, modules, self.model)
        for key, module in targets:
            if isinstance(module, AdapterLayer):
                if not isinstance(module, layer_cls):
                    raise TypeError(f"{key} already holds a {type(module).__name__}; cannot add {layer_cls.__name__}.")
            elif backend_for(module) is not None and not layer_cls.quantized_ok:
                raise TypeError(
                    f"Target module {key} is a quantized {describe(module)} layer; {config.peft_type} cannot adapt "
                    "quantized layers (LoRA, LoHa, LoKr and IA3 can). Load the base model unquantized, or narrow "
                    "target_modules."
                )
            elif not layer_cls.can_wrap(module):
                raise TypeError(
                    f"Target module {key} is a {type(module).__name__}; {config.peft_type} adapts "
                    f"{_kinds_text(layer_cls.supported_kinds)}. Narrow target_modules."
                )
        self._sync_fan_in_fan_out(config, [m for _, m in targets])

        self.peft_config[adapter_name] = config
        device = torch.device("meta") if low_cpu_mem_usage else None
        active = self.active_adapters
        done: list[tuple[str, nn.Module]] = []
        try:
            for key, module in targets:
                kwargs = spec.per_layer(config, key) if spec.per_layer else {}
                if isinstance(module, AdapterLayer):
                    done.append((key, module))
                    module.add_adapter(adapter_name, config, device=device, **kwargs)
                    continue
                layer = layer_cls(module)
                layer.upcast_adapters = self.upcast_adapters
                layer.active_adapters = [a for a in active]
                layer.add_adapter(adapter_name, config, device=device, **kwargs)
                layer.train(module.training)
                parent, child = parent_of(self.model, key)
                setattr(parent, child, layer)
                done.append((key, module))
        except BaseException:
            self._undo_inject(adapter_name, done)
            raise
        self._mark_trainable(spec, config)
        if getattr(config, "modules_to_save", None):
            self._wrap_modules_to_save(adapter_name, config.modules_to_save)
        if config.inference_mode:
            self.freeze_adapter(adapter_name)

    def _undo_inject(self, adapter_name: str, done: list[tuple[str, nn.Module]]) -> None:
        """Take a half-injected adapter out again: the model is as it was before ``inject_adapter``."""
        del self.peft_config[adapter_name]
        for key, module in done:
            if isinstance(module, AdapterLayer):  # an existing layer: drop the new adapter only
                if adapter_name in module.adapters:
                    module.delete_adapter(adapter_name)
            else:  # a plain module that was wrapped: put it back
                parent, child = parent_of(self.model, key)
                setattr(parent, child, module)

    @staticmethod
    def _sync_fan_in_fan_out(config: PeftConfig, modules: list[nn.Module]) -> None:
        """Record the weight layout in the config as PEFT does (Conv1D stores weights as (in, out))."""
        if not hasattr(config, "fan_in_fan_out"):
            return
        conv1d = any(is_transformers_conv1d(m) for m in modules)
        if conv1d and not config.fan_in_fan_out:
            warnings.warn("The targets are transformers Conv1D layers: setting fan_in_fan_out=True.", PeftWarning)
            config.fan_in_fan_out = True
        elif not conv1d and config.fan_in_fan_out and any(isinstance(m, nn.Linear) for m in modules):
            warnings.warn(
                "fan_in_fan_out=True does not fit nn.Linear targets: setting fan_in_fan_out=False.",
                PeftWarning,
            )
            config.fan_in_fan_out = False

    def _mark_trainable(self, spec: MethodSpec, config: PeftConfig) -> None:
        for name, p in self.model.named_parameters():
            if spec.prefix not in name:
                p.requires_grad_(False)
        bias = getattr(config, "bias", "none")
        if bias == "all":
            for name, p in self.model.named_parameters():
                if "bias" in name:
                    p.requires_grad_(True)
        elif bias.endswith("_only"):
            for _, layer in self.adapter_layers():
                if getattr(layer.base_layer, "bias", None) is not None:
                    layer.base_layer.bias.requires_grad_(True)
        for _, module in self.wrappers():
            if isinstance(module, ModulesToSaveWrapper):
                module.set_adapter(self.active_adapters)

    def _wrap_modules_to_save(self, adapter_name: str, names: Sequence[str]) -> None:
        for key, module in list(top_level_modules(self.model)):
            if not key or not _matches_list(key, names):
                continue
            if isinstance(module, ModulesToSaveWrapper):
                module.update(adapter_name)
            else:
                module = ModulesToSaveWrapper(module, adapter_name)
                parent, child = parent_of(self.model, key)
                setattr(parent, child, module)
            module.set_adapter(self.active_adapters)

    def freeze_adapter(self, adapter_name: str) -> None:
        self.set_requires_grad(adapter_name, False)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Turn gradients on or off for these adapters' parameters (and their modules_to_save copies),
        whether or not they are active; the others are left as they are."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_adapters(names)
        for _, layer in self.adapter_layers():
            for name in names:
                for p in layer.adapter_parameters(name):
                    p.requires_grad_(requires_grad)
        for _, module in self.wrappers():
            if isinstance(module, ModulesToSaveWrapper):
                for name in names:
                    if name in module.modules_to_save:
                        module.modules_to_save[name].requires_grad_(requires_grad)

    # ------------------------------------------------------------------ adapter verbs
    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool = False) -> None:
        """Make one adapter (or several, whose outputs add up) the active one(s)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_adapters(names)
        if any(layer.merged for _, layer in self.adapter_layers()):
            warnings.warn("Adapters are merged; unmerging them before switching the active adapter.", PeftWarning)
            self.unmerge_adapter()
        for _, module in self.wrappers():
            if isinstance(module, ModulesToSaveWrapper):
                module.set_adapter(names, inference_mode=inference_mode)
            else:
                module.set_adapter(names)
                if inference_mode:
                    for n in names:
                        for p in module.adapter_parameters(n):
                            p.requires_grad_(False)
        self.active_adapter = names[0] if len(names) == 1 else names

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter from every layer and from the configs."""
        self._check_adapters([adapter_name])
        for _, layer in self.adapter_layers():
            if adapter_name in layer.merged_adapters:
                raise ValueError(f"Adapter {adapter_name!r} is merged: call unmerge_adapter() before deleting it.")
        del self.peft_config[adapter_name]
        for key, module in list(self.wrappers()):
            module.delete_adapter(adapter_name)
            if not module.adapters:  # nothing left: put the plain module back
                parent, child = parent_of(self.model, key)
                setattr(parent, child, module.base_layer if isinstance(module, AdapterLayer) else module.original_module)
        remaining = [a for a in self.active_adapters if a != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        if remaining:
            self.set_adapter(remaining)
        else:
            self.active_adapter = []

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str, **options: Any) -> None:
        """Build ``adapter_name`` as a weighted combination of existing adapters (method-specific options)."""
        if not adapters:
            raise ValueError("add_weighted_adapter needs at least one adapter to combine.")
        self._check_adapters(adapters)
        if len(weights) != len(adapters):
            raise ValueError(f"Got {len(weights)} weights for {len(adapters)} adapters.")
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} already exists: pick another name.")
        spec = get_method(self.peft_config[adapters[0]].peft_type)
        if spec.weighted is None:
            raise NotImplementedError(f"add_weighted_adapter is not available for {spec.peft_type} adapters.")
        spec.weighted(self, list(adapters), list(weights), adapter_name, **options)

    def _set_enabled(self, enabled: bool) -> None:
        for _, module in self.wrappers():
            module.enable_adapters(enabled)

    def enable_adapter_layers(self) -> None:
        self._set_enabled(True)

    def disable_adapter_layers(self) -> None:
        """Run the base model alone; merged adapters are unmerged first."""
        self._set_enabled(False)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        self._set_enabled(False)
        try:
            yield
        finally:
            self._set_enabled(True)

    # ------------------------------------------------------------------ merging
    def _check_safe_merge(self, layers: list[AdapterLayer], adapter_names: Sequence[str] | None) -> None:
        for layer in layers:
            names = layer.active_adapters if adapter_names is None else adapter_names
            layer.check_merge([a for a in names if a in layer.adapters and a not in layer.merged_adapters])

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters (default: the active ones) into the base weights, keeping the layers."""
        if adapter_names is not None:
            self._check_adapters(adapter_names)
        layers = [layer for _, layer in self.adapter_layers()]
        if safe_merge:
            self._check_safe_merge(layers, adapter_names)
        for layer in layers:
            layer.merge(adapter_names=adapter_names)

    def unmerge_adapter(self) -> None:
        for _, layer in self.adapter_layers():
            if layer.merged:
                layer.unmerge()

    def swap_merged_adapter(self, adapter_name: str) -> None:
        """On a merged model, replace the merged adapter(s) by ``adapter_name`` in place, layer by layer.

        Equivalent to ``unmerge_adapter(); set_adapter(adapter_name); merge_adapter()``, but each
        weight is updated once (for LoRA: one product over both adapters' factors).
        """
        self._check_adapters([adapter_name])
        for _, layer in self.adapter_layers():
            layer.swap_merged(adapter_name)
        for _, module in self.wrappers():
            if isinstance(module, ModulesToSaveWrapper):
                module.set_adapter([adapter_name])
        for _, layer in self.adapter_layers():
            layer.set_adapter([adapter_name])
        self.active_adapter = adapter_name

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Sequence[str] | None = None,
        dequantize: bool = False,
    ) -> nn.Module:
        """Merge adapters into the base weights and return the plain model.

        Args:
            progressbar: show a progress bar.
            safe_merge: check every merged weight for NaN/inf first; on failure nothing changes.
            adapter_names: the adapters to merge (default: the active ones).
            dequantize: (peftkit only; PEFT has no such option) return a full-precision model: every
                quantized linear layer (bitsandbytes 4-/8-bit, torchao int8), adapted or not, becomes an
                ``nn.Linear`` in the dtype it was quantized from, and adapters are merged into the
                dequantized weight without requantizing (no merge rounding). Without it, merging into a
                quantized layer requantizes the merged weight (rounded, with a warning).
        """
        if adapter_names is not None:
            self._check_adapters(adapter_names)
        layers = [layer for _, layer in self.adapter_layers()]
        if safe_merge:
            self._check_safe_merge(layers, adapter_names)
        model = self._unload(merge=True, progressbar=progressbar, adapter_names=adapter_names, dequantize=dequantize)
        return dequantize_model(model) if dequantize else model

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the original model."""
        self.unmerge_adapter()
        return self._unload(merge=False)

    def _unload(
        self, merge: bool, progressbar: bool = False, adapter_names: Sequence[str] | None = None, dequantize: bool = False
    ) -> nn.Module:
        wrappers = list(self.wrappers())
        desc = "Unloading and merging model" if merge else "Unloading model"
        for key, module in tqdm(wrappers, disable=not progressbar, desc=desc):
            if isinstance(module, AdapterLayer) and dequantize and module.ops.quant is not None:
                replacement = full_precision_linear(module.base_layer, module.merged_weight(adapter_names))
            elif isinstance(module, AdapterLayer):
                if merge:
                    module.merge(adapter_names=adapter_names)
                replacement = module.base_layer
            else:
                replacement = module.unwrapped(merged=merge)
            parent, child = parent_of(self.model, key)
            setattr(parent, child, replacement)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model
