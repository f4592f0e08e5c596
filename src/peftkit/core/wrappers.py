"""``ModulesToSaveWrapper``: a module trained in full, one copy per adapter."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .context import BASE_ADAPTER, current_adapter_names, group_rows


class ModulesToSaveWrapper(nn.Module):
    """Keeps the frozen ``original_module`` and a trainable copy per adapter in ``modules_to_save``."""

    def __init__(self, module_to_save: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self._disable_adapters = False
        self.update(adapter_name)
        self.set_adapter(adapter_name)

    @property
    def active_adapter(self) -> str | None:
        return self.active_adapters[0] if self.active_adapters else None

    @property
    def adapters(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def update(self, adapter_name: str) -> None:
        """Add a copy of the original module for this adapter."""
        if adapter_name not in self.modules_to_save:
            self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        self.original_module.requires_grad_(False)

    def set_adapter(self, adapter_names: str | Sequence[str], inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        present = [n for n in names if n in self.modules_to_save]
        if len(present) > 1:
            raise ValueError(
                f"Adapters {present} each have their own copy of a module in modules_to_save; only one can be active."
            )
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name in present and not inference_mode)
        self.active_adapters = present

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        names = current_adapter_names()
        if names is not None and not self._disable_adapters and isinstance(x, torch.Tensor):
            return self._mixed_forward(x, names, *args, **kwargs)
        if self._disable_adapters or not self.active_adapters:
            return self.original_module(x, *args, **kwargs)
        return self.modules_to_save[self.active_adapters[0]](x, *args, **kwargs)

    def _mixed_forward(self, x: torch.Tensor, names: Sequence[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each sample goes through its adapter's copy (or the original module)."""
        if len(names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(names)} entries for a batch of {x.shape[0]}.")
        outs: list[torch.Tensor | None] = [None] * len(names)
        for name, rows in group_rows(names).items():
            module = self.modules_to_save[name] if name in self.modules_to_save and name != BASE_ADAPTER else self.original_module
            res = module(x[rows], *args, **kwargs)
            for j, i in enumerate(rows):
                outs[i] = res[j]
        return torch.stack(outs)  # type: ignore[arg-type]

    def unwrapped(self, merged: bool) -> nn.Module:
        """The module to put back: the active trained copy when merging, else the original."""
        if merged and self.active_adapters:
            return self.modules_to_save[self.active_adapters[0]]
        return self.original_module

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.original_module, name)
