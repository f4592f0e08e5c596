"""Tiny models and helpers shared by the OFT and BOFT tests.

The HF models are the compatibility suite's (fixed seeds: two ``build(name)`` calls give the same
weights, one copy per library). ``Net`` has a Linear and a Conv2d with square, symmetric
settings (PEFT's BOFT Conv2d honours only padding[0] / stride[0]). Adapters use
``init_weights=False`` (random) unless a test says otherwise.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import peft
import torch
from torch import nn

import peftkit
from tests.compat._helpers import build, inputs, read_config, run, saved_shapes, saved_tensors  # noqa: F401

LIBS = {"peft": peft, "peftkit": peftkit}
DIRECTIONS = [("peft", "peftkit"), ("peftkit", "peft")]
DIRECTION_IDS = ["peft_to_peftkit", "peftkit_to_peft"]
HF_TARGETS = {
    "llama": ["q_proj", "v_proj", "o_proj", "down_proj"],  # in 16 (q, v, o) and 32 (down)
    "bert": ["query", "value", "dense"],  # in 16 and 32 (output.dense)
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # transformers Conv1D (PEFT's OFT/BOFT refuse it)
}
HF_TASKS = {"llama": "CAUSAL_LM", "bert": "SEQ_CLS", "gpt2": "CAUSAL_LM"}


class Net(nn.Module):
    """Linear (in 8) and Conv2d (in 4·3·3 = 36 features; stride 2, padding 1), outputs concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 12)
        self.conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.lin(x).flatten(1), self.conv(img).flatten(1)], 1)


def net_inputs(batch: int = 3, seed: int = 11) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, 8, generator=g), "img": torch.randn(batch, 4, 5, 5, generator=g)}


def fresh_net() -> nn.Module:
    torch.manual_seed(0)
    return Net().eval()


def quiet_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def make(config: str, lib_name: str, model: str, seed: int = 1, **overrides: Any) -> Any:
    """A PeftModel (config class ``config``) of library ``lib_name`` on a fresh ``model``
    ("net" or a compat model name), random adapter weights, eval mode."""
    lib = LIBS[lib_name]
    if model == "net":
        base, kwargs = fresh_net(), {"target_modules": ["lin", "conv"]}
    else:
        base, kwargs = build(model), {"target_modules": list(HF_TARGETS[model]), "task_type": HF_TASKS[model]}
    kwargs["init_weights"] = False
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return quiet_call(lib.get_peft_model, base, getattr(lib, config)(**kwargs)).eval()


def base_of(model: str) -> nn.Module:
    return fresh_net() if model == "net" else build(model)


def out(model: nn.Module, name: str, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        if name == "net":
            return model(**net_inputs(), **kwargs)
        y = model(**inputs(name), **kwargs)
        return y if isinstance(y, torch.Tensor) else y.logits


def load(lib_name: str, base: nn.Module, path: Any, **kwargs: Any) -> Any:
    return quiet_call(LIBS[lib_name].PeftModel.from_pretrained, base, str(path), **kwargs).eval()


def save(model: Any, path: Any) -> Any:
    quiet_call(model.save_pretrained, str(path))
    return path


def adapter_state(prefix: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors (names containing ``.<prefix>``) of a PeftModel's in-memory state dict."""
    return {k: v.detach() for k, v in model.state_dict().items() if f".{prefix}" in k}


def merged_weights(model: Any) -> dict[str, torch.Tensor]:
    """The base model's state dict after ``merge_and_unload`` on a copy."""
    return quiet_call(copy.deepcopy(model).merge_and_unload).state_dict()


@torch.no_grad()
def perturb(model: nn.Module, prefix: str, seed: int = 3) -> None:
    """Add noise to every adapter tensor so that nothing saved is an initial value."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if prefix in name and p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


def norm(value: Any) -> Any:
    return sorted(value) if isinstance(value, list) else value
