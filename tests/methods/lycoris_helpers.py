"""Tiny models and helpers shared by the LoKr and LoHa tests (the LyCORIS methods).

``Net`` has every base kind PEFT's LoKr and LoHa adapt (Linear, Conv2d with a kernel, a pointwise
Conv2d, Conv1d); built under a fixed seed, so two calls give the same weights, one copy per
library. Adapters use ``init_weights=False`` (random) unless a test says otherwise; with the
same seed both libraries draw the same adapter tensors.
"""

from __future__ import annotations

import warnings
from typing import Any

import peft
import torch
from torch import nn

import peftkit
from tests.compat._helpers import build, inputs, perturb_trainable, read_config, run, saved_shapes, saved_tensors  # noqa: F401

LIBS = {"peft": peft, "peftkit": peftkit}
DIRECTIONS = [("peft", "peftkit"), ("peftkit", "peft")]
DIRECTION_IDS = ["peft_to_peftkit", "peftkit_to_peft"]
HF_TARGETS = {
    "llama": ["q_proj", "v_proj", "o_proj", "down_proj"],
    "bert": ["query", "value", "dense"],
}
HF_TASKS = {"llama": "CAUSAL_LM", "bert": "SEQ_CLS"}
NET_TARGETS = ["lin", "conv", "pw", "conv1"]


class Net(nn.Module):
    """Linear, Conv2d 3×3 (strided), Conv2d 1×1 and Conv1d, outputs concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 20)
        self.conv = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.pw = nn.Conv2d(6, 8, 1)
        self.conv1 = nn.Conv1d(6, 10, 3, padding=1)

    def forward(self, x: torch.Tensor, img: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        parts = [self.lin(x), self.conv(img), self.pw(img), self.conv1(seq)]
        return torch.cat([p.flatten(1) for p in parts], 1)


def net_inputs(batch: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return {
        "x": torch.randn(batch, 12, generator=g),
        "img": torch.randn(batch, 6, 5, 5, generator=g),
        "seq": torch.randn(batch, 6, 7, generator=g),
    }


def make_net(config: str, defaults: dict[str, Any], lib_name: str, seed: int = 1, targets: list[str] | None = None,
             **overrides: Any) -> Any:
    """A PeftModel (config class ``config``, ``defaults`` before ``overrides``) on a fresh ``Net`` (eval mode)."""
    lib = LIBS[lib_name]
    torch.manual_seed(0)
    base = Net().eval()
    kwargs: dict[str, Any] = {**defaults, "target_modules": targets or list(NET_TARGETS), "init_weights": False}
    kwargs.update(overrides)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.get_peft_model(base, getattr(lib, config)(**kwargs))
    return model.eval()


def make_hf(config: str, lib_name: str, name: str, seed: int = 1, **overrides: Any) -> Any:
    """A PeftModel (config class ``config``) of library ``lib_name`` on the compat suite's tiny ``name`` model."""
    lib = LIBS[lib_name]
    kwargs: dict[str, Any] = {
        "r": 2, "alpha": 4, "target_modules": list(HF_TARGETS[name]), "init_weights": False, "task_type": HF_TASKS[name],
    }
    kwargs.update(overrides)
    base = build(name)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.get_peft_model(base, getattr(lib, config)(**kwargs))
    return model.eval()


def load(lib_name: str, base: nn.Module, path: Any, **kwargs: Any) -> Any:
    lib = LIBS[lib_name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.PeftModel.from_pretrained(base, str(path), **kwargs)
    return model.eval()


def save(model: Any, path: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(path))
    return path


def fresh_net() -> nn.Module:
    torch.manual_seed(0)
    return Net().eval()


def adapter_state(prefix: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors (names containing ``.<prefix>``) of a PeftModel's in-memory state dict."""
    return {k: v.detach() for k, v in model.state_dict().items() if f".{prefix}" in k}
