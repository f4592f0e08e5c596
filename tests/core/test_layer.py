"""AdapterLayer's own attribute handling: the fast path for plain values keeps nn.Module's rules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit.methods.lora.layer import LoraLayer


def _layer() -> LoraLayer:
    return LoraLayer(nn.Linear(4, 3))


def test_plain_values_are_plain_attributes():
    layer = _layer()
    layer.extra = {"a": 1}
    layer.active_adapters = ["x"]
    assert layer.extra == {"a": 1} and layer.active_adapters == ["x"]
    assert "extra" in layer.__dict__
    assert "extra" not in layer._modules and "extra" not in layer._parameters and "extra" not in layer._buffers


def test_plain_value_cannot_replace_a_submodule_or_parameter():
    layer = _layer()
    with pytest.raises(TypeError):  # as nn.Module: a module attribute takes a module or None
        layer.base_layer = 3
    assert isinstance(layer.base_layer, nn.Linear)
    layer.register_parameter("p", nn.Parameter(torch.zeros(1)))
    with pytest.raises(TypeError):
        layer.p = 1.0
    assert isinstance(layer.p, nn.Parameter)


def test_modules_parameters_and_buffers_still_register():
    layer = _layer()
    layer.sub = nn.Linear(2, 2)
    layer.q = nn.Parameter(torch.ones(2))
    layer.register_buffer("b", torch.zeros(2))
    layer.b = torch.ones(2)  # a tensor assigned to a buffer's name stays a buffer
    assert "sub" in layer._modules and "q" in layer._parameters and torch.equal(layer._buffers["b"], torch.ones(2))
    names = dict(layer.named_parameters())
    assert "q" in names and "sub.weight" in names


def test_property_setters_still_run():
    class WithProperty(LoraLayer):
        @property
        def flag(self) -> int:
            return self._flag * 10

        @flag.setter
        def flag(self, value: int) -> None:
            self._flag = value

    layer = WithProperty(nn.Linear(4, 3))
    layer.flag = 2
    assert layer.flag == 20
