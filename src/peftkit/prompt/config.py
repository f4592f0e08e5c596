"""Configs of the prompt-learning methods: the fields PEFT writes, so files round-trip between the libraries."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

from ..config import PeftConfig
from ..types import PeftType


class PromptTuningInit(str, enum.Enum):
    """How prompt tuning's virtual token embeddings start."""

    TEXT = "TEXT"  # the embeddings of a text's tokens (repeated or cut to length)
    SAMPLE_VOCAB = "SAMPLE_VOCAB"  # the embeddings of random vocabulary tokens
    RANDOM = "RANDOM"  # a fresh nn.Embedding's normal init


class PromptEncoderReparameterizationType(str, enum.Enum):
    """P-tuning's encoder over the virtual token embeddings."""

    MLP = "MLP"
    LSTM = "LSTM"


def _value(v: object) -> object:
    return v.value if isinstance(v, enum.Enum) else v


@dataclass
class PromptLearningConfig(PeftConfig):
    """What every prompt-learning method shares.

    Attributes:
        num_virtual_tokens: virtual tokens put in front of each input (required, positive).
        token_dim: the model's embedding size (filled from the model's config).
        num_transformer_submodules: 1, or 2 for an encoder-decoder model (filled).
        num_attention_heads: the model's attention heads (filled).
        num_layers: the model's layers (filled).
        modules_to_save: extra modules trained in full and saved with the adapter.
    """

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    is_prompt_learning: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        n = self.num_virtual_tokens
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n <= 0):
            raise ValueError(f"{name}.num_virtual_tokens must be a positive integer, got {n!r}.")
        for attr in ("token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers"):
            v = getattr(self, attr)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise ValueError(f"{name}.{attr} must be a positive integer (or None: taken from the model), got {v!r}.")


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: ``num_virtual_tokens`` learned embeddings in front of the input's embeddings.

    Attributes:
        prompt_tuning_init: "RANDOM", "SAMPLE_VOCAB" (embeddings of random vocabulary tokens) or
            "TEXT" (the embeddings of ``prompt_tuning_init_text``'s tokens, repeated to length).
        prompt_tuning_init_text: the text for "TEXT".
        tokenizer_name_or_path: the tokenizer for "TEXT" (a local folder or Hub id).
        tokenizer_kwargs: extra arguments for ``AutoTokenizer.from_pretrained`` ("TEXT" only).
    """

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.PROMPT_TUNING
        self.prompt_tuning_init = _value(self.prompt_tuning_init)
        super().__post_init__()
        choices = [c.value for c in PromptTuningInit]
        if self.prompt_tuning_init not in choices:
            raise ValueError(f"PromptTuningConfig.prompt_tuning_init must be one of {choices}, "
                             f"got {self.prompt_tuning_init!r}.")
        if self.prompt_tuning_init == "TEXT":
            if not self.tokenizer_name_or_path:
                raise ValueError("prompt_tuning_init='TEXT' needs tokenizer_name_or_path (the tokenizer that turns "
                                 "prompt_tuning_init_text into token ids).")
            if not self.prompt_tuning_init_text:
                raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text.")
        elif self.tokenizer_kwargs:
            raise ValueError("tokenizer_kwargs only applies with prompt_tuning_init='TEXT'.")


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning: the virtual token embeddings pass through a small encoder (MLP or LSTM + MLP).

    Only the encoder's *output* is saved (``prompt_embeddings``): a loaded adapter is a plain
    table of prompt embeddings and needs no encoder.

    Attributes:
        encoder_reparameterization_type: "MLP" (three linear layers with ReLU) or "LSTM"
            (a bidirectional LSTM, then two linear layers).
        encoder_hidden_size: the encoder's hidden size (None: token_dim).
        encoder_num_layers: LSTM layers (the MLP always has three linear layers).
        encoder_dropout: dropout between LSTM layers.
    """

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        self.peft_type = PeftType.P_TUNING
        self.encoder_reparameterization_type = _value(self.encoder_reparameterization_type)
        super().__post_init__()
        choices = [c.value for c in PromptEncoderReparameterizationType]
        if self.encoder_reparameterization_type not in choices:
            raise ValueError(f"PromptEncoderConfig.encoder_reparameterization_type must be one of {choices}, "
                             f"got {self.encoder_reparameterization_type!r}.")
        if not 0.0 <= self.encoder_dropout <= 1.0:
            raise ValueError(f"PromptEncoderConfig.encoder_dropout is a probability, got {self.encoder_dropout!r}.")


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: learned key/value prefixes for every attention layer, fed through the model's cache.

    For a grouped-query model ``token_dim`` and ``num_attention_heads`` become the key/value
    sizes (``head_dim · num_key_value_heads`` and ``num_key_value_heads``), as PEFT records them.
    The file stores the (num_virtual_tokens, num_layers · 2 · token_dim) prefix itself.

    Attributes:
        encoder_hidden_size: the projection's hidden size (None: token_dim).
        prefix_projection: learn a (num_virtual_tokens, token_dim) table and project it with a
            two-layer MLP (tanh) to the prefixes, instead of learning the prefixes directly.
        init_weights: None (random) or "zero" (the prefixes, or the projection's last layer, start at 0).
    """

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.PREFIX_TUNING
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"PrefixTuningConfig.init_weights must be None or 'zero', got {self.init_weights!r}.")
