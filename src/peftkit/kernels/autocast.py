"""Fused kernels under ``torch.autocast``: inputs cast as autocast casts a matmul's, then run with autocast off.

In-place ops (``addmm_``, ``baddbmm_``) take no part in autocast, so a kernel that writes an
adapter's product into the base output would mix autocast's dtype (the base GEMM's output) with
the parameters' own (float32). Casting every input the way autocast casts a matmul's inputs
first gives the numbers the unfused ops give under autocast, in one dtype throughout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs matmuls in on this device type now, or None when it is off."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except TypeError:  # torch < 2.4: no device_type argument
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def _castable(t: Any) -> bool:
    """What autocast casts: floating tensors other than float64."""
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64


def autocast_apply(fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """``fn(*args)``; under autocast (for the first argument's device), its tensors cast to autocast's dtype
    and autocast off inside ``fn``. The casts are ordinary ops, so gradients reach the float32 parameters."""
    device_type = args[0].device.type
    dtype = autocast_dtype(device_type)
    if dtype is None:
        return fn(*args)
    cast = [a.to(dtype) if _castable(a) else a for a in args]
    with torch.autocast(device_type, enabled=False):
        return fn(*cast)
