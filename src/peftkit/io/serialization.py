"""Adapter weight files: safetensors (default) and the legacy ``adapter_model.bin``.

Writes are atomic: a file is written beside its target and renamed into place, so a crash
never leaves a half-written adapter behind.
"""

from __future__ import annotations

import os
import tempfile

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
