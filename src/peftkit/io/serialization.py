"""Adapter weight files: safetensors (default) and the legacy ``adapter_model.bin``.

Writes are atomic: a file is written beside its target and renamed into place, so a crash
never leaves a half-written adapter behind.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any

import torch

WEIGHTS_NAME = "adapter_model.bin"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"


def _atomic(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="tmp-", suffix="-" + os.path.basename(path), dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    _atomic(path, write)


def save_state_dict(state: dict[str, torch.Tensor], folder: str, safe_serialization: bool = True) -> str:
    """Write an adapter state dict into ``folder`` and return the file's path."""
    if safe_serialization:
        from safetensors.torch import save_file

        # safetensors refuses shared or non-contiguous storage; adapters are small, so copy.
        state = {k: v.detach().contiguous() for k, v in state.items()}
        seen: dict[int, str] = {}
        for k, v in state.items():
            ptr = v.data_ptr()
            if ptr in seen and v.numel() > 0:
                state[k] = v.clone()
            seen[ptr] = k
        path = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
        _atomic(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    else:
        path = os.path.join(folder, WEIGHTS_NAME)
        _atomic(path, lambda tmp: torch.save({k: v.detach().cpu() for k, v in state.items()}, tmp))
    return path


def load_state_dict(path: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read an adapter weight file; a damaged file raises an error that names it."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device=str(device))
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"Could not read adapter weights from {path} ({type(exc).__name__}: {exc}). "
            "The file is damaged or truncated: save the adapter again or download it anew."
        ) from exc


def read_adapter_weights(
    model_id: str | os.PathLike, subfolder: str | None = None, device: str | torch.device = "cpu", **hub_kwargs: Any
) -> dict[str, torch.Tensor]:
    """The tensors of a saved adapter (safetensors, else PEFT's older ``adapter_model.bin``), from a folder or a Hub id."""
    from .hub import resolve_file

    path = resolve_file(model_id, SAFETENSORS_WEIGHTS_NAME, subfolder=subfolder, missing_ok=True, **hub_kwargs)
    if path is None:
        path = resolve_file(model_id, WEIGHTS_NAME, subfolder=subfolder, missing_ok=True, **hub_kwargs)
    if path is None:
        where = os.path.join(os.fspath(model_id), subfolder) if subfolder else os.fspath(model_id)
        raise FileNotFoundError(
            f"No {SAFETENSORS_WEIGHTS_NAME} or {WEIGHTS_NAME} in {where}: save the adapter with save_pretrained first."
        )
    return load_state_dict(path, device)


def default_device() -> str:
    """Where PEFT's ``load_peft_weights`` puts tensors by default: the accelerator if there is one."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch, "xpu", None) is not None and torch.xpu.is_available():
        return "xpu"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load_peft_weights(
    model_id: str | os.PathLike,
    device: str | torch.device | None = None,
    key_mapping: dict[str, str] | None = None,
    **hf_hub_download_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """An adapter's saved tensors, as PEFT's ``load_peft_weights``: keys as in the file (``base_model.model....``).

    Args:
        model_id: a folder written by ``save_pretrained`` or a Hub repository id.
        device: where to put the tensors; default: the accelerator if there is one, else the CPU.
        key_mapping: regular expression -> replacement, applied to each key without its
            ``base_model.model.`` (or ``base_model.``) prefix; the first pattern that matches wins.
        **hf_hub_download_kwargs: ``subfolder``, ``revision``, ``token``, ``cache_dir``, ...
    """
    hub = dict(hf_hub_download_kwargs)
    subfolder = hub.pop("subfolder", None)
    device = default_device() if device is None else device
    # safetensors cannot load straight to mps: load on the CPU, then move
    state = read_adapter_weights(model_id, subfolder, "cpu" if str(device) == "mps" else device, **hub)
    if str(device) == "mps":
        state = {k: v.to(device) for k, v in state.items()}
    return remap_keys(state, key_mapping)


def remap_keys(state: dict[str, torch.Tensor], key_mapping: dict[str, str] | None) -> dict[str, torch.Tensor]:
    """PEFT's ``key_mapping``: regular expression -> replacement on each key without its ``base_model.model.``
    (or ``base_model.``) prefix, the first pattern that matches winning; no mapping, no change."""
    if not key_mapping:
        return state
    remapped = {}
    for key, value in state.items():
        prefix = next((p for p in ("base_model.model.", "base_model.") if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"key_mapping needs PEFT's keys (base_model.model....); {key!r} has no such prefix.")
        rest = key[len(prefix):]
        for pattern, replacement in key_mapping.items():
            new, count = re.subn(pattern, replacement, rest)
            if count:
                rest = new
                break
        remapped[prefix + rest] = value
    return remapped
