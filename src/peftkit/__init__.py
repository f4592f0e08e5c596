"""peftkit: parameter-efficient fine-tuning with PEFT's API and adapter files.

``import peftkit`` where you wrote ``import peft``; adapters move both ways.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from .config import PeftConfig
from .core.layer import AdapterLayer
from .core.tuner import AdapterModel
from .core.wrappers import ModulesToSaveWrapper
from .io.serialization import load_peft_weights
from .mapping import (
    get_base_model_state_dict,
    get_peft_config,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from .methods.lokr import LoKrConfig, LoKrLayer
from .methods.loha import LoHaConfig, LoHaLayer
from .methods.ia3 import IA3Config, IA3Layer
from .methods.lora import LoraConfig, LoraLayer
from .methods.shira import ShiraConfig, ShiraLayer
from .methods.oft import OFTConfig, OFTLayer
from .methods.boft import BOFTConfig, BOFTLayer
from .methods.xlora import XLoraConfig, XLoraModel
from .prompt import (
    AdaptionPromptConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptLearningConfig,
    PromptTuningConfig,
    PromptTuningInit,
)
from .peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from .types import NoMatchingPeftModuleError, PeftError, PeftType, PeftWarning, TaskType
from .utils.status import cast_mixed_precision_params, get_layer_status, get_model_status
from .utils.training import prepare_model_for_kbit_training

LoraModel = AdapterModel  # PEFT's names for the per-method engines
ShiraModel = AdapterModel
IA3Model = AdapterModel
LoKrModel = AdapterModel
LoHaModel = AdapterModel
OFTModel = AdapterModel
BOFTModel = AdapterModel
AdaptionPromptModel = AdapterModel

# PEFT's lookup tables (built from the method registry, now that every method is imported)
from .mapping import (  # noqa: E402
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from . import tuners  # noqa: E402, F401  (PEFT's import paths: peftkit.tuners.lora.LoraLayer, ...)

__all__ = [
    "AdaptionPromptModel",
    "BOFTModel",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "NoMatchingPeftModuleError",
    "OFTModel",
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
    "PeftError",
    "get_base_model_state_dict",
    "get_peft_config",
    "set_base_model_state_dict",
    "load_peft_weights",
    "cast_mixed_precision_params",
    "get_layer_status",
    "get_model_status",
    "PeftWarning",
    "prepare_model_for_kbit_training",
    "AdapterLayer",
    "AdaptionPromptConfig",
    "BOFTConfig",
    "BOFTLayer",
    "AdapterModel",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "LoKrConfig",
    "LoKrLayer",
    "LoKrModel",
    "LoHaConfig",
    "LoHaLayer",
    "LoHaModel",
    "LoraConfig",
    "LoraLayer",
    "OFTConfig",
    "OFTLayer",
    "LoraModel",
    "ModulesToSaveWrapper",
    "PeftConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "TaskType",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "prepare_model_for_kbit_training",
    "set_peft_model_state_dict",
    "ShiraConfig",
    "ShiraLayer",
    "ShiraModel",
    "IA3Config",
    "IA3Layer",
    "IA3Model",
    "XLoraConfig",
    "XLoraModel",
]
