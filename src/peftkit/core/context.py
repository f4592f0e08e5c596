"""Per-call options that reach the adapter layers for the duration of one forward.

The model-level engine takes ``adapter_names`` out of the call's keyword arguments and
sets it here; layers read it. One context variable, not a hook registered on every layer.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

_ADAPTER_NAMES: contextvars.ContextVar[Sequence[str] | None] = contextvars.ContextVar(
    "peftkit_adapter_names", default=None
)

BASE_ADAPTER = "__base__"  # in ``adapter_names``: this sample runs the base model alone


def group_rows(names: Sequence[str]) -> dict[str, list[int]]:
    """Adapter name -> the batch rows that use it, in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).append(i)
    return groups


def current_adapter_names() -> Sequence[str] | None:
    return _ADAPTER_NAMES.get()


@contextlib.contextmanager
def forward_options(adapter_names: Sequence[str] | None) -> Iterator[None]:
    token = _ADAPTER_NAMES.set(list(adapter_names) if adapter_names is not None else None)
    try:
        yield
    finally:
        _ADAPTER_NAMES.reset(token)
