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

# Work shared by the layers within one model call (e.g. every layer's rotation blocks in one batch):
# {"owner": the model-level engine, ...}; None outside a call of the engine.
_MEMO: contextvars.ContextVar[dict | None] = contextvars.ContextVar("peftkit_forward_memo", default=None)

BASE_ADAPTER = "__base__"  # in ``adapter_names``: this sample runs the base model alone


def group_rows(names: Sequence[str]) -> dict[str, list[int]]:
    """Adapter name -> the batch rows that use it, in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).append(i)
    return groups


def current_adapter_names() -> Sequence[str] | None:
    return _ADAPTER_NAMES.get()


def forward_memo() -> dict | None:
    """The current call's shared-work dict (``"owner"``: the engine running it), or None."""
    return _MEMO.get()


@contextlib.contextmanager
def forward_options(adapter_names: Sequence[str] | None, owner: object = None) -> Iterator[None]:
    token = _ADAPTER_NAMES.set(list(adapter_names) if adapter_names is not None else None)
    memo = _MEMO.set({"owner": owner} if owner is not None else None)
    try:
        yield
    finally:
        _MEMO.reset(memo)
        _ADAPTER_NAMES.reset(token)
