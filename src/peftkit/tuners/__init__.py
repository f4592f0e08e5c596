"""PEFT's import paths for the methods peftkit has: ``peftkit.tuners.lora.LoraLayer`` and the like.

Code written against PEFT imports layer and model classes from ``peft.tuners.<method>`` (to find
adapted layers with ``isinstance``, for instance) and the base classes from
``peft.tuners.tuners_utils``. peftkit's code lives elsewhere (``methods/``, ``prompt/``,
``core/``); the modules here only name it, so they are made in place rather than as files:
``peftkit.tuners.<method>`` is registered in ``sys.modules`` when this package is imported.
Only names that behave as PEFT's do are here: configs, enums, layer classes (for ``isinstance``)
and model classes; PEFT's prompt encoder modules are left out (peftkit's take other arguments).
"""

from __future__ import annotations

import sys
import types
from typing import Any

from ..core.layer import AdapterLayer
from ..core.targeting import is_target
from ..core.tuner import AdapterModel
from ..methods.boft import BOFTConfig, BOFTLayer
from ..methods.ia3 import IA3Config, IA3Layer
from ..methods.loha import LoHaConfig, LoHaLayer
from ..methods.lokr import LoKrConfig, LoKrLayer
from ..methods.lora import LoraConfig, LoraLayer
from ..methods.oft import OFTConfig, OFTLayer
from ..methods.shira import ShiraConfig, ShiraLayer
from ..methods.xlora import XLoraConfig, XLoraModel
from ..prompt import (
    AdaptionPromptConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptTuningConfig,
    PromptTuningInit,
)

# peftkit runs every weight-space method on one engine, so PEFT's per-method model classes are that engine
LoraModel = LoHaModel = LoKrModel = IA3Model = OFTModel = BOFTModel = ShiraModel = AdaptionPromptModel = AdapterModel

_MODULES: dict[str, dict[str, Any]] = {
    "tuners_utils": {"BaseTunerLayer": AdapterLayer, "BaseTuner": AdapterModel,
                     "check_target_module_exists": is_target},
    "lora": {"LoraConfig": LoraConfig, "LoraLayer": LoraLayer, "LoraModel": LoraModel},
    "loha": {"LoHaConfig": LoHaConfig, "LoHaLayer": LoHaLayer, "LoHaModel": LoHaModel},
    "lokr": {"LoKrConfig": LoKrConfig, "LoKrLayer": LoKrLayer, "LoKrModel": LoKrModel},
    "ia3": {"IA3Config": IA3Config, "IA3Layer": IA3Layer, "IA3Model": IA3Model},
    "oft": {"OFTConfig": OFTConfig, "OFTLayer": OFTLayer, "OFTModel": OFTModel},
    "boft": {"BOFTConfig": BOFTConfig, "BOFTLayer": BOFTLayer, "BOFTModel": BOFTModel},
    "shira": {"ShiraConfig": ShiraConfig, "ShiraLayer": ShiraLayer, "ShiraModel": ShiraModel},
    "xlora": {"XLoraConfig": XLoraConfig, "XLoraModel": XLoraModel},
    "prompt_tuning": {"PromptTuningConfig": PromptTuningConfig, "PromptTuningInit": PromptTuningInit},
    "p_tuning": {"PromptEncoderConfig": PromptEncoderConfig,
                 "PromptEncoderReparameterizationType": PromptEncoderReparameterizationType},
    "prefix_tuning": {"PrefixTuningConfig": PrefixTuningConfig},
    "adaption_prompt": {"AdaptionPromptConfig": AdaptionPromptConfig, "AdaptionPromptModel": AdaptionPromptModel},
}


def _register(name: str, members: dict[str, Any]) -> types.ModuleType:
    module = types.ModuleType(f"{__name__}.{name}", f"PEFT's ``peft.tuners.{name}`` names, from peftkit.")
    module.__dict__.update(members)
    module.__all__ = sorted(members)
    sys.modules[module.__name__] = module
    return module


for _name, _members in _MODULES.items():
    globals()[_name] = _register(_name, _members)

__all__ = sorted({*_MODULES, *(n for m in _MODULES.values() for n in m if n in globals())})
