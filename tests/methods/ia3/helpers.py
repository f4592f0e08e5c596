"""Tiny models and helpers shared by the (IA)³ tests.

The base models are the compatibility suite's (fixed seeds: two ``build(name)`` calls give the
same weights, one copy per library). Adapters get random vectors (``init_ia3_weights=False``,
drawn from the global generator in the same order by both libraries) so that none is the identity.
"""

from __future__ import annotations

import warnings
from typing import Any

import peft
import torch
from torch import nn

import peftkit
from tests.compat._helpers import build, inputs, read_config, run, saved_tensors  # noqa: F401

LIBS = {"peft": peft, "peftkit": peftkit}
# name -> (target_modules, feedforward_modules); None: the model type's defaults
TARGETS: dict[str, tuple[list[str] | None, list[str] | None]] = {
    "llama": (["q_proj", "v_proj", "o_proj", "down_proj"], ["down_proj", "o_proj"]),
    "gpt2": (["c_attn", "attn.c_proj", "mlp.c_proj", "c_fc"], ["mlp.c_proj"]),  # transformers Conv1D
    "bert": (["query", "value", "attention.output.dense", "output.dense"], ["output.dense"]),
    "t5": (None, None),  # defaults: k, v, wo (feed-forward)
    "custom": (["conv", "conv_s", "lin"], ["conv_s"]),  # nn.Conv2d both ways, strided bias-free conv
}
TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM", "custom": None}
NAMES = list(TARGETS)


def ia3_config(lib: Any, name: str, **overrides: Any) -> Any:
    targets, ff = TARGETS[name]
    kwargs: dict[str, Any] = {"init_ia3_weights": False, "task_type": TASKS[name]}
    if targets is not None:
        kwargs["target_modules"] = list(targets)
    if ff is not None:
        kwargs["feedforward_modules"] = list(ff)
    kwargs.update(overrides)
    return lib.IA3Config(**kwargs)


def make(lib_name: str, name: str, seed: int = 1, **overrides: Any) -> Any:
    """An (IA)³ PeftModel of library ``lib_name`` on a fresh base ``name`` (random vectors), eval mode."""
    lib = LIBS[lib_name]
    base = build(name)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.get_peft_model(base, ia3_config(lib, name, **overrides))
    return model.eval()


def add(model: Any, lib_name: str, name: str, adapter: str, seed: int = 2, **overrides: Any) -> None:
    """Add a second adapter with random vectors (same draws in both libraries for the same seed)."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter(adapter, ia3_config(LIBS[lib_name], name, **overrides))
    model.eval()


def load(lib_name: str, name: str, path: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LIBS[lib_name].PeftModel.from_pretrained(build(name), str(path), **kwargs)
    return model.eval()


def save(model: Any, path: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(path), **kwargs)
    return path


def quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def ia3_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name (relative to the user's model) -> (IA)³ layer, for either library."""
    types = (peft.tuners.ia3.IA3Layer, peftkit.IA3Layer)
    return {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, types)}


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every base-model tensor (adapter tensors left out), cloned, keyed without ``base_layer.``."""
    return {
        k.replace("base_layer.", ""): v.detach().clone()
        for k, v in model.get_base_model().state_dict().items()
        if "ia3_" not in k and "modules_to_save" not in k
    }
