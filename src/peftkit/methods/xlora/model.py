"""``XLoraModel``: trained LoRA experts mixed per token by a classifier over the hidden states.

Every call runs two passes. The scaling pass runs the model with every expert at
``scaling_pass_value`` (0 by default: the base model alone, and only its backbone, no output
head) and hands the last hidden state to the classifier, which predicts each token's expert
weights. The real pass runs the model with those weights. Each pass keeps its own key/value
cache (``XLoraCache``), so generation costs one token per pass per step.

The experts are ordinary LoRA adapters named "0", "1", ... (in ``config.adapters`` order) held
by an inner engine (``lora_model``). A saved X-LoRA model is PEFT's layout: the classifier at the
root, each expert in sub-folder ``<i>/`` as a plain LoRA adapter.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ...config import PeftConfig
from ...core.context import forward_memo, forward_options
from ...core.tuner import AdapterModel
from ...types import PeftType, PeftWarning
from ..lora.layer import LoraLayer
from .cache import xlora_cache_class
from .classifier import XLoraClassifier, expert_weights
from .config import XLoraConfig
from .layer import Gate, XLoraLayer

# Arguments for the output head only: the scaling pass runs the backbone without them.
_HEAD_ARGS = ("labels", "logits_to_keep", "num_logits_to_keep", "output_hidden_states", "output_attentions",
              "return_dict", "start_positions", "end_positions")
_HUB_KWARGS = ("revision", "token", "cache_dir", "force_download", "local_files_only")


class _Experts(AdapterModel):
    """The engine holding the LoRA experts: LoRA layers are built as ``XLoraLayer``."""

    def layer_class(self, spec: Any) -> type:
        return XLoraLayer if spec.layer is LoraLayer else spec.layer


class XLoraModel(AdapterModel):
    """A mixture of LoRA experts (PEFT's ``XLoraModel``); ``PeftModel`` builds it for an ``XLoraConfig``.

    Args:
        model: the base model; the experts are injected into it.
        peft_config: the ``XLoraConfig``; its ``adapters`` name the experts' folders.
        adapter_name: the name the mixture is known by (it does not name the experts).
        low_cpu_mem_usage: accepted for the engine signature (the experts are always loaded from files).
    """

    def __init__(
        self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", low_cpu_mem_usage: bool = False
    ) -> None:
        nn.Module.__init__(self)
        if not isinstance(peft_config, XLoraConfig):
            raise TypeError(f"XLoraModel needs an XLoraConfig, got {type(peft_config).__name__}.")
        config = _prepared(peft_config, model)
        self.training = model.training
        self.peft_config: dict[str, PeftConfig] = {adapter_name: config}
        self.active_adapter: str | list[str] = adapter_name
        self._enabled = True
        trainable = [p for p in model.parameters() if p.requires_grad]
        sources = getattr(peft_config, "_expert_sources", None) or [[(p, None)] for p in config.adapters.values()]
        try:
            self.lora_model = _load_experts(model, sources, getattr(peft_config, "_hub_kwargs", {}))
            layers = self._number_layers()
        except BaseException:
            if "lora_model" in self._modules:
                self._modules["lora_model"].unload()
            for p in trainable:  # the model is left as it was
                p.requires_grad_(True)
            raise
        n = len(config.adapters)
        if config.scaling_pass_value is None:
            config.scaling_pass_value = 1.0 / n
        anchor = next((p for p in model.parameters() if p.is_floating_point()), None)
        self.internal_xlora_classifier = XLoraClassifier(
            config, n, len(layers), anchor.dtype if anchor is not None else torch.float32,
            anchor.device if anchor is not None else None,
        )
        self.internal_xlora_scalings: torch.Tensor | None = None
        self._freeze_experts()
        if config.inference_mode:  # loaded for inference: nothing trains
            self.internal_xlora_classifier.requires_grad_(False)
        model.peft_config = self.peft_config

    # ------------------------------------------------------------------ structure
    def __getattr__(self, name: str) -> Any:
        if name == "lora_model":  # not built (yet): no fallback to the wrapped model
            return nn.Module.__getattr__(self, name)
        return super().__getattr__(name)

    @property
    def model(self) -> nn.Module:  # the user's model, held (once) by the experts' engine
        return self.lora_model.model

    @property
    def xlora_config(self) -> XLoraConfig:
        return self.peft_config[self.active_adapters[0]]

    @property
    def expert_names(self) -> list[str]:
        """The experts' names, in the order of the scalings' last dimension."""
        return list(self.xlora_config.adapters)

    def _number_layers(self) -> list[XLoraLayer]:
        named = list(self.lora_model.adapter_layers())
        for i, (name, layer) in enumerate(named):
            if layer.ops.kind == "conv":
                raise TypeError(f"X-LoRA mixes experts on Linear, Conv1D and Embedding layers; {name} is a "
                                f"{type(layer.base_layer).__name__}. Train the experts without convolution targets.")
            dora = [self.expert_names[int(e)] for e, on in layer.use_dora.items() if on]
            if dora:
                raise ValueError(f"X-LoRA cannot mix DoRA experts ({dora}): use plain LoRA experts.")
            layer.xlora_index = i
        return [layer for _, layer in named]

    def _freeze_experts(self) -> None:
        config = self.xlora_config
        trainable = config.use_trainable_adapters and not config.inference_mode
        for _, layer in self.lora_model.adapter_layers():
            for e in layer.adapters:
                for p in layer.adapter_parameters(e):
                    p.requires_grad_(trainable)

    @classmethod
    def loading_config(cls, config: PeftConfig, model_id: str | os.PathLike, **kwargs: Any) -> PeftConfig:
        """Where each expert is read from when a saved X-LoRA model is loaded.

        ``adapters=`` (name -> folder) given to ``from_pretrained`` wins; otherwise the saved
        sub-folder ``<i>/``, then the folder named in the config (PEFT 0.21's sub-folders can be
        incomplete; a sub-folder that lacks some of the expert's tensors gives way to the original).
        """
        if "adapters" in kwargs:
            config.adapters = {str(k): str(v) for k, v in dict(kwargs["adapters"]).items()}
            config._expert_sources = [[(p, None)] for p in config.adapters.values()]
            return config
        from ...config import CONFIG_NAME
        from ...io.hub import resolve_file

        if _numbered(list(config.adapters)):  # PEFT writes its "0", "1", ..., "10" sorted as text
            config.adapters = {str(i): config.adapters[str(i)] for i in range(len(config.adapters))}

        hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        base = os.path.join(kwargs["subfolder"], "") if kwargs.get("subfolder") else ""
        sources = []
        for i, path in enumerate(config.adapters.values()):
            found = resolve_file(model_id, CONFIG_NAME, subfolder=f"{base}{i}", missing_ok=True, **hub)
            candidates = [(os.fspath(model_id), f"{base}{i}")] if found else []
            if os.path.isdir(path) or not found:
                candidates.append((path, None))
            sources.append(candidates)
        config._expert_sources = sources
        config._hub_kwargs = hub
        return config

    # ------------------------------------------------------------------ calls
    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        _no_adapter_names(adapter_names)
        return self._run(self.model, args, kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """``model.generate`` with both passes at every step, each with its own key/value cache."""
        _no_adapter_names(adapter_names)
        model = self.model
        if not self._enabled:
            return model.generate(*args, **kwargs)
        own = vars(model).get("forward")
        original = model.forward

        @functools.wraps(original)  # generate() reads the forward's signature
        def forward(*a: Any, **kw: Any) -> Any:
            return self._run(original, a, kw)

        model.forward = forward
        try:
            return model.generate(*args, **kwargs)
        finally:
            if own is not None:
                model.forward = own
            else:
                del model.forward

    def _run(self, call: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        """The scaling pass, the classifier, then ``call`` (the model's forward) with the predicted weights."""
        if not self._enabled:
            return call(*args, **kwargs)
        kwargs = dict(kwargs)
        if args:
            if len(args) > 1:
                raise TypeError("Pass the inputs after input_ids by name (attention_mask=..., labels=...).")
            kwargs["input_ids"] = args[0]
        scaling_cache = self._prepare_caches(kwargs)
        config = self.xlora_config
        with torch.no_grad(), forward_options(None, owner=self):
            forward_memo()["xlora"] = self._scaling_pass_gate()
            hidden = self._last_hidden_state(kwargs, scaling_cache)
        scalings = self.internal_xlora_classifier(hidden)
        self.internal_xlora_scalings = scalings
        shared = scalings if config.layerwise_scalings else scalings[:, :, :1]
        weights = expert_weights(shared, config.top_k_lora, config.enable_softmax_topk)
        gsw = config.global_scaling_weight
        gate = Gate(weights * gsw if gsw != 1 else weights, gsw)
        with forward_options(None, owner=self), self._gate_in_recomputation(gate):
            forward_memo()["xlora"] = gate
            return call(**kwargs)

    @contextlib.contextmanager
    def _gate_in_recomputation(self, gate: Gate) -> Iterator[None]:
        """Under gradient checkpointing, the layers recomputed in backward (after this call) see the gate too.

        transformers checkpoints a block through the block's ``_gradient_checkpointing_func``; for the
        call, that function is wrapped so the function it stores for recomputation sets the gate first.
        """
        grad = torch.is_grad_enabled() and self.model.training
        owners = [m for m in self.model.modules() if "_gradient_checkpointing_func" in vars(m)] if grad else []
        originals = [vars(m)["_gradient_checkpointing_func"] for m in owners]
        for module, checkpoint in zip(owners, originals):
            module._gradient_checkpointing_func = _gated_checkpoint(checkpoint, gate, self)
        try:
            yield
        finally:
            for module, checkpoint in zip(owners, originals):
                module._gradient_checkpointing_func = checkpoint

    def _scaling_pass_gate(self) -> Gate:
        config = self.xlora_config
        gsw, value = config.global_scaling_weight, config.scaling_pass_value
        if not value:
            return Gate(None, gsw)
        device = self.internal_xlora_classifier.layers[0].weight.device
        full = torch.full((len(config.adapters),), float(value), device=device)
        return Gate(expert_weights(full, config.top_k_lora, config.enable_softmax_topk) * gsw, gsw)

    def _last_hidden_state(self, kwargs: dict[str, Any], cache: Any) -> torch.Tensor:
        """The last hidden state of the scaling pass (from the backbone alone where the model has one)."""
        model = self.model
        kw = dict(kwargs)
        kw["past_key_values"], kw["use_cache"] = cache, cache is not None
        backbone = getattr(model, "base_model", None)
        if isinstance(backbone, nn.Module) and backbone is not model:
            for k in _HEAD_ARGS:
                kw.pop(k, None)
            return backbone(**kw)[0]
        kw.pop("labels", None)
        out = model(**kw, output_hidden_states=True, return_dict=True)
        return out.hidden_states[-1]

    def _prepare_caches(self, kwargs: dict[str, Any]) -> Any:
        """Give the real pass an ``XLoraCache`` when caching is on; return the scaling pass's cache (or None)."""
        cls = xlora_cache_class()
        past = kwargs.get("past_key_values")
        if isinstance(past, cls):
            return past.scaling_cache
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = not self.model.training and bool(getattr(getattr(self.model, "config", None), "use_cache", False))
        if past is None and not use_cache:
            return None
        if past is not None:
            from transformers.cache_utils import DynamicCache

            if type(past) is not DynamicCache or past.get_seq_length() > 0:
                raise ValueError(
                    "X-LoRA keeps a second key/value cache for its scaling pass, so it needs the past_key_values "
                    f"it returned itself (or an empty DynamicCache); got a {type(past).__name__}. Pass the "
                    "past_key_values of this model's previous output, or use_cache=False."
                )
        config = getattr(self.model, "config", None)
        cache = cls(config=config) if config is not None and hasattr(config, "get_text_config") else cls()
        kwargs["past_key_values"] = cache
        kwargs["use_cache"] = True
        return cache.scaling_cache

    # ------------------------------------------------------------------ X-LoRA controls (PEFT's API)
    def enable_scalings_logging(self) -> None:
        """Record every predicted scalings tensor (see ``get_scalings_log``)."""
        self.internal_xlora_classifier.scalings_logging = True

    def disable_scalings_logging(self) -> None:
        """Stop recording scalings; the log is kept."""
        self.internal_xlora_classifier.scalings_logging = False

    def clear_scalings_log(self) -> None:
        self.internal_xlora_classifier.log_scalings.clear()

    def get_scalings_log(self) -> list[torch.Tensor]:
        """A copy of the log list (the tensors are shared): each (batch, seq, n_layers, n_experts)."""
        return list(self.internal_xlora_classifier.log_scalings)

    def get_bucketed_scalings_log(self) -> dict[int, tuple[list[int], list[torch.Tensor]]]:
        """The log grouped by sequence length: seq_len -> (positions in the log, scalings)."""
        return self.internal_xlora_classifier.bucketed_log()

    def get_latest_scalings(self) -> torch.Tensor | None:
        """The last predicted scalings, (batch, seq, n_layers, n_experts), or None before any call."""
        return self.internal_xlora_scalings

    def get_global_scaling_weight(self) -> float:
        return self.xlora_config.global_scaling_weight

    def set_global_scaling_weight(self, weight: float) -> None:
        """A factor on every expert's output (1 by default); kept in the config."""
        self.xlora_config.global_scaling_weight = float(weight)

    def set_scaling_pass_value(self, value: float | None) -> None:
        """The experts' weight in the scaling pass; None means 1/number of experts. Kept in the config."""
        self.xlora_config.scaling_pass_value = 1.0 / len(self.expert_names) if value is None else float(value)

    def set_topk_lora(self, value: int | None) -> None:
        """Keep only the ``value`` highest-weighted experts per token (None: all). Kept in the config."""
        _check_top_k(value, len(self.expert_names))
        self.xlora_config.top_k_lora = value

    # ------------------------------------------------------------------ engine verbs
    def own_slots(self, adapter: str) -> dict[str, Any]:
        """The classifier's tensors under PEFT's keys (``base_model.internal_xlora_classifier.layers.N.weight``)."""
        from ...io.keys import Slot, _tensors

        prefix = "base_model.internal_xlora_classifier."
        return {prefix + sub: Slot(owner, leaf, prefix + sub) for sub, owner, leaf in _tensors(self.internal_xlora_classifier)}

    def save_companions(self, folder: str, adapter: str, safe_serialization: bool = True, write: bool = True) -> None:
        """Write each expert, as its current LoRA adapter, to ``<folder>/<i>/``."""
        from ...io.serialization import save_state_dict
        from ...mapping import get_peft_model_state_dict

        for i in range(len(self.expert_names)):
            sub = os.path.join(folder, str(i))
            state = get_peft_model_state_dict(self.lora_model, adapter_name=str(i), save_embedding_layers=False)
            if not write:
                continue
            os.makedirs(sub, exist_ok=True)
            save_state_dict(state, sub, safe_serialization=safe_serialization)
            self.lora_model.peft_config[str(i)].save_pretrained(sub)

    def _set_enabled(self, enabled: bool) -> None:
        self._enabled = enabled
        self.lora_model._set_enabled(enabled)

    def inject_adapter(self, adapter_name: str, config: PeftConfig, low_cpu_mem_usage: bool = False) -> None:
        raise ValueError("An X-LoRA model holds one mixture of experts: build another X-LoRA model (with the "
                         "expert in XLoraConfig.adapters) instead of adding an adapter to this one.")

    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if names != list(self.peft_config):
            raise ValueError(f"An X-LoRA model has one adapter, {list(self.peft_config)}: the experts are mixed by "
                             "the classifier, not selected with set_adapter.")

    def delete_adapter(self, adapter_name: str) -> None:
        """Deleting the mixture removes the experts and the classifier (the model is the base model again)."""
        self._check_adapters([adapter_name])
        self.unload()
        del self.peft_config[adapter_name]
        self.active_adapter = []

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("add_weighted_adapter is for LoRA models; X-LoRA mixes its experts per token.")

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        raise NotImplementedError("X-LoRA cannot be merged: its expert weights change with every token.")

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise NotImplementedError("X-LoRA cannot be merged: its expert weights change with every token. "
                                  "unload() gives back the base model.")

    def unload(self) -> nn.Module:
        """Remove the experts without merging and return the base model."""
        model = self.lora_model.unload()
        model.__dict__.pop("peft_config", None)
        return model


def _gated_checkpoint(checkpoint: Any, gate: Gate, owner: XLoraModel) -> Any:
    """``checkpoint`` whose function sets the gate when it runs (in forward, and again when backward
    recomputes it); the gate's weights go in as an input, so their gradient leaves through the checkpoint."""

    def run(function: Any, *args: Any, **kwargs: Any) -> Any:
        def gated(*a: Any, **k: Any) -> Any:
            *inputs, weights = a
            with forward_options(None, owner=owner):
                forward_memo()["xlora"] = Gate(weights, gate.bias_weight)
                return function(*inputs, **k)

        return checkpoint(gated, *args, gate.weights, **kwargs)

    return run


def _no_adapter_names(adapter_names: Any) -> None:
    if adapter_names is not None:
        raise ValueError("adapter_names (per-sample adapters) does not apply to X-LoRA: the classifier weighs the "
                         "experts for every token.")


def _check_top_k(value: int | None, n: int) -> None:
    if value is not None and (isinstance(value, bool) or not 1 <= int(value) <= n):
        raise ValueError(f"top_k_lora must be between 1 and the number of experts ({n}), or None; got {value!r}.")


def _prepared(config: XLoraConfig, model: nn.Module) -> XLoraConfig:
    """A copy of the config with the model's hidden size filled in and checked."""
    config = config.copy()
    if not config.adapters:
        raise ValueError("XLoraConfig.adapters is empty: name the trained LoRA experts, {name: adapter folder}.")
    names = list(config.adapters)
    if _numbered(names) and names != [str(i) for i in range(len(names))]:
        raise ValueError(f"Experts named by numbers must be given in order, '0', '1', ... (got {names}): the numbers "
                         "name the saved sub-folders, as in PEFT. Reorder XLoraConfig.adapters or use other names.")
    _check_top_k(config.top_k_lora, len(config.adapters))
    mc = getattr(model, "config", None)
    text = mc.get_text_config() if hasattr(mc, "get_text_config") else mc
    width = getattr(text, "hidden_size", None)
    if config.hidden_size is None:
        if width is None:
            raise ValueError("XLoraConfig.hidden_size is not set and the model's config has no hidden_size: set it.")
        config.hidden_size = width
    elif width is not None and config.hidden_size != width:
        raise ValueError(f"XLoraConfig.hidden_size={config.hidden_size} but the model's hidden size is {width}: "
                         f"set hidden_size={width} (or leave it unset).")
    return config


def _numbered(names: list[str]) -> bool:
    """Names "0".."n-1" in any order (PEFT's expert names)."""
    return sorted(names) == sorted(str(i) for i in range(len(names)))


def _load_experts(model: nn.Module, sources: list[list[tuple[str, str | None]]], hub: dict[str, Any]) -> _Experts:
    """Inject every expert (named "0", "1", ...) and load its weights; on error the model is left as it was."""
    built: list[_Experts] = []
    try:
        _fill_experts(model, sources, hub, built)
    except BaseException:
        if built:
            built[0].unload()
        raise
    built[0].set_adapter([str(i) for i in range(len(sources))])
    return built[0]


def _fill_experts(model: nn.Module, sources: list, hub: dict[str, Any], box: list) -> None:
    """Inject and load the experts one by one (the engine goes into ``box``); the first complete source wins."""
    from ...mapping import set_peft_model_state_dict

    experts: _Experts | None = None
    for i, candidates in enumerate(sources):
        name = str(i)
        for j, (path, sub) in enumerate(candidates):
            lora_config, state = _read_expert(path, sub, hub)
            last = j == len(candidates) - 1
            if experts is None:
                experts = _Experts(model, lora_config, name, low_cpu_mem_usage=True)
                box.append(experts)
            else:
                experts.inject_adapter(name, lora_config, low_cpu_mem_usage=True)
            result = set_peft_model_state_dict(experts, state, adapter_name=name)
            if not result.missing_keys:
                break
            experts.delete_adapter(name)
            if last:  # no complete source: real initial values for what the file lacks
                warnings.warn(f"Expert {i} ({_where(path, sub)}) has no values for {len(result.missing_keys)} "
                              f"tensors (e.g. {result.missing_keys[:2]}); they keep their initial values.", PeftWarning)
                experts.inject_adapter(name, lora_config)
                set_peft_model_state_dict(experts, state, adapter_name=name)
        if result.unexpected_keys:
            warnings.warn(f"Expert {i}: keys that fit nothing in the model: {result.unexpected_keys[:5]}", PeftWarning)


def _where(path: str, sub: str | None) -> str:
    return os.path.join(path, sub) if sub else path


def _read_expert(path: str, sub: str | None, hub: dict[str, Any]) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """One expert's LoRA config and tensors; PEFT's X-LoRA sub-folder keys are read too."""
    from ...io.serialization import read_adapter_weights

    config = PeftConfig.from_pretrained(path, subfolder=sub, **hub)
    if config.peft_type != PeftType.LORA.value:
        raise ValueError(f"X-LoRA experts are LoRA adapters; {_where(path, sub)} holds a {config.peft_type} adapter.")
    init = config.init_lora_weights
    if isinstance(init, str) and (init == "olora" or init.startswith("pissa")):
        raise ValueError(f"Expert {_where(path, sub)} was initialised with {init!r}, which changes the base weights: "
                         "save it with path_initial_model_for_weight_conversion (a plain LoRA) and use that.")
    config.inference_mode = False
    state = {}
    for key, value in read_adapter_weights(path, sub, **hub).items():
        if key.startswith("base_model.lora_model."):  # PEFT's X-LoRA sub-folder layout
            key = "base_model." + key[len("base_model.lora_model."):]
        if ".lora_" in key:
            state[key] = value
    return config, state
