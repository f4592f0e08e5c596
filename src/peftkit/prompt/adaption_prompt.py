"""Llama-Adapter (adaption prompts): gated learned prompts attended to by the top attention layers.

Each adapted attention module keeps ``adaption_prompt`` (1, adapter_len, hidden) and a gate
``adaption_gate`` (1,), zero at the start so the model starts as the base model. On top of the
attention's own output it adds ``o_proj(gate · softmax(q k_pᵀ / √d) v_p)``, where ``q`` is the
layer's rotary-embedded query and ``k_p, v_p`` are the prompt through the layer's own ``k_proj`` /
``v_proj`` (shared by each group of query heads on a grouped-query model). The prompt never
enters the key/value cache, so generation with a cache needs nothing special.

Llama, Mistral and Qwen2 attention modules serve (transformers passes them the rotary
``position_embeddings``); other architectures get an error that names these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PeftConfig
from ..core.base_ops import BaseOps
from ..core.context import current_adapter_names
from ..core.layer import AdapterLayer
from ..registry import MethodSpec, register_method
from ..types import PeftType

SUPPORTED = ("llama", "mistral", "qwen2")


@dataclass
class AdaptionPromptConfig(PeftConfig):
    """Configuration of a Llama-Adapter.

    Attributes:
        target_modules: the name of the attention submodules (default ``"self_attn"``).
        adapter_len: learned prompt tokens per adapted layer.
        adapter_layers: how many attention layers, counted from the top, get a prompt.
    """

    target_modules: str | None = None
    adapter_len: int | None = None
    adapter_layers: int | None = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.ADAPTION_PROMPT
        super().__post_init__()
        for attr in ("adapter_len", "adapter_layers"):
            v = getattr(self, attr)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"AdaptionPromptConfig.{attr} must be a positive integer, got {v!r}.")
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            raise ValueError("AdaptionPromptConfig.target_modules is one module name (e.g. 'self_attn').")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class AdaptedAttention(AdapterLayer):
    """A Llama-family attention module with gated adaption prompts."""

    prefix = "adaption_"
    adapter_attrs = ("adaption_prompt", "adaption_gate")
    supported_kinds = ("attention",)

    def __init__(self, base_layer: nn.Module, ops: Any = None) -> None:
        hidden = base_layer.q_proj.in_features
        super().__init__(base_layer, BaseOps("attention", hidden, hidden))
        self.adaption_prompt = nn.ParameterDict()
        self.adaption_gate = nn.ParameterDict()

    @classmethod
    def can_wrap(cls, module: nn.Module) -> bool:
        return all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "config"))

    def create(self, adapter: str, config: Any, *, device: Any = None) -> None:
        weight = self.base_layer.q_proj.weight
        device = torch.device(device if device is not None else weight.device)
        dtype = self.adapter_dtype()
        shape = (1, config.adapter_len, self.in_features)
        prompt = torch.empty(shape, device=device, dtype=dtype)
        if device.type != "meta":
            prompt.normal_()
        self.adaption_prompt[adapter] = nn.Parameter(prompt)
        self.adaption_gate[adapter] = nn.Parameter(torch.zeros(1, device=device, dtype=dtype))

    # ------------------------------------------------------------------ forward
    def _prompt_output(self, adapter: str, hidden: torch.Tensor, cos_sin: tuple) -> torch.Tensor:
        attn = self.base_layer
        batch, length, _ = hidden.shape
        heads, head_dim = attn.config.num_attention_heads, attn.head_dim
        groups = heads * head_dim // attn.k_proj.out_features  # query heads per key/value head
        q = attn.q_proj(hidden).view(batch, length, heads, head_dim).transpose(1, 2)  # (B, H, L, d)
        cos, sin = (t.unsqueeze(1) for t in cos_sin)
        q = q * cos + _rotate_half(q) * sin
        prompt = self.adaption_prompt[adapter].to(attn.q_proj.weight.dtype)
        n = prompt.shape[1]
        k = attn.k_proj(prompt).view(1, n, heads // groups, head_dim).transpose(1, 2).repeat_interleave(groups, 1)
        v = attn.v_proj(prompt).view(1, n, heads // groups, head_dim).transpose(1, 2).repeat_interleave(groups, 1)
        scores = q @ k.transpose(2, 3).to(q.dtype) / math.sqrt(head_dim)  # (B, H, L, n)
        probs = self.adaption_gate[adapter].to(q.dtype) * F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = (probs @ v.to(q.dtype)).transpose(1, 2).reshape(batch, length, -1)
        return attn.o_proj(out)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        result = self.base_layer(*args, **kwargs)
        if current_adapter_names() is not None:
            raise ValueError("adapter_names (per-sample adapters) is not supported with Llama-Adapter.")
        adapters = [a for a in self.active_adapters if a in self.adaption_prompt]
        if self._disable_adapters or not adapters:
            return result
        if kwargs.get("output_attentions"):
            raise NotImplementedError("output_attentions is not supported with Llama-Adapter.")
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos_sin = kwargs.get("position_embeddings")
        if cos_sin is None:
            raise ValueError(f"{type(self.base_layer).__name__} was called without position_embeddings: "
                             "Llama-Adapter needs the rotary embeddings transformers passes to Llama-family attention.")
        output, *rest = result
        for adapter in adapters:
            output = output + self._prompt_output(adapter, hidden, cos_sin)
        return (output.to(result[0].dtype), *rest)

    # ------------------------------------------------------------------ merging does not apply
    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        raise ValueError("Llama-Adapter adds attention to learned prompts; it has no weight change to merge.")

    def delta_weight(self, adapter: str) -> torch.Tensor:
        raise ValueError("Llama-Adapter has no weight change (it adds attention to learned prompts).")


def _prepare(config: AdaptionPromptConfig, model_type: str | None) -> None:
    if model_type not in SUPPORTED:
        raise ValueError(f"Llama-Adapter (adaption prompt) supports model types {', '.join(SUPPORTED)}; "
                         f"this model is {model_type!r}. Use prompt tuning, prefix tuning or LoRA instead.")
    if config.target_modules is None:
        config.target_modules = "self_attn"


def _select(config: AdaptionPromptConfig, modules: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """The last ``adapter_layers`` modules named ``target_modules`` (the top of the stack)."""
    name = config.target_modules
    found = [(k, m) for k, m in modules if k == name or k.endswith("." + name)]
    if len(found) < config.adapter_layers:
        raise ValueError(f"AdaptionPromptConfig.adapter_layers={config.adapter_layers} but the model has "
                         f"{len(found)} '{name}' modules: use at most {len(found)}.")
    return found[len(found) - config.adapter_layers:]


register_method(
    MethodSpec(peft_type=PeftType.ADAPTION_PROMPT, config=AdaptionPromptConfig, layer=AdaptedAttention,
               prefix="adaption_", prepare=_prepare, select=_select)
)
