"""Tiny models and helpers shared by the SHiRA tests.

The base models are the compatibility suite's (fixed seeds: two ``build(name)`` calls give
the same weights, one copy per library). SHiRA adapters get random values
(``init_weights=False``) so that an adapter is never the identity.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import peft
import torch
from torch import nn

import peftkit
from tests.compat._helpers import build, inputs, read_config, run, saved_tensors  # noqa: F401

LIBS = {"peft": peft, "peftkit": peftkit}
TARGETS = {
    "llama": ["q_proj", "v_proj", "o_proj", "down_proj"],
    "bert": ["query", "value", "dense"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # transformers Conv1D: peftkit only
}
TASKS = {"llama": "CAUSAL_LM", "bert": "SEQ_CLS", "gpt2": "CAUSAL_LM"}


def shira_config(lib: Any, name: str, r: int = 2, random_seed: int | None = 0, **overrides: Any) -> Any:
    kwargs: dict[str, Any] = {
        "r": r, "random_seed": random_seed, "target_modules": list(TARGETS[name]), "init_weights": False,
        "task_type": TASKS[name],
    }
    kwargs.update(overrides)
    return lib.ShiraConfig(**kwargs)


def make(lib_name: str, name: str, seed: int = 1, **overrides: Any) -> Any:
    """A SHiRA PeftModel of library ``lib_name`` on a fresh base ``name`` (random values), eval mode."""
    lib = LIBS[lib_name]
    base = build(name)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.get_peft_model(base, shira_config(lib, name, **overrides))
    return model.eval()


def add(model: Any, name: str, adapter: str, random_seed: int | None = 7, seed: int = 2, **overrides: Any) -> None:
    """Add a second peftkit SHiRA adapter with random values (and its own mask)."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter(adapter, shira_config(peftkit, name, random_seed=random_seed, **overrides))
    model.eval()


def load(lib_name: str, name: str, path: Any, **kwargs: Any) -> Any:
    lib = LIBS[lib_name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.PeftModel.from_pretrained(build(name), str(path), **kwargs)
    return model.eval()


def save(model: Any, path: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(path), **kwargs)
    return path


def shira_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name (relative to the user's model) -> SHiRA layer, for either library."""
    types = (peft.tuners.shira.ShiraLayer, peftkit.ShiraLayer)
    return {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, types)}


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every base-model tensor (adapter tensors left out), cloned, keyed without ``base_layer.``."""
    return {
        k.replace("base_layer.", ""): v.detach().clone()
        for k, v in model.get_base_model().state_dict().items()
        if "shira_" not in k and "modules_to_save" not in k
    }


def assert_equal_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"changed: {bad[:5]}"


@torch.no_grad()
def dense_reference(model: nn.Module, name: str, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
    """Output of a plain base model whose weights get ``deltas`` (layer name -> delta in the weight's layout)."""
    ref = build(name)
    for key, delta in deltas.items():
        ref.get_submodule(key).weight.add_(delta.to(ref.get_submodule(key).weight.dtype))
    return run(ref, name)


def clone_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
