"""LoKr on a CUDA device: the same adapter gives the CPU's outputs, in training too. Skipped without a GPU."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

from .helpers import make_net, net_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


@pytest.mark.parametrize("cfg", [{"r": 1, "decompose_both": True, "use_effective_conv2d": True}, {"r": 8}], ids=["lowrank_cp", "full"])
def test_cuda_matches_cpu(cfg):
    cpu = make_net("peftkit", **cfg)
    gpu = copy.deepcopy(cpu).to(CUDA)
    x = net_inputs()
    with torch.no_grad():
        expected = cpu(**x)
        assert_close(gpu(**{k: v.to(CUDA) for k, v in x.items()}).cpu(), expected, atol=1e-4, rtol=1e-4)
        gpu.merge_adapter()
        assert_close(gpu(**{k: v.to(CUDA) for k, v in x.items()}).cpu(), expected, atol=1e-4, rtol=1e-4)
        gpu.unmerge_adapter()


def test_cuda_training_with_dropout():
    model = make_net("peftkit", r=2, rank_dropout=0.5, module_dropout=0.2, rank_dropout_scale=True).to(CUDA)
    model.train()
    x = {k: v.to(CUDA) for k, v in net_inputs().items()}
    model(**x).square().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is None or torch.isfinite(g).all() for g in grads)
