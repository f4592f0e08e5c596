"""Mixed precision: under ``torch.autocast`` (bfloat16, CPU) every weight-space method trains and runs as PEFT's does.

A model saved by peftkit is loaded by both libraries; forward and backward under autocast must give
PEFT's logits and adapter gradients up to bfloat16 rounding (fused kernels take part: their in-place
ops are outside autocast, so they cast as autocast would)."""

from __future__ import annotations

import pytest
import torch

from _helpers import LIBS, build

TARGETS = {"llama": ["q_proj", "v_proj", "gate_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def _config(lib, method: str, model: str):
    t = list(TARGETS[model])
    return {
        "lora": lambda: lib.LoraConfig(r=4, lora_alpha=8, target_modules=t, init_lora_weights=False),
        "dora": lambda: lib.LoraConfig(r=4, lora_alpha=8, target_modules=t, init_lora_weights=False, use_dora=True),
        "lokr": lambda: lib.LoKrConfig(r=4, alpha=8, target_modules=t, init_weights=False),
        "loha": lambda: lib.LoHaConfig(r=4, alpha=8, target_modules=t, init_weights=False),
        "ia3": lambda: lib.IA3Config(target_modules=t, feedforward_modules=t[-1:], init_ia3_weights=False),
        "oft": lambda: lib.OFTConfig(r=0, oft_block_size=4, target_modules=t, init_weights=False),
        "boft": lambda: lib.BOFTConfig(boft_block_size=4, target_modules=t, init_weights=False),
        "shira": lambda: lib.ShiraConfig(r=2, target_modules=t, init_weights=False, random_seed=3),
    }[method]()


def _run(model, ids, train: bool):
    model.train(train)
    torch.manual_seed(5)  # the same dropout masks (GPT-2) for both libraries
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits
    if not train:
        return logits, {}
    logits.float().square().mean().backward()
    grads = {n.replace(".default", ""): p.grad for n, p in model.named_parameters() if p.requires_grad}
    return logits.float(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["lora", "dora", "lokr", "loha", "ia3", "oft", "boft", "shira"])
def test_autocast_matches_peft(method, model_name, train, tmp_path):
    if model_name == "gpt2" and method not in ("lora", "dora", "ia3"):
        pytest.skip(f"PEFT's {method} does not adapt transformers Conv1D layers")
    torch.manual_seed(0)
    source = LIBS["peftkit"].get_peft_model(build(model_name), _config(LIBS["peftkit"], method, model_name))
    source.save_pretrained(tmp_path)
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    results = {}
    for name, lib in LIBS.items():
        model = lib.PeftModel.from_pretrained(build(model_name), tmp_path, is_trainable=True)
        results[name] = _run(model, ids, train)
    (kit_logits, kit_grads), (ref_logits, ref_grads) = results["peftkit"], results["peft"]
    assert kit_logits.dtype == ref_logits.dtype  # in eval: the dtype the layers hand on, as PEFT's
    assert torch.isfinite(kit_logits).all()
    assert _rel(kit_logits, ref_logits) < 2e-2
    assert kit_grads.keys() == ref_grads.keys()
    for key in ref_grads:
        assert ref_grads[key] is not None and kit_grads[key] is not None, key
        assert _rel(kit_grads[key], ref_grads[key]) < 5e-2, key



def test_dora_eval_hands_on_autocast_dtype():
    """A DoRA layer with a bias, in eval under autocast, returns bfloat16 like the plain layer and PEFT's DoRA
    (the float32 bias once turned its output into float32)."""
    dtypes = {}
    for name, lib in LIBS.items():
        torch.manual_seed(0)
        config = lib.LoraConfig(r=4, target_modules=["0"], use_dora=True, init_lora_weights=False)
        model = lib.get_peft_model(torch.nn.Sequential(torch.nn.Linear(16, 16)), config).eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            dtypes[name] = model(torch.randn(4, 16)).dtype
    assert dtypes == {"peft": torch.bfloat16, "peftkit": torch.bfloat16}
