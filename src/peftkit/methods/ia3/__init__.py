"""(IA)³: infused adapters that rescale activations with one learned vector per layer."""

from __future__ import annotations

from typing import Any

from ...registry import MethodSpec, register_method
from ...types import PeftType
from .config import IA3Config, is_feedforward
from .layer import IA3Layer
from .weighted import add_weighted_adapter

# model_type -> (default target_modules, the feed-forward ones among them); PEFT's choices.
_DEFAULTS: dict[str, tuple[list[str], list[str]]] = {
    "t5": (["k", "v", "wo"], ["wo"]),
    "mt5": (["k", "v", "wi_1"], []),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "gpt_bigcode": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
    **dict.fromkeys(["roberta", "bert"], (["key", "value", "output.dense"], ["output.dense"])),
    "deberta-v2": (["key_proj", "value_proj", "output.dense"], ["output.dense"]),
    "deberta": (["in_proj", "output.dense"], ["output.dense"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    **dict.fromkeys(["bart", "phi"], (["q_proj", "v_proj", "fc2"], ["fc2"])),
    "gptj": (["q_proj", "v_proj", "fc_out"], ["fc_out"]),
    "gpt_neo": (["q_proj", "v_proj", "c_proj"], ["c_proj"]),
    **dict.fromkeys(
        ["gpt_neox", "falcon", "RefinedWeb", "RefinedWebModel"], (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"])
    ),
    **dict.fromkeys(["llama", "mistral"], (["k_proj", "v_proj", "down_proj"], ["down_proj"])),
    "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    **dict.fromkeys(
        ["llama4", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3"], (["q_proj", "v_proj", "down_proj"], ["down_proj"])
    ),
}
DEFAULT_TARGETS: dict[str, list[str]] = {k: list(t) for k, (t, _) in _DEFAULTS.items()}
DEFAULT_FEEDFORWARD: dict[str, list[str]] = {k: list(f) for k, (_, f) in _DEFAULTS.items()}


def _prepare(config: IA3Config, model_type: str | None) -> None:
    """Without ``feedforward_modules``, use the model type's default (recorded, so it is saved as PEFT saves it)."""
    if config.feedforward_modules is not None:
        return
    if model_type not in DEFAULT_FEEDFORWARD:
        raise ValueError(
            f"IA3Config.feedforward_modules is not set and peftkit has no default for model_type={model_type!r}: "
            "pass feedforward_modules (the targets whose input is scaled, e.g. ['down_proj']; [] for none)."
        )
    config.feedforward_modules = set(DEFAULT_FEEDFORWARD[model_type])


def _per_layer(config: IA3Config, key: str) -> dict[str, Any]:
    return {"feedforward": is_feedforward(config, key)}


register_method(
    MethodSpec(
        peft_type=PeftType.IA3,
        config=IA3Config,
        layer=IA3Layer,
        prefix="ia3_",
        default_targets=DEFAULT_TARGETS,
        per_layer=_per_layer,
        weighted=add_weighted_adapter,
        prepare=_prepare,
    )
)

__all__ = ["DEFAULT_FEEDFORWARD", "DEFAULT_TARGETS", "IA3Config", "IA3Layer", "is_feedforward"]
