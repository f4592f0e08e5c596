"""The method registry: one place that maps a ``peft_type`` to its config and its code.

Methods register themselves when their module is imported (``peftkit.methods`` imports them
all), so nothing else in the package branches on the method.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .types import PeftType

if TYPE_CHECKING:
    from .config import PeftConfig


@dataclass(frozen=True)
class MethodSpec:
    """What the engine needs to know about one adapter method.

    Attributes:
        peft_type: the method's ``PeftType``.
        config: the config dataclass.
        layer: the ``AdapterLayer`` subclass for weight-space methods (None for others).
        prefix: the marker in parameter names that makes a parameter trainable ("lora_").
        default_targets: model_type -> default ``target_modules`` when the config names none.
        per_layer: ``(config, module_name) -> kwargs`` for ``create`` (rank and alpha patterns).
        weighted: ``(adapter_model, adapters, weights, adapter_name, **options)``: builds a new
            adapter from a weighted combination of existing ones (``add_weighted_adapter``).
        convert_initial: ``(config, state, initial_state) -> (config, state)``: rewrites an adapter
            whose init changed the base weights into one for the original base model.
        prepare: ``(config, model_type) -> None``: fills model-dependent defaults into the adapter's
            own config copy (after the engine's ``target_modules`` default), e.g. IA3's feed-forward set.
        prompt: for prompt-learning methods, ``(config, word_embeddings, total_tokens, mode) -> module``
            whose ``forward()`` gives the prompt; ``mode``: "train" (the method's encoder), "table" (a
            plain table, for inference) or "load" (a table on the meta device, filled from a file).
        select: ``(config, [(name, module), ...]) -> [(name, module), ...]``: the modules to adapt,
            for methods whose targets are not chosen by ``target_modules`` matching alone.
        engine: the model-level engine class ``PeftModel`` builds for the method (default:
            ``AdapterModel``; prompt learning and X-LoRA have their own).
    """

    peft_type: PeftType
    config: type[PeftConfig]
    layer: Any = None
    prefix: str = ""
    default_targets: dict[str, list[str]] | None = None
    per_layer: Callable[[Any, str], dict[str, Any]] | None = None
    weighted: Callable[..., None] | None = None
    convert_initial: Callable[..., tuple[Any, dict]] | None = None
    prepare: Callable[[Any, str | None], None] | None = None
    prompt: Callable[..., Any] | None = None
    select: Callable[[Any, list], list] | None = None
    engine: type | None = None


_METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Make a method known to the engine, to configs and to loading."""
    _METHODS[str(spec.peft_type)] = spec
    return spec


def get_method(peft_type: str | PeftType) -> MethodSpec:
    """Look a method up by its ``peft_type``; the error lists the ones that exist."""
    from . import methods  # noqa: F401  (registers the built-in methods)

    key = str(peft_type.value if isinstance(peft_type, PeftType) else peft_type)
    try:
        return _METHODS[key]
    except KeyError:
        known = ", ".join(sorted(_METHODS))
        raise ValueError(f"Unknown peft_type {key!r}: peftkit knows {known}.") from None


def registered_methods() -> list[MethodSpec]:
    """Every known method, built-in ones included, in registration order."""
    from . import methods  # noqa: F401  (registers the built-in methods)

    return list(_METHODS.values())
