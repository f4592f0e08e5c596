"""Utilities under PEFT's ``peft.utils`` names."""

from ..config import CONFIG_NAME
from ..core.wrappers import ModulesToSaveWrapper
from ..io.serialization import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, load_peft_weights
from ..mapping import (
    get_base_model_state_dict,
    get_peft_model_state_dict,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from ..types import PeftType, TaskType
from .status import cast_mixed_precision_params
from .training import prepare_model_for_kbit_training

__all__ = [
    "CONFIG_NAME",
    "ModulesToSaveWrapper",
    "PeftType",
    "SAFETENSORS_WEIGHTS_NAME",
    "TaskType",
    "WEIGHTS_NAME",
    "cast_mixed_precision_params",
    "get_base_model_state_dict",
    "get_peft_model_state_dict",
    "load_peft_weights",
    "prepare_model_for_kbit_training",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
]
