"""Tiny models whose linear layers are quantized the way bitsandbytes / torchao users do it.

Quantization is deterministic, so two calls to ``quantized_llama(kind)`` give identical
models: one for peftkit, one for HF PEFT (the oracle).
"""

from __future__ import annotations

import torch
from torch import nn

KINDS_4BIT = ["nf4", "fp4"]


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def quantize_linear(linear: nn.Linear, kind: str) -> nn.Module:
    """One ``nn.Linear`` as a quantized layer of ``kind``: nf4, fp4, int8 (bitsandbytes) or torchao."""
    if kind == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(linear, Int8WeightOnlyConfig())
        return linear
    import bitsandbytes as bnb

    bias = linear.bias is not None
    if kind == "int8":
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=bias, compute_dtype=torch.float32, quant_type=kind
        )
    q.load_state_dict(linear.state_dict())
    return q.to("cpu").train(linear.training)  # bitsandbytes quantizes on .to(device)


def quantize_model(model: nn.Module, kind: str, skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Quantize every ``nn.Linear`` of ``model`` in place (but ``skip``)."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and name.rsplit(".", 1)[-1] not in skip:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, quantize_linear(module, kind))
    return model


def quantized_llama(kind: str, seed: int = 0) -> nn.Module:
    model = quantize_model(tiny_llama(seed), kind)
    # what transformers sets on a bitsandbytes-loaded model; PEFT picks its bnb layers by it
    model.is_loaded_in_4bit = kind in KINDS_4BIT
    model.is_loaded_in_8bit = kind == "int8"
    return model


def ids(batch: int = 2, length: int = 8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 64, (batch, length), generator=g)


def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def copy_adapter(src, dst, adapter: str = "default") -> None:
    """Give ``dst`` (either library) the adapter weights of ``src``, by checkpoint key."""
    import peft

    state = peft.get_peft_model_state_dict(src, adapter_name=adapter)
    result = peft.set_peft_model_state_dict(dst, state, adapter_name=adapter)
    assert not [k for k in result.unexpected_keys if "lora_" in k or "ia3_" in k]
