"""SHiRA on a CUDA device: kernels against the dense definition, the model against the oracle. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import peftkit
from peftkit.kernels.shira import SparsePattern, shira_linear, shira_linear_reference, sparse_delta

from .helpers import add, inputs, load, make, save, shira_layers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d_layout"])
def test_kernels_on_cuda(transposed, dtype):
    g = torch.Generator().manual_seed(0)
    fan_in, fan_out = 96, 80
    stored = (fan_in, fan_out) if transposed else (fan_out, fan_in)
    weight = torch.randn(stored, generator=g).to(CUDA, dtype)
    w2d = weight.t() if transposed else weight
    flat = torch.randperm(fan_in * fan_out, generator=g)[: 4 * (fan_in + fan_out)]
    r0, r1 = flat // stored[1], flat % stored[1]
    rows, cols = (r1, r0) if transposed else (r0, r1)
    rows, cols, flat = rows.to(CUDA), cols.to(CUDA), flat.to(CUDA)
    pattern = SparsePattern(rows, cols, flat, (fan_out, fan_in))
    original = weight.clone()
    x0 = torch.randn(4, 7, fan_in, generator=g).to(CUDA, dtype)
    v0 = torch.randn(flat.numel(), generator=g).to(CUDA)  # values in float32
    results = []
    for fn in ("fused", "delta", "reference"):
        x, v = x0.clone().requires_grad_(), v0.clone().requires_grad_()
        if fn == "fused":
            out = shira_linear(x, weight, w2d, None, v, pattern, 0.5)
        elif fn == "delta":
            out = torch.nn.functional.linear(x, w2d) + sparse_delta(x, v * 0.5, pattern)
        else:  # float32 math on the same numbers
            out = shira_linear_reference(x.float(), w2d.float(), None, v, rows, cols, 0.5)
        out.float().pow(2).sum().backward()
        assert torch.equal(weight, original)
        assert v.grad.dtype == torch.float32
        results.append((out.float(), x.grad.float(), v.grad))
    for got in results[:2]:
        for a, b in zip(got, results[2]):
            if dtype == torch.float32:
                assert_close(a, b, atol=1e-4, rtol=1e-4)
            else:  # bfloat16 inputs and GEMMs: a relative error of a few 1e-3 overall
                assert float((a - b).norm() / b.norm()) < 2e-2


def test_model_matches_oracle_on_cuda(tmp_path):
    ref = make("peft", "llama")
    save(ref, tmp_path)
    ours = load("peftkit", "llama", tmp_path, is_trainable=True).to(CUDA)
    ref = ref.to(CUDA)
    batch = {k: v.to(CUDA) for k, v in inputs("llama").items()}
    batch["labels"] = batch["input_ids"]
    out_ref, out = ref(**batch), ours(**batch)
    assert_close(out.logits, out_ref.logits, atol=1e-4, rtol=1e-4)
    out_ref.loss.backward()
    out.loss.backward()
    ours_layers = shira_layers(ours)
    for key, layer in shira_layers(ref).items():
        g_ref, g = layer.shira_weight["default"].grad, ours_layers[key].shira_weight["default"].grad
        assert_close(g, g_ref, atol=1e-5 * float(g_ref.abs().max()) + 1e-6, rtol=1e-3)


def test_merge_swap_and_mixed_batch_on_cuda():
    model = make("peftkit", "llama")
    add(model, "llama", "b")
    model = model.to(CUDA)
    ids = torch.randint(3, 60, (3, 6), device=CUDA)
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=["b", "__base__", "default"]).logits
        model.set_adapter("b")
        assert_close(mixed[:1], model(input_ids=ids[:1]).logits, atol=1e-4, rtol=1e-4)
        out_b = model(input_ids=ids).logits
        model.merge_adapter()
        assert_close(model(input_ids=ids).logits, out_b, atol=1e-4, rtol=1e-4)
        model.base_model.swap_merged_adapter("default")
        model.base_model.swap_merged_adapter("b")
        assert_close(model(input_ids=ids).logits, out_b, atol=1e-4, rtol=1e-4)
        model.unmerge_adapter()
    after = model.get_base_model().state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if "shira_" not in k)
    assert isinstance(model, peftkit.PeftModel)
