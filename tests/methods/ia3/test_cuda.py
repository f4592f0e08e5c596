"""(IA)³ on a CUDA device, against the oracle and the merged weight. Skipped without a GPU."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn
from torch.testing import assert_close

import peftkit

from .helpers import quiet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


def _pair(dtype: torch.dtype):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32)).to(CUDA, dtype)
    models = []
    for lib in (peftkit, peft):
        torch.manual_seed(1)
        cfg = lib.IA3Config(target_modules=["0", "2"], feedforward_modules=["2"], init_ia3_weights=False)
        models.append(quiet(lib.get_peft_model, copy.deepcopy(base), cfg).eval())
    models[0].load_state_dict(models[1].state_dict())  # the same vectors in both
    return models


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_merge_mixed_on_cuda(dtype):
    kit, ref = _pair(dtype)
    x = torch.randn(4, 7, 64, device=CUDA).to(dtype)
    out = kit(x)
    assert out.dtype == dtype and out.device.type == "cuda"
    assert torch.equal(out, ref(x))
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    kit.merge_adapter()
    assert_close(kit(x), out, **tol)
    quiet(kit.unmerge_adapter)
    assert_close(kit(x), out, **tol)
    with kit.disable_adapter():
        base = kit(x)
    mixed = kit(x, adapter_names=["default", "__base__", "default", "__base__"])
    assert_close(mixed[0::2], out[0::2], **tol)
    assert_close(mixed[1::2], base[1::2], **tol)


def test_training_step_on_cuda():
    kit, _ = _pair(torch.bfloat16)
    kit.train()
    opt = torch.optim.SGD([p for p in kit.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(8, 64, device=CUDA, dtype=torch.bfloat16)
    before = kit.base_model.model[0].ia3_l["default"].detach().clone()
    kit(x).float().pow(2).mean().backward()
    opt.step()
    assert not torch.equal(kit.base_model.model[0].ia3_l["default"], before)
