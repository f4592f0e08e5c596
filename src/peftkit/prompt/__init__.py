"""Prompt learning: methods that adapt a frozen model through virtual tokens in its input."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..registry import MethodSpec, register_method
from ..types import PeftType
from .config import (
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptLearningConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    PromptTuningInit,
)
from .adaption_prompt import AdaptedAttention, AdaptionPromptConfig
from .encoders import PrefixEncoder, PromptEncoder, PromptTable, initial_table
from .engine import PromptModel


def _table(config: Any, total: int, width: int, mode: str) -> PromptTable:
    """A plain table: on meta to be loaded ("load"), or a fresh nn.Embedding's random rows ("table")."""
    if mode == "load":
        return PromptTable(torch.empty(total, width, device="meta"))
    return PromptTable(nn.Embedding(total, width).weight.detach())


def _prompt_tuning(config: PromptTuningConfig, emb: nn.Module, total: int, mode: str) -> nn.Module:
    if mode != "train":  # inference: PEFT does not initialise from the vocabulary either
        return _table(config, total, config.token_dim, mode)
    return PromptTable(initial_table(config, emb, total, config.token_dim))


def _p_tuning(config: PromptEncoderConfig, emb: nn.Module, total: int, mode: str) -> nn.Module:
    if mode != "train":  # a file holds the encoder's output: the encoder itself is not needed
        return _table(config, total, config.token_dim, mode)
    return PromptEncoder(total, config.token_dim, config)


def _prefix_tuning(config: PrefixTuningConfig, emb: nn.Module, total: int, mode: str) -> nn.Module:
    if mode != "train":  # a file holds the prefixes themselves (after any projection)
        return _table(config, total, config.num_layers * 2 * config.token_dim, mode)
    return PrefixEncoder(config)


register_method(MethodSpec(peft_type=PeftType.PREFIX_TUNING, config=PrefixTuningConfig, prompt=_prefix_tuning,
                              engine=PromptModel))
register_method(MethodSpec(peft_type=PeftType.PROMPT_TUNING, config=PromptTuningConfig, prompt=_prompt_tuning,
                              engine=PromptModel))
register_method(MethodSpec(peft_type=PeftType.P_TUNING, config=PromptEncoderConfig, prompt=_p_tuning,
                              engine=PromptModel))

__all__ = [
    "AdaptedAttention",
    "AdaptionPromptConfig",
    "PrefixEncoder",
    "PrefixTuningConfig",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptModel",
    "PromptTable",
    "PromptTuningConfig",
    "PromptTuningInit",
]
