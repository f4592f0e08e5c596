"""Utilities under PEFT's ``peft.utils`` names."""

from ..io.serialization import load_peft_weights
from ..mapping import get_peft_model_state_dict, set_peft_model_state_dict
from ..types import PeftType, TaskType
from .training import prepare_model_for_kbit_training

__all__ = [
    "PeftType",
    "TaskType",
    "get_peft_model_state_dict",
    "load_peft_weights",
    "prepare_model_for_kbit_training",
    "set_peft_model_state_dict",
]
