"""``PromptModel``: the engine for methods that adapt a frozen model through its inputs.

Prompt tuning and P-tuning put ``num_virtual_tokens`` learned embeddings in front of each
input's token embeddings; the attention mask gets ones for them and, for a causal LM, the
labels get -100 (no loss on virtual tokens). The engine is an ``AdapterModel`` without adapter
layers: adapter names, ``set_adapter``, ``delete_adapter``, ``disable_adapter()`` and
``modules_to_save`` work as for every other method; merging does not apply.

Generation: the model's ``prepare_inputs_for_generation`` is wrapped for the call, so the
first step feeds the prompt and the input's embeddings (the key/value cache then holds the
virtual tokens) and every later step feeds one token with an attention mask that covers the
virtual tokens too.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..config import PeftConfig
from ..core.tuner import AdapterModel
from ..registry import get_method
from ..types import PeftType, PeftWarning, TaskType

_LABELLED_PER_TOKEN = (TaskType.CAUSAL_LM.value, TaskType.TOKEN_CLS.value)


def _model_config(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
    if hasattr(cfg, "get_text_config"):
        text = cfg.get_text_config()
        d = {**d, **(text.to_dict() if hasattr(text, "to_dict") else {})}
    return d


def _first(d: dict[str, Any], keys: Sequence[str]) -> Any:
    return next((d[k] for k in keys if d.get(k) is not None), None)


class PromptModel(AdapterModel):
    """Holds a frozen model and the prompt encoders of its prompt-learning adapters."""

    state_prefix = "base_model."  # PeftModel keeps this engine beside the user's model (see AdapterModel)

    def __init__(
        self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", low_cpu_mem_usage: bool = False
    ) -> None:
        nn.Module.__init__(self)
        self.model = model
        self.training = model.training
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapter: str | list[str] = adapter_name
        self.prompt_encoder = nn.ModuleDict()
        self._prompts_enabled = True
        trainable = [p for p in model.parameters() if p.requires_grad]
        model.requires_grad_(False)
        try:
            self.inject_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)
        except BaseException:
            for p in trainable:  # the model is left as it was
                p.requires_grad_(True)
            raise
        self.model.peft_config = self.peft_config

    # ------------------------------------------------------------------ building
    @property
    def word_embeddings(self) -> nn.Module:
        emb = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        if emb is None:
            raise TypeError(f"{type(self.model).__name__} has no input embeddings (get_input_embeddings()): "
                            "prompt learning needs a model that takes inputs_embeds.")
        return emb

    def prepare_config(self, config: PeftConfig, spec: Any = None) -> PeftConfig:
        """A copy of ``config`` with the model's sizes filled in (as PEFT records them)."""
        config = config.copy()
        mc = _model_config(self.model)
        if config.num_layers is None:  # the attribute first: BART maps num_hidden_layers to encoder_layers
            config.num_layers = getattr(getattr(self.model, "config", None), "num_hidden_layers", None) or _first(
                mc, ("num_hidden_layers", "num_layers", "n_layer"))
        if config.token_dim is None:
            config.token_dim = _first(mc, ("hidden_size", "n_embd", "d_model"))
        if config.num_attention_heads is None:
            config.num_attention_heads = _first(mc, ("num_attention_heads", "n_head", "num_heads",
                                                     "encoder_attention_heads"))
        if config.peft_type == PeftType.PREFIX_TUNING.value and mc.get("num_key_value_heads") is not None:
            # the prefixes are keys and values: sized like them on a grouped-query model
            heads = config.num_attention_heads
            head_dim = mc.get("head_dim") or config.token_dim // heads
            config.token_dim = head_dim * mc["num_key_value_heads"]
            config.num_attention_heads = mc["num_key_value_heads"]
        missing = [f for f in ("num_layers", "token_dim", "num_attention_heads") if getattr(config, f) is None]
        if missing:
            raise ValueError(f"Cannot read {', '.join(missing)} from the model's config: set them in the "
                             f"{type(config).__name__}.")
        if config.num_transformer_submodules is None:
            config.num_transformer_submodules = 2 if config.task_type == TaskType.SEQ_2_SEQ_LM.value else 1
        if hasattr(config, "encoder_hidden_size") and config.encoder_hidden_size is None:
            config.encoder_hidden_size = config.token_dim
        return config

    def inject_adapter(self, adapter_name: str, config: PeftConfig, low_cpu_mem_usage: bool = False) -> None:
        """Add one prompt-learning adapter; on error nothing is changed."""
        spec = get_method(config.peft_type)
        if spec.prompt is None:
            raise ValueError(f"{config.peft_type} is not a prompt-learning method; it cannot join this model's "
                             f"{next(iter(self.peft_config.values())).peft_type} adapters.")
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} already exists: pick another name.")
        if config.num_virtual_tokens is None:
            raise ValueError(f"{type(config).__name__}.num_virtual_tokens is required (e.g. 20).")
        prefix = config.peft_type == PeftType.PREFIX_TUNING.value
        if prefix and any(getattr(m, "gradient_checkpointing", False) for m in self.model.modules()):
            raise ValueError("Prefix tuning feeds its prefixes through the key/value cache, which gradient "
                             "checkpointing turns off: call gradient_checkpointing_disable() first, or use prompt "
                             "tuning / P-tuning.")
        config = self.prepare_config(config)
        emb = self.word_embeddings
        if not prefix and emb.weight.shape[1] != config.token_dim:
            raise ValueError(f"{type(config).__name__}.token_dim={config.token_dim} does not match the model's "
                             f"embedding size {emb.weight.shape[1]}: leave token_dim unset or set it to "
                             f"{emb.weight.shape[1]}.")
        total = config.num_virtual_tokens * (1 if prefix else config.num_transformer_submodules)
        # loading (tensors on meta, filled from a file) or inference (a plain table: the file holds the
        # encoder's output) or training (the method's encoder)
        mode = "load" if low_cpu_mem_usage else "table" if config.inference_mode else "train"
        encoder = spec.prompt(config, emb, total, mode)
        if mode != "load":
            encoder.to(emb.weight.device)
        self.peft_config[adapter_name] = config
        self.prompt_encoder[adapter_name] = encoder
        if getattr(config, "modules_to_save", None):
            self._wrap_modules_to_save(adapter_name, config.modules_to_save)
        self._sync_trainable()
        if config.inference_mode:
            self.freeze_adapter(adapter_name)

    def _sync_trainable(self) -> None:
        active = set(self.active_adapters)
        for name, encoder in self.prompt_encoder.items():
            trainable = name in active and not self.peft_config[name].inference_mode
            encoder.requires_grad_(trainable)

    def freeze_adapter(self, adapter_name: str) -> None:
        super().freeze_adapter(adapter_name)
        if adapter_name in self.prompt_encoder:
            self.prompt_encoder[adapter_name].requires_grad_(False)

    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) != 1:
            raise ValueError("Prompt-learning adapters cannot be combined: activate one adapter at a time.")
        super().set_adapter(names, inference_mode=inference_mode)
        self._sync_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_adapters([adapter_name])
        del self.prompt_encoder[adapter_name]
        super().delete_adapter(adapter_name)

    def _set_enabled(self, enabled: bool) -> None:
        super()._set_enabled(enabled)
        self._prompts_enabled = enabled

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError("Prompt-learning adapters add virtual tokens to the input; they have no weights to merge.")

    unmerge_adapter = merge_adapter
    swap_merged_adapter = merge_adapter

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise ValueError("Prompt-learning adapters cannot be merged into the model: keep the PeftModel, or use "
                         "get_base_model() for the model without them.")

    # ------------------------------------------------------------------ prompts
    def prompt(self, adapter: str, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        """(batch, total_virtual_tokens, token_dim) virtual token embeddings of one adapter."""
        table = self.prompt_encoder[adapter]()
        return table.to(dtype).unsqueeze(0).expand(batch_size, -1, -1)

    def get_prompt(self, batch_size: int, task_ids: torch.Tensor | None = None, max_cache_len: int | None = None) -> Any:
        """What the active adapter puts in front of a batch (PEFT's ``get_prompt``): the virtual token
        embeddings (batch, tokens, token_dim), or for prefix tuning the cache holding its key/value prefixes.

        ``task_ids`` (multitask prompt tuning) is not supported; ``max_cache_len`` is accepted for PEFT's
        signature (the prefixes go into a dynamic cache, which grows as needed).
        """
        if task_ids is not None:
            raise ValueError("task_ids are for multitask prompt tuning, which peftkit does not implement.")
        if not self.active_adapters:
            raise ValueError("No active adapter: add one or call set_adapter first.")
        adapter = self.active_adapters[0]
        if self._is_prefix(adapter):
            return self.prefix_cache(adapter, batch_size)
        return self.prompt(adapter, batch_size, self.word_embeddings.weight.dtype)

    def get_prompt_embedding_to_save(self, adapter_name: str) -> torch.Tensor:
        """What a file stores for an adapter: the encoder's output, (total_virtual_tokens, token_dim)."""
        with torch.no_grad():
            return self.prompt_encoder[adapter_name]().detach().clone().cpu()

    def prefix_cache(self, adapter: str, batch_size: int) -> Any:
        """The cache holding one adapter's key/value prefixes for every layer (a ``DynamicCache``; for an
        encoder-decoder model an ``EncoderDecoderCache`` whose decoder self-attention part holds them)."""
        from transformers import DynamicCache

        config = self.peft_config[adapter]
        n, layers, heads = config.num_virtual_tokens, config.num_layers, config.num_attention_heads
        kv = self.prompt_encoder[adapter]().to(self.word_embeddings.weight.dtype)  # (n, layers·2·token_dim)
        kv = kv.view(1, n, layers * 2, heads, config.token_dim // heads).expand(batch_size, -1, -1, -1, -1)
        kv = kv.permute(2, 0, 3, 1, 4)  # (layers·2, batch, heads, n, head_dim)
        source = list(range(layers))
        if self._encoder_decoder:
            # PEFT's layout for encoder-decoder models: its (layers·2) rows are repeated and cut in groups of
            # four (self k, v, cross k, v) per decoder layer, so layer i's self-attention reads row group
            # 2i mod layers (and the cross part is then dropped). Files trained that way need the same reading.
            source = [(2 * i) % layers for i in range(layers)]
        cache = DynamicCache([(kv[2 * j], kv[2 * j + 1]) for j in source])
        if self._encoder_decoder:
            from transformers import EncoderDecoderCache

            # the prefixes go to the decoder's self-attention; cross-attention computes its keys from the encoder
            cache = EncoderDecoderCache(cache, DynamicCache())
        return cache

    @property
    def _encoder_decoder(self) -> bool:
        return bool(getattr(getattr(self.model, "config", None), "is_encoder_decoder", False))

    def _is_prefix(self, adapter: str) -> bool:
        return self.peft_config[adapter].peft_type == PeftType.PREFIX_TUNING.value

    def _prompting(self) -> str | None:
        """The adapter whose prompt applies now, or None (disabled, or no adapter)."""
        if not self._prompts_enabled or not self.active_adapters:
            return None
        return self.active_adapters[0]

    def _add_prompt(self, adapter: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The forward's keyword arguments with the virtual tokens in front."""
        config = self.peft_config[adapter]
        if self._is_prefix(adapter):
            return self._add_prefix(adapter, kwargs)
        input_ids = kwargs.pop("input_ids", None)
        embeds = kwargs.pop("inputs_embeds", None)
        if embeds is None:
            if input_ids is None:
                raise ValueError("Pass input_ids or inputs_embeds.")
            embeds = self.word_embeddings(input_ids)
        batch, n = embeds.shape[0], config.num_virtual_tokens
        mask = kwargs.get("attention_mask")
        if mask is not None:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        labels = kwargs.get("labels")
        if labels is not None and config.task_type in _LABELLED_PER_TOKEN:
            kwargs["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
        if kwargs.get("position_ids") is not None:
            warnings.warn(
                "position_ids are ignored with prompt learning (the virtual tokens shift every position).",
                PeftWarning,
            )
            kwargs["position_ids"] = None
        token_types = kwargs.get("token_type_ids")
        if token_types is not None:
            if config.task_type == TaskType.CAUSAL_LM.value:
                warnings.warn("token_type_ids are ignored with prompt learning on a causal LM.", PeftWarning)
                kwargs["token_type_ids"] = None
            else:
                kwargs["token_type_ids"] = torch.cat([token_types.new_zeros(batch, n), token_types], dim=1)
        prompt = self.prompt(adapter, batch, embeds.dtype)[:, :n]  # an encoder-decoder's encoder gets the first n
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        return kwargs

    def _add_prefix(self, adapter: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The forward's keyword arguments with the prefixes in the cache (the input itself is unchanged)."""
        if kwargs.get("past_key_values") is not None:
            raise ValueError("Prefix tuning builds past_key_values itself: do not pass a cache.")
        n = self.peft_config[adapter].num_virtual_tokens
        inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if inputs is None:
            raise ValueError("Pass input_ids or inputs_embeds.")
        batch = inputs.shape[0]
        mask_key = "decoder_attention_mask" if self._encoder_decoder else "attention_mask"  # where the prefix is
        mask = kwargs.get(mask_key)
        if mask is not None:
            kwargs[mask_key] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + n  # after the prefix
        causal = self.peft_config[adapter].task_type == TaskType.CAUSAL_LM.value
        if causal and kwargs.get("token_type_ids") is not None:
            warnings.warn("token_type_ids are ignored with prefix tuning on a causal LM.", PeftWarning)
            kwargs["token_type_ids"] = None
        kwargs["past_key_values"] = self.prefix_cache(adapter, batch)
        if causal:
            kwargs.setdefault("use_cache", True)
        return kwargs

    # ------------------------------------------------------------------ calls
    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        if adapter_names is not None:
            raise ValueError("adapter_names (per-sample adapters) is not supported with prompt learning.")
        adapter = self._prompting()
        if adapter is None:
            return self.model(*args, **kwargs)
        if args:
            kwargs["input_ids"] = args[0]
            if len(args) > 1:
                raise TypeError("Pass inputs after input_ids by name (attention_mask=..., labels=...).")
        return self.model(**self._add_prompt(adapter, kwargs))

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        if adapter_names is not None:
            raise ValueError("adapter_names (per-sample adapters) is not supported with prompt learning.")
        adapter = self._prompting()
        if adapter is None:
            return self.model.generate(*args, **kwargs)
        if self._encoder_decoder:
            return self._generate_encoder_decoder(adapter, args, kwargs)
        original = self.model.prepare_inputs_for_generation
        n = self.peft_config[adapter].num_virtual_tokens
        prefix = self._is_prefix(adapter)

        def prepare(*args: Any, **kwargs: Any) -> dict[str, Any]:  # named so: generate() inspects the signature
            inputs = original(*args, **kwargs)
            cache = inputs.get("past_key_values")
            first = cache is None or (hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0)
            mask = inputs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                inputs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
            if first and prefix:
                ids = inputs.get("input_ids")
                batch = (ids if ids is not None else inputs["inputs_embeds"]).shape[0]
                inputs["past_key_values"] = self.prefix_cache(adapter, batch)
            elif first:
                ids = inputs.pop("input_ids")
                embeds = inputs.pop("inputs_embeds", None)
                if embeds is None:
                    embeds = self.word_embeddings(ids)
                inputs["inputs_embeds"] = torch.cat([self.prompt(adapter, embeds.shape[0], embeds.dtype), embeds], 1)
                inputs["input_ids"] = None
            inputs.pop("position_ids", None)  # the model derives positions from the cache
            return inputs

        if args:
            kwargs["input_ids"] = args[0]
        return self._with_prepare(prepare, kwargs)

    def _generate_encoder_decoder(self, adapter: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        """The prompt goes in front of the encoder's input once; the decoder generates as usual."""
        if args:
            kwargs["input_ids"] = args[0]
        if kwargs.get("input_ids") is None and kwargs.get("inputs_embeds") is None:
            raise ValueError("Pass input_ids (or inputs_embeds) to generate.")
        if not self._is_prefix(adapter):
            kwargs.pop("encoder_outputs", None)  # the encoder must see the prompt: it runs again
            return self.model.generate(**self._add_prompt(adapter, kwargs))
        model = self.model
        original = model.prepare_inputs_for_generation

        def prepare(*args: Any, **kwargs: Any) -> dict[str, Any]:  # named so: generate() inspects the signature
            inputs = original(*args, **kwargs)
            cache = inputs.get("past_key_values")
            if cache is None or cache.get_seq_length() == 0:  # prefill: the decoder's cache starts with the prefixes
                inputs["past_key_values"] = self.prefix_cache(adapter, inputs["decoder_input_ids"].shape[0])
            return inputs

        return self._with_prepare(prepare, kwargs)

    def _with_prepare(self, prepare: Any, kwargs: dict[str, Any]) -> Any:
        """``model.generate(**kwargs)`` with ``prepare_inputs_for_generation`` replaced for the call."""
        model = self.model
        own = vars(model).get("prepare_inputs_for_generation")  # an instance override to put back
        model.prepare_inputs_for_generation = prepare
        try:
            return model.generate(**kwargs)
        finally:
            if own is not None:
                model.prepare_inputs_for_generation = own
            else:
                del model.prepare_inputs_for_generation  # back to the class's method

    def adapter_layers(self) -> Iterator[tuple[str, Any]]:
        return iter(())
