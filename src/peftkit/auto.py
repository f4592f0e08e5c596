"""``AutoPeftModel*``: load the base model named in an adapter's config, then the adapter."""

from __future__ import annotations

import importlib
import os
from typing import Any

from .config import PeftConfig
from .peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)


class _AutoPeftModel:
    _auto_class: str | None = None  # the transformers Auto class that loads the base model
    _peft_class: type[PeftModel] = PeftModel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(f"Use {type(self).__name__}.from_pretrained(adapter_path) to build one.")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        revision: str | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Load the base model from the adapter config's ``base_model_name_or_path``, then the adapter.

        Args:
            pretrained_model_name_or_path: the adapter folder or Hub id.
            adapter_name: the name to give the adapter.
            is_trainable: keep the adapter trainable.
            config: an adapter config to use instead of the folder's.
            revision: the adapter's Hub revision.
            **kwargs: passed to the base model's ``from_pretrained`` (``torch_dtype``, ``gguf_file``...).
        """
        peft_config = config or PeftConfig.from_pretrained(pretrained_model_name_or_path, revision=revision)
        base_path = peft_config.base_model_name_or_path
        if not base_path:
            raise ValueError(
                "The adapter config has no base_model_name_or_path: load the base model yourself and use "
                "PeftModel.from_pretrained(base_model, adapter_path)."
            )
        transformers = importlib.import_module("transformers")
        if cls._auto_class is not None:
            loader = getattr(transformers, cls._auto_class)
        elif peft_config.auto_mapping:
            mapping = peft_config.auto_mapping
            loader = getattr(importlib.import_module(mapping["parent_library"]), mapping["base_model_class"])
        else:
            loader = getattr(transformers, _TASK_TO_AUTO.get(peft_config.task_type, "AutoModel"))
        base = loader.from_pretrained(base_path, revision=peft_config.revision, **kwargs)
        return cls._peft_class.from_pretrained(
            base, pretrained_model_name_or_path, adapter_name, is_trainable, config=peft_config, revision=revision
        )


_TASK_TO_AUTO = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


class AutoPeftModel(_AutoPeftModel):
    """Picks the base model class from the adapter's task_type (or its auto_mapping)."""


class AutoPeftModelForCausalLM(_AutoPeftModel):
    _auto_class = "AutoModelForCausalLM"
    _peft_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(_AutoPeftModel):
    _auto_class = "AutoModelForSeq2SeqLM"
    _peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(_AutoPeftModel):
    _auto_class = "AutoModelForSequenceClassification"
    _peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(_AutoPeftModel):
    _auto_class = "AutoModelForTokenClassification"
    _peft_class = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(_AutoPeftModel):
    _auto_class = "AutoModelForQuestionAnswering"
    _peft_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(_AutoPeftModel):
    _auto_class = "AutoModel"
    _peft_class = PeftModelForFeatureExtraction
