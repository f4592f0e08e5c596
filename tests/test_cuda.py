"""The same LoRA/DoRA checks on a CUDA device, against the oracle. Skipped without a GPU.

CI has no GPU; these run where one is lent (``pytest tests/test_cuda.py``).
"""

from __future__ import annotations

import pytest
import torch

from tests.compat._helpers import build, inputs, make_peft_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


def _pair(name: str, dtype: torch.dtype = torch.float32, **overrides):
    """The same adapter in peft and peftkit, on the GPU in ``dtype`` (peftkit gets peft's weights)."""
    ref = make_peft_model("peft", name, **overrides)
    ours = make_peft_model("peftkit", name, **overrides)
    ours.load_state_dict(ref.state_dict())
    return ref.to(CUDA, dtype), ours.to(CUDA, dtype)


def _on(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(CUDA) for k, v in batch.items()}


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_forward_backward_match_oracle(name: str, use_dora: bool) -> None:
    ref, ours = _pair(name, use_dora=use_dora)  # eval mode: no base-model dropout, grads still flow
    batch = _on(inputs(name))
    batch["labels"] = batch["input_ids"]
    out_ref, out = ref(**batch), ours(**batch)
    torch.testing.assert_close(out.logits, out_ref.logits, rtol=1e-4, atol=1e-5)
    out_ref.loss.backward()
    out.loss.backward()
    grads_ref = {k: p.grad for k, p in ref.named_parameters() if p.requires_grad}
    grads = {k: p.grad for k, p in ours.named_parameters() if p.requires_grad}
    assert grads.keys() == grads_ref.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], grads_ref[k], rtol=1e-3, atol=1e-5, msg=k)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_bf16_forward_close_to_oracle(use_dora: bool) -> None:
    ref, ours = _pair("llama", torch.bfloat16, use_dora=use_dora)
    batch = _on(inputs("llama"))
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, ref(**batch).logits, rtol=2e-2, atol=2e-2)


def test_merge_and_unload_on_gpu_matches_oracle() -> None:
    ref, ours = _pair("llama", use_dora=True)
    batch = _on(inputs("llama"))
    with torch.no_grad():
        expected = ours(**batch).logits
        merged, merged_ref = ours.merge_and_unload(), ref.merge_and_unload()
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(merged(**batch).logits, merged_ref(**batch).logits, rtol=1e-4, atol=1e-5)


def test_mixed_batch_on_gpu_equals_each_adapter_alone() -> None:
    from tests.compat._helpers import add_adapter

    model = make_peft_model("peftkit", "llama")
    add_adapter(model, "peftkit", "llama", "other")
    model.to(CUDA)
    batch = _on(inputs("llama"))
    names = ["default", "other"]
    with torch.no_grad():
        mixed = model(**batch, adapter_names=names).logits
        for i, n in enumerate(names):
            model.set_adapter(n)
            alone = model(**{k: v[i : i + 1] for k, v in batch.items()}).logits
            torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-4, atol=1e-5)


def test_saved_on_gpu_loads_on_cpu(tmp_path) -> None:
    import peftkit

    _, ours = _pair("llama")
    ours.save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(build("llama"), tmp_path).eval()
    batch = inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, ours.cpu()(**batch).logits, rtol=1e-4, atol=1e-5)


def _shira_pair(dtype: torch.dtype = torch.float32):
    """The same SHiRA adapter (peft's positions and values) in both libraries, on the GPU."""
    import warnings

    import peft

    import peftkit

    cfg = {"r": 2, "target_modules": ["q_proj", "v_proj", "down_proj"], "init_weights": False, "random_seed": 3}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(build("llama"), peft.ShiraConfig(**cfg)).eval()
        ours = peftkit.get_peft_model(build("llama"), peftkit.ShiraConfig(**cfg)).eval()
    state = peft.get_peft_model_state_dict(ref)
    peftkit.set_peft_model_state_dict(ours, state)
    return ref.to(CUDA, dtype), ours.to(CUDA, dtype)


def test_shira_forward_backward_merge_on_gpu() -> None:
    ref, ours = _shira_pair()
    batch = _on(inputs("llama"))
    batch["labels"] = batch["input_ids"]
    out_ref, out = ref(**batch), ours(**batch)
    torch.testing.assert_close(out.logits, out_ref.logits, rtol=1e-4, atol=1e-5)
    out_ref.loss.backward()
    out.loss.backward()
    g_ref = {k: p.grad for k, p in ref.named_parameters() if p.requires_grad}
    g = {k: p.grad for k, p in ours.named_parameters() if p.requires_grad}
    assert g.keys() == g_ref.keys()
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-3, atol=1e-5, msg=k)
    before = {k: v.clone() for k, v in ours.base_model.model.state_dict().items() if "base_layer" in k}
    with torch.no_grad():
        ours.merge_adapter()
        torch.testing.assert_close(ours(**batch).logits, out.logits, rtol=1e-4, atol=1e-5)
        ours.unmerge_adapter()
    after = {k: v for k, v in ours.base_model.model.state_dict().items() if "base_layer" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_shira_bf16_on_gpu() -> None:
    ref, ours = _shira_pair(torch.bfloat16)
    batch = _on(inputs("llama"))
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, ref(**batch).logits, rtol=2e-2, atol=2e-2)


def test_xlora_on_gpu_matches_cpu_and_caches(tmp_path) -> None:
    """X-LoRA on the GPU: the same logits as on the CPU; cached generation equals uncached."""
    import peftkit
    from tests.methods.xlora.conftest import EXPERTS, make_base

    adapters = {}
    for name in ("0", "1"):
        torch.manual_seed(int(name))
        lora = peftkit.get_peft_model(make_base(), peftkit.LoraConfig(init_lora_weights=False, **EXPERTS[name]))
        lora.save_pretrained(str(tmp_path / name))
        adapters[name] = str(tmp_path / name)
    config = dict(task_type="CAUSAL_LM", adapters=adapters, layerwise_scalings=True, scaling_pass_value=0.5)
    cpu = peftkit.get_peft_model(make_base(), peftkit.XLoraConfig(**config)).eval()
    gpu = peftkit.get_peft_model(make_base(), peftkit.XLoraConfig(**config)).eval()
    gpu.base_model.internal_xlora_classifier.load_state_dict(cpu.base_model.internal_xlora_classifier.state_dict())
    gpu.to(CUDA)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(gpu(input_ids=ids.to(CUDA)).logits.cpu(), cpu(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = gpu.generate(input_ids=ids.to(CUDA), **gen)
    assert torch.equal(cached, gpu.generate(input_ids=ids.to(CUDA), use_cache=False, **gen))
