"""Per-call options that reach the adapter layers for the duration of one forward.

The model-level engine takes ``adapter_names`` out of the call's keyword arguments and
sets it here; layers read it. One context variable, not a hook registered on every layer.
``torch.compile`` cannot trace a context variable's ``get`` (every layer would break the graph),
so compiled code reads a plain mirror of the same values instead; eager code keeps the context
variables, which keep concurrent calls in other threads apart.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch

_ADAPTER_NAMES: contextvars.ContextVar[Sequence[str] | None] = contextvars.ContextVar(
    "peftkit_adapter_names", default=None
)

# Work shared by the layers within one model call (e.g. every layer's rotation blocks in one batch):
# {"owner": the model-level engine, ...}; None outside a call of the engine.
_MEMO: contextvars.ContextVar[dict | None] = contextvars.ContextVar("peftkit_forward_memo", default=None)

# The same two values for compiled code (dynamo traces a module-level dict, and guards on it).
_COMPILED_VIEW: dict = {"adapter_names": None, "memo": None}

BASE_ADAPTER = "__base__"  # in ``adapter_names``: this sample runs the base model alone


def group_rows(names: Sequence[str]) -> dict[str, list[int]]:
    """Adapter name -> the batch rows that use it, in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).append(i)
    return groups


def current_adapter_names() -> Sequence[str] | None:
    if torch.compiler.is_compiling():
        return _COMPILED_VIEW["adapter_names"]
    return _ADAPTER_NAMES.get()


def forward_memo() -> dict | None:
    """The current call's shared-work dict (``"owner"``: the engine running it), or None."""
    if torch.compiler.is_compiling():
        return _COMPILED_VIEW["memo"]
    return _MEMO.get()


@contextlib.contextmanager
def forward_options(adapter_names: Sequence[str] | None, owner: object = None) -> Iterator[None]:
    names = list(adapter_names) if adapter_names is not None else None
    shared = {"owner": owner} if owner is not None else None
    before = dict(_COMPILED_VIEW)
    _COMPILED_VIEW.update(adapter_names=names, memo=shared)
    # traced code reads the mirror only (and cannot trace ContextVar.set)
    tokens = None if torch.compiler.is_compiling() else (_ADAPTER_NAMES.set(names), _MEMO.set(shared))
    try:
        yield
    finally:
        _COMPILED_VIEW.update(before)
        if tokens is not None:
            _MEMO.reset(tokens[1])
            _ADAPTER_NAMES.reset(tokens[0])
