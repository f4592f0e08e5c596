"""LoHa on a CUDA device: the same adapter gives the CPU's outputs on both paths, in training too. Skipped without a GPU."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

from peftkit.methods.loha import LoHaLayer

from .helpers import make_net, net_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


@pytest.mark.parametrize("path", ["bypass", "dense", None])
@pytest.mark.parametrize("cfg", [{"r": 2, "use_effective_conv2d": True}, {"r": 4}], ids=["cp", "flat"])
def test_cuda_matches_cpu(cfg, path, monkeypatch):
    monkeypatch.setattr(LoHaLayer, "force_path", path)
    cpu = make_net("peftkit", **cfg)
    gpu = copy.deepcopy(cpu).to(CUDA)
    x = net_inputs()
    with torch.no_grad():
        expected = cpu(**x)
        assert_close(gpu(**{k: v.to(CUDA) for k, v in x.items()}).cpu(), expected, atol=1e-4, rtol=1e-4)
        gpu.merge_adapter()
        assert_close(gpu(**{k: v.to(CUDA) for k, v in x.items()}).cpu(), expected, atol=1e-4, rtol=1e-4)
        gpu.unmerge_adapter()


@pytest.mark.parametrize("path", ["bypass", "dense"])
def test_cuda_training_grads_match_cpu(path, monkeypatch):
    monkeypatch.setattr(LoHaLayer, "force_path", path)
    cpu = make_net("peftkit", r=2, use_effective_conv2d=True)
    gpu = copy.deepcopy(cpu).to(CUDA)
    cpu.train(), gpu.train()
    x = net_inputs()
    cpu(**x).square().sum().backward()
    gpu(**{k: v.to(CUDA) for k, v in x.items()}).square().sum().backward()
    g_cpu = {n: p.grad for n, p in cpu.named_parameters() if p.requires_grad}
    g_gpu = {n: p.grad for n, p in gpu.named_parameters() if p.requires_grad}
    assert g_cpu and sorted(g_cpu) == sorted(g_gpu)
    for n in g_cpu:
        assert_close(g_gpu[n].cpu(), g_cpu[n], atol=1e-3, rtol=1e-3, msg=n)


def test_cuda_training_with_dropout():
    model = make_net("peftkit", r=2, rank_dropout=0.5, module_dropout=0.2).to(CUDA)
    model.train()
    x = {k: v.to(CUDA) for k, v in net_inputs().items()}
    model(**x).square().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is None or torch.isfinite(g).all() for g in grads)
