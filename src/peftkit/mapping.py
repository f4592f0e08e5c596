"""Functional entry points: build a PEFT model, inject adapters, get and set adapter state."""

from __future__ import annotations

import warnings
from collections import namedtuple
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .config import PeftConfig
from .core.tuner import AdapterModel
from .io.keys import adapter_key_map, embedding_is_targeted, embedding_slots
from .types import PeftWarning

if TYPE_CHECKING:
    from .peft_model import PeftModel

LoadResult = namedtuple("LoadResult", ["missing_keys", "unexpected_keys"])


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap ``model`` with a new adapter described by ``peft_config``.

    Args:
        model: a transformers model or any ``nn.Module``; changed in place.
        peft_config: the adapter's config (``LoraConfig(...)``).
        adapter_name: the adapter's name.
        mixed: adapters of different methods in one model (not supported yet).
        autocast_adapter_dtype: keep adapter weights in float32 over a half-precision base (False: in
            the base's dtype, as PEFT).
        revision: the base model's Hub revision, recorded in the config.
        low_cpu_mem_usage: create the adapter on the meta device (for loading weights next).

    Returns:
        The task-specific ``PeftModel`` for ``peft_config.task_type``.
    """
    from .peft_model import MODEL_TYPE_TO_PEFT_MODEL, PeftModel

    if mixed:
        raise NotImplementedError("Adapters of different methods in one model (mixed=True) are not supported yet.")
    if revision is not None:
        peft_config.revision = revision
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if name and peft_config.base_model_name_or_path is None:
        peft_config.base_model_name_or_path = name
    cls = MODEL_TYPE_TO_PEFT_MODEL.get(peft_config.task_type, PeftModel)
    return cls(model, peft_config, adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
               low_cpu_mem_usage=low_cpu_mem_usage)


def get_peft_config(config_dict: dict[str, Any]) -> PeftConfig:
    """The config a dict describes (its ``peft_type`` picks the class); unknown keys are dropped with a warning."""
    return PeftConfig.from_dict(config_dict)


def inject_adapter_in_model(
    peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default", low_cpu_mem_usage: bool = False
) -> nn.Module:
    """Add adapter layers to ``model`` in place, without a ``PeftModel`` around it."""
    AdapterModel(model, peft_config, adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    return model


def _engine_of(model: nn.Module) -> nn.Module | None:
    """The adapter engine of a PeftModel (its ``_engine``), an engine itself, or None."""
    if isinstance(model, AdapterModel):
        return model
    engine = getattr(model, "_engine", None)
    if engine is None:
        engine = getattr(model, "base_model", None)
    return engine if isinstance(engine, AdapterModel) else None


def _tuner(model: nn.Module) -> AdapterModel:
    tuner = _engine_of(model)
    if tuner is None:
        raise TypeError(f"Expected a PeftModel or AdapterModel, got {type(model).__name__}.")
    return tuner


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, torch.Tensor]:
    """The tensors of one adapter under their checkpoint keys (``base_model.model.<path>.<param>``).

    A model sharded with FSDP2 (``fully_shard``) holds DTensors: they are gathered into full
    tensors here, a collective call, so every rank must call this function (``save_pretrained``
    does so on every rank and writes on the main one).

    Args:
        model: the ``PeftModel``.
        state_dict: take tensors from this full state dict (e.g. one gathered from shards) instead of the model.
        adapter_name: which adapter.
        unwrap_compiled: accepted for PEFT's signature (a compiled wrapper is always unwrapped).
        save_embedding_layers: also save the base token embedding / output head: True, False, or
            "auto" (when the adapter targets them, or the vocabulary was resized).
    """
    model = getattr(model, "_orig_mod", model)
    tuner = _tuner(model)
    if adapter_name not in tuner.peft_config:
        raise ValueError(f"Unknown adapter {adapter_name!r}: this model has {list(tuner.peft_config)}.")
    slots = adapter_key_map(tuner, adapter_name)
    config = tuner.peft_config[adapter_name]
    targeted = embedding_is_targeted(tuner, config)
    if save_embedding_layers == "auto":
        save_embedding_layers = targeted or _vocab_resized(tuner.model, config)
        if save_embedding_layers:
            warnings.warn(
                "Saving the base embedding layers with the adapter (they are targeted or were resized).",
                PeftWarning,
            )
    if save_embedding_layers:
        for key, slot in embedding_slots(tuner, targeted).items():
            slots.setdefault(key, slot)
    if state_dict is not None:
        # tensors kept out of state_dict() (SHiRA's positions) are read from the model
        return {k: _full(state_dict[s.mem_key] if s.mem_key in state_dict else s.get()) for k, s in slots.items()}
    return {k: _full(s.get()) for k, s in slots.items()}


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded one (FSDP2's DTensor) is gathered, which every rank must join."""
    tensor = tensor.detach()
    if hasattr(tensor, "full_tensor") and hasattr(tensor, "device_mesh"):  # DTensor, without importing it
        tensor = tensor.full_tensor()
    return tensor


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> LoadResult:
    """Load one adapter's tensors from checkpoint keys; checks every shape before changing anything.

    Returns:
        ``LoadResult(missing_keys, unexpected_keys)``: adapter tensors the file lacked, and
        file keys that fit nothing in the model.
    """
    tuner = _tuner(model)
    slots = adapter_key_map(tuner, adapter_name)
    state = {_normalise_key(k): v for k, v in peft_model_state_dict.items()}
    for targeted in (True, False):  # base embeddings saved with the adapter are loaded when present
        for key, slot in embedding_slots(tuner, targeted).items():
            if key in state:
                slots.setdefault(key, slot)
    unexpected = [k for k in state if k not in slots]
    missing = [s.mem_key for k, s in slots.items() if k not in state]
    mismatched = []
    for key, value in state.items():
        if key in slots and not slots[key].file_sized and tuple(slots[key].get().shape) != tuple(value.shape):
            mismatched.append(f"{key}: file {tuple(value.shape)}, model {tuple(slots[key].get().shape)}")
    if mismatched and not ignore_mismatched_sizes:
        raise ValueError(
            "The adapter's tensors do not fit this model (was it saved with another r, another config or "
            "another base model?). Size mismatch for " + "; ".join(mismatched[:5])
            + (f"; and {len(mismatched) - 5} more" if len(mismatched) > 5 else "")
        )
    skip = {m.split(":")[0] for m in mismatched}
    _check_layer_states(slots, state, skip)
    for key, value in state.items():
        if key in slots and key not in skip:
            slots[key].set(value)
    return LoadResult(missing, unexpected)


def _check_layer_states(slots: dict, state: dict[str, torch.Tensor], skip: set[str]) -> None:
    """Let each adapter layer refuse tensors that do not fit together, before anything is set."""
    per_layer: dict[int, tuple[Any, dict[str, torch.Tensor]]] = {}
    for key, slot in slots.items():
        if slot.layer is not None and key in state and key not in skip:
            per_layer.setdefault(id(slot.layer), (slot.layer, {}))[1][key] = state[key]
    for layer, tensors in per_layer.values():
        layer.check_state(tensors)


def _vocab_resized(model: nn.Module, config: PeftConfig) -> bool:
    """True when the model's vocabulary differs from its base's (read from a local config.json only)."""
    import json
    import os

    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    base = getattr(config, "base_model_name_or_path", None)
    path = os.path.join(base, "config.json") if base else None
    if not vocab or not path or not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as fh:
        base_vocab = json.load(fh).get("vocab_size")
    return base_vocab is not None and base_vocab != vocab


def _normalise_key(key: str) -> str:
    """Accept keys saved without the ``base_model.model.`` prefix as well (``prompt_embeddings`` has none)."""
    return key if key.startswith("base_model.") or key == "prompt_embeddings" else "base_model.model." + key


# ---------------------------------------------------------------------------- the base model's own state
def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict under its own keys, as before any adapter was added.

    Adapter tensors are left out, and the wrappers' infixes are taken out of the keys:
    ``q_proj.base_layer.weight`` -> ``q_proj.weight``, ``score.original_module.weight`` ->
    ``score.weight`` (the trained copies in ``modules_to_save`` are adapter state, left out).
    """
    return {original: value for original, (_, value) in _base_keys(model).items()}


def set_base_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> LoadResult:
    """Load a state dict keyed as the plain base model into the adapted model (the inverse of ``get_base_model_state_dict``).

    Args:
        model: the ``PeftModel`` (or a model with injected adapters).
        state_dict: tensors under the base model's own keys.
        strict: raise, before anything is loaded, if a key is missing or unexpected.

    Returns:
        ``(missing_keys, unexpected_keys)``, under the base model's own keys.
    """
    keys = _base_keys(model)
    missing = [k for k in keys if k not in state_dict]
    unexpected = [k for k in state_dict if k not in keys]
    if strict and (missing or unexpected):
        raise RuntimeError(
            "The state dict does not fit the base model; nothing was loaded."
            + (f" Missing keys: {missing}." if missing else "")
            + (f" Unexpected keys: {unexpected}." if unexpected else "")
            + " Pass strict=False to load the keys that fit."
        )
    inner = _base_module(model)
    inner.load_state_dict({keys[k][0]: v for k, v in state_dict.items() if k in keys}, strict=False)
    return LoadResult(missing, unexpected)


def _base_module(model: nn.Module) -> nn.Module:
    """The user's model inside a PeftModel / engine (the adapted module tree itself)."""
    tuner = _engine_of(model)
    return model if tuner is None else tuner.model


def _base_keys(model: nn.Module) -> dict[str, tuple[str, torch.Tensor]]:
    """Base key -> (key in the adapted model, tensor), for every entry of the adapted model's state dict
    that belongs to the base model."""
    from .core.layer import AdapterLayer
    from .core.wrappers import ModulesToSaveWrapper

    inner = _base_module(model)
    kept_child = {}  # wrapper path -> the child that holds the base module
    for name, module in inner.named_modules():
        if isinstance(module, AdapterLayer):
            kept_child[name] = "base_layer"
        elif isinstance(module, ModulesToSaveWrapper):
            kept_child[name] = "original_module"
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for key, value in inner.state_dict().items():
        parts, path, original = key.split("."), "", []  # original: None once the key is adapter state
        for part in parts:
            keep = kept_child.get(path)
            if keep is not None and part != keep:
                original = None  # inside a wrapper but not under its base module: adapter state
                break
            if keep is None:
                original.append(part)
            path = f"{path}.{part}" if path else part
        if original is not None:
            out[".".join(original)] = (key, value)
    return out


def __getattr__(name: str) -> Any:
    """PEFT's lookup tables, built once, on first use, from the method registry (then plain module globals)."""
    from .registry import registered_methods

    if name == "PEFT_TYPE_TO_CONFIG_MAPPING":
        table = {spec.peft_type: spec.config for spec in registered_methods()}
    elif name == "PEFT_TYPE_TO_TUNER_MAPPING":  # the engine class peftkit builds for each method
        table = {spec.peft_type: spec.engine or AdapterModel for spec in registered_methods()}
    elif name == "MODEL_TYPE_TO_PEFT_MODEL_MAPPING":
        from .peft_model import MODEL_TYPE_TO_PEFT_MODEL

        table = MODEL_TYPE_TO_PEFT_MODEL
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = table
    return table
