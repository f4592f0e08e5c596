"""Shared fixtures of the kernel tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def float64():
    """Run the test with float64 as the default dtype: a mismatch is then a wrong formula, not rounding."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
