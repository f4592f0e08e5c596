"""The LoHa tests run tiny models: one CPU thread is much faster than several.

``path`` runs a test once per forward path: the face-splitting bypass, ΔW folded into the
base op, and the cost-based choice.
"""

import pytest
import torch

from peftkit.methods.loha import LoHaLayer

torch.set_num_threads(1)


@pytest.fixture(params=["bypass", "dense", None], ids=["bypass", "dense", "auto"])
def path(request, monkeypatch):
    monkeypatch.setattr(LoHaLayer, "force_path", request.param)
    return request.param
