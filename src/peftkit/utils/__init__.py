"""Utilities under PEFT's ``peft.utils`` names."""

from ..mapping import get_peft_model_state_dict, set_peft_model_state_dict
from ..types import PeftType, TaskType

__all__ = ["PeftType", "TaskType", "get_peft_model_state_dict", "set_peft_model_state_dict"]
