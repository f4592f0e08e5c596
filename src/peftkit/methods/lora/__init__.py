"""LoRA: low-rank adaptation."""

from __future__ import annotations

from typing import Any

from ...core.targeting import pattern_value
from ...registry import MethodSpec, register_method
from ...types import PeftType
from .config import LoraConfig
from .init import convert_to_plain_lora
from .layer import LoraLayer
from .weighted import add_weighted_adapter

# model_type -> the attention projections LoRA adapts when target_modules is None.
DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(
        ["llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "opt", "bart",
         "mbart", "gptj", "gpt_neo", "phi", "stablelm", "olmo", "olmo2", "granite", "smollm3", "starcoder2"],
        ["q_proj", "v_proj"],
    ),
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "camembert", "layoutlm"], ["query", "value"]),
    **dict.fromkeys(["t5", "mt5", "umt5", "longt5"], ["q", "v"]),
    **dict.fromkeys(["gpt_neox", "bloom", "falcon"], ["query_key_value"]),
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "phi3": ["qkv_proj"],
}


def _per_layer(config: LoraConfig, key: str) -> dict[str, Any]:
    return {
        "r": pattern_value(config.rank_pattern, key, config.r),
        "alpha": pattern_value(config.alpha_pattern, key, config.lora_alpha),
    }


register_method(
    MethodSpec(
        peft_type=PeftType.LORA,
        config=LoraConfig,
        layer=LoraLayer,
        prefix="lora_",
        default_targets=DEFAULT_TARGETS,
        per_layer=_per_layer,
        convert_initial=convert_to_plain_lora,
        weighted=add_weighted_adapter,
    )
)

__all__ = ["LoraConfig", "LoraLayer"]
