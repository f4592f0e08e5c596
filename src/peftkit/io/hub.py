"""Resolve a file of an adapter from a local folder or a Hugging Face Hub id.

Local folders need nothing else. Hub ids go through ``huggingface_hub`` (imported lazily),
which serves its local cache when ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import os
from typing import Any


def resolve_file(
    name_or_path: str | os.PathLike,
    filename: str,
    subfolder: str | None = None,
    *,
    missing_ok: bool = False,
    **hub_kwargs: Any,
) -> str | None:
    """Return a local path for ``filename`` of an adapter.

    Args:
        name_or_path: a local folder or a Hub repository id.
        filename: the file inside it (``adapter_config.json``, ...).
        subfolder: a sub-folder inside the folder or repository.
        missing_ok: return None instead of raising when the file is not there.
        **hub_kwargs: passed to ``huggingface_hub.hf_hub_download`` (revision, token, cache_dir...).
    """
    folder = os.fspath(name_or_path)
    local = os.path.join(folder, subfolder, filename) if subfolder else os.path.join(folder, filename)
    if os.path.isfile(local):
        return local
    if os.path.isdir(folder):
        if missing_ok:
            return None
        raise FileNotFoundError(f"No {filename} in {os.path.dirname(local)}: is this a folder that save_pretrained wrote?")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a dependency
        raise FileNotFoundError(f"{folder!r} is not a local folder and huggingface_hub is not installed.") from exc
    allowed = {"revision", "token", "cache_dir", "force_download", "local_files_only", "repo_type"}
    kwargs = {k: v for k, v in hub_kwargs.items() if k in allowed and v is not None}
    try:
        return hf_hub_download(folder, filename, subfolder=subfolder, **kwargs)
    except Exception as exc:
        if missing_ok:
            return None
        raise FileNotFoundError(
            f"Could not find {filename} for {folder!r}: it is not a local folder, and the Hub "
            f"(or its offline cache) does not have it ({type(exc).__name__}: {exc})."
        ) from exc
