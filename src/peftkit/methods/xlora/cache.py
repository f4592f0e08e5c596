"""``XLoraCache``: the key/value cache of X-LoRA's second pass, carrying the first pass's cache with it.

The two passes see different keys and values (the first runs without the experts), so each
needs its own cache. The second pass's cache is the one the model returns and ``generate()``
keeps; every operation generation applies to it (beam reordering, cropping, batch expansion)
is applied to the first pass's cache as well, so both always describe the same tokens.
"""

from __future__ import annotations

from typing import Any

_CLASS: type | None = None


def xlora_cache_class() -> type:
    """The ``DynamicCache`` subclass (built on first use: transformers is imported lazily)."""
    global _CLASS
    if _CLASS is None:
        from transformers.cache_utils import DynamicCache

        class XLoraCache(DynamicCache):
            """A ``DynamicCache`` for the real pass with ``scaling_cache`` for the scaling pass."""

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.scaling_cache = DynamicCache(*args, **kwargs)

            def reset(self) -> None:
                super().reset()
                self.scaling_cache.reset()

            def reorder_cache(self, beam_idx: Any) -> None:
                super().reorder_cache(beam_idx)
                self.scaling_cache.reorder_cache(beam_idx)

            def crop(self, *args: Any) -> None:
                super().crop(*args)
                self.scaling_cache.crop(*args)

            def batch_repeat_interleave(self, repeats: int) -> None:
                super().batch_repeat_interleave(repeats)
                self.scaling_cache.batch_repeat_interleave(repeats)

            def batch_select_indices(self, indices: Any) -> None:
                super().batch_select_indices(indices)
                self.scaling_cache.batch_select_indices(indices)

        _CLASS = XLoraCache
    return _CLASS
