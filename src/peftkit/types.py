"""String enums shared with the HF PEFT file format.

The values are written to ``adapter_config.json`` and must stay identical to PEFT's.
"""

from __future__ import annotations

import enum


class PeftType(str, enum.Enum):
    """The adapter method a config describes (``peft_type`` in ``adapter_config.json``)."""

    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    LORA = "LORA"
    BOFT = "BOFT"
    ADAPTION_PROMPT = "ADAPTION_PROMPT"
    IA3 = "IA3"
    LOHA = "LOHA"
    LOKR = "LOKR"
    OFT = "OFT"
    XLORA = "XLORA"
    SHIRA = "SHIRA"

    def __str__(self) -> str:
        return self.value


class TaskType(str, enum.Enum):
    """The task head a model wrapper serves (``task_type`` in ``adapter_config.json``)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value


class PeftWarning(UserWarning):
    """The category of peftkit's warnings (PEFT's name): ``warnings.filterwarnings(..., category=PeftWarning)``."""


class PeftError(Exception):
    """The base class of peftkit's own errors (PEFT's ``PeftError``)."""


class NoMatchingPeftModuleError(PeftError, ValueError):
    """A config selected no module of the model (``target_modules`` matched nothing).

    A ``ValueError`` too, so code written against either class catches it.
    """
