"""Per-sample SHiRA adapters in one batch equal running each sample with its own adapter."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from .helpers import add, inputs, make


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_mixed_batch_equals_single_runs(name):
    model = make("peftkit", name, random_seed=0)
    add(model, name, "b", random_seed=7, r=1)
    ids = torch.randint(3, 60, (4, 6), generator=torch.Generator().manual_seed(0))
    names = ["b", "__base__", "default", "b"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        for i, adapter in enumerate(names):
            if adapter == "__base__":
                with model.disable_adapter():
                    expected = model(input_ids=ids[i : i + 1]).logits
            else:
                model.set_adapter(adapter)
                expected = model(input_ids=ids[i : i + 1]).logits
            assert_close(mixed[i : i + 1], expected, atol=1e-5, rtol=1e-5)
        # all the same adapter: the same as the plain forward
        model.set_adapter("default")
        assert_close(model(input_ids=ids, adapter_names=["default"] * 4).logits, model(input_ids=ids).logits,
                     atol=1e-5, rtol=1e-5)


def test_mixed_batch_refused_while_merged():
    model = make("peftkit", "llama")
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        model(**inputs("llama"), adapter_names=["default", "__base__"])
