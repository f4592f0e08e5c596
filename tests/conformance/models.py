"""Tiny models, one per base-layer kind, and adapter configs for the conformance matrix.

Each base case names its target module and makes an input. Each method case makes a config
that is *not* the identity (random init), so a test can tell adapter from base.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit


class LinearNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.lin1 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.act(self.lin0(x)))


class Conv1DNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_attn = Conv1D(16, 8)  # (in=8) -> (out=16), weight stored (8, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.c_attn(x)))


class EmbeddingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x))


class Conv2dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))


@dataclass(frozen=True)
class BaseCase:
    name: str
    build: Callable[[], nn.Module]
    target: str
    make_input: Callable[[int], torch.Tensor]


BASES = [
    BaseCase("linear", LinearNet, "lin0", lambda b: torch.randn(b, 5, 8)),
    BaseCase("conv1d", Conv1DNet, "c_attn", lambda b: torch.randn(b, 5, 8)),
    BaseCase("embedding", EmbeddingNet, "emb", lambda b: torch.randint(0, 20, (b, 5))),
    BaseCase("conv2d", Conv2dNet, "conv", lambda b: torch.randn(b, 3, 5, 5)),
]


@dataclass(frozen=True)
class MethodCase:
    name: str
    config: Callable[..., peftkit.PeftConfig]  # (target, init) -> config
    # Several active adapters merge to what they compute unmerged (false for DoRA: each adapter's
    # norm is taken against the base weight, so stacked DoRA adapters do not compose linearly).
    stackable: bool = True
    # The base kinds (``BaseCase.name``) the method adapts; None: all of them.
    kinds: tuple[str, ...] | None = None

    def supports(self, base: BaseCase) -> bool:
        return self.kinds is None or base.name in self.kinds


def _lora(target: str, init: bool = False, **kw) -> peftkit.PeftConfig:
    return peftkit.LoraConfig(r=2, lora_alpha=4, target_modules=[target], init_lora_weights=init, **kw)


def _dora(target: str, init: bool = False) -> peftkit.PeftConfig:
    return _lora(target, init, use_dora=True)


def _shira(target: str, init: bool = False) -> peftkit.PeftConfig:
    # random_seed=None: the mask follows torch.manual_seed, so a second adapter gets its own mask
    return peftkit.ShiraConfig(r=2, target_modules=[target], init_weights=init)


def _ia3(target: str, init: bool = False) -> peftkit.PeftConfig:
    return peftkit.IA3Config(target_modules=[target], feedforward_modules=[], init_ia3_weights=init)


def _ia3_ff(target: str, init: bool = False) -> peftkit.PeftConfig:  # scales the target's input
    return peftkit.IA3Config(target_modules=[target], feedforward_modules=[target], init_ia3_weights=init)


def _lokr(target: str, init: bool = False) -> peftkit.PeftConfig:
    # r=1: low-rank W1 (decompose_both) and W2, CP core on the 3×3 conv
    return peftkit.LoKrConfig(r=1, alpha=2, target_modules=[target], init_weights=init, decompose_both=True,
                              use_effective_conv2d=True)


def _lokr_full(target: str, init: bool = False) -> peftkit.PeftConfig:
    return peftkit.LoKrConfig(r=8, alpha=4, target_modules=[target], init_weights=init)  # full W1 and W2


def _loha(target: str, init: bool = False) -> peftkit.PeftConfig:
    # CP cores (hada_t1/t2) on the 3×3 conv
    return peftkit.LoHaConfig(r=2, alpha=3, target_modules=[target], init_weights=init, use_effective_conv2d=True)


def _loha_flat(target: str, init: bool = False) -> peftkit.PeftConfig:
    return peftkit.LoHaConfig(r=3, alpha=2, target_modules=[target], init_weights=init)  # flattened factors


def _oft(target: str, init: bool = False) -> peftkit.PeftConfig:
    # blocks of 4 on the 8 input features of lin0 / c_attn, of 3 on the conv's 27; Neumann series (the default)
    return peftkit.OFTConfig(r=0, oft_block_size=3 if target == "conv" else 4, target_modules=[target],
                             init_weights=init)


def _oft_exact(target: str, init: bool = False) -> peftkit.PeftConfig:
    # r (block count) given instead of the block size; exact Cayley transform; one shared block
    return peftkit.OFTConfig(r=9 if target == "conv" else 2, oft_block_size=0, target_modules=[target],
                             init_weights=init, use_cayley_neumann=False, block_share=True)


def _boft(target: str, init: bool = False) -> peftkit.PeftConfig:
    return peftkit.BOFTConfig(boft_block_size=3 if target == "conv" else 4, target_modules=[target],
                              init_weights=init)


def _boft_butterfly(target: str, init: bool = False) -> peftkit.PeftConfig:
    # two butterfly factors (4 blocks of 2) on the 8 input features of lin0 / c_attn; the conv's 27
    # features (odd) admit no butterfly, so it gets 3 blocks of 9 and one factor
    if target == "conv":
        return peftkit.BOFTConfig(boft_block_size=0, boft_block_num=3, target_modules=[target], init_weights=init)
    return peftkit.BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=2, target_modules=[target], init_weights=init)


METHODS = [
    MethodCase("lora", _lora),
    MethodCase("dora", _dora, stackable=False),
    MethodCase("shira", _shira, kinds=("linear", "conv1d")),  # nn.Linear and transformers Conv1D only
    MethodCase("lokr", _lokr, kinds=("linear", "conv1d", "conv2d")),  # no Embedding (as PEFT)
    MethodCase("lokr_full", _lokr_full, kinds=("linear", "conv1d", "conv2d")),
    MethodCase("loha", _loha, kinds=("linear", "conv1d", "conv2d")),  # no Embedding (as PEFT)
    MethodCase("loha_flat", _loha_flat, kinds=("linear", "conv1d", "conv2d")),
    MethodCase("ia3", _ia3, kinds=("linear", "conv1d", "conv2d")),  # no nn.Embedding (as PEFT)
    MethodCase("ia3_ff", _ia3_ff, kinds=("linear", "conv1d", "conv2d")),
    MethodCase("oft", _oft),  # an embedding's output is rotated (PEFT's oft_embedding_R)
    MethodCase("oft_exact_shared", _oft_exact),
    MethodCase("boft", _boft, kinds=("linear", "conv1d", "conv2d")),  # no Embedding (as PEFT)
    MethodCase("boft_butterfly", _boft_butterfly, kinds=("linear", "conv1d", "conv2d")),
]


def fresh(base: BaseCase, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return base.build().eval()
