"""Tiny models and helpers shared by the compatibility tests (peftkit <-> HF PEFT).

Every base model is built under a fixed seed, so two calls to ``build(name)`` give the
same weights: one copy goes to each library.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import peft
import torch
from safetensors import safe_open
from torch import nn

import peftkit

LIBS = {"peft": peft, "peftkit": peftkit}
DIRECTIONS = [("peft", "peftkit"), ("peftkit", "peft")]
DIRECTION_IDS = ["peft_to_peftkit", "peftkit_to_peft"]


# --------------------------------------------------------------------------- models
def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlamaForCausalLM(cfg)


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64, num_labels=3, pad_token_id=0,
    )
    return BertForSequenceClassification(cfg)


def _t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    return T5ForConditionalGeneration(cfg)


class Custom(nn.Module):
    """A small non-transformers model with Embedding, Conv2d, Conv1d and Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.conv_s = nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False)
        self.conv1d = nn.Conv1d(8, 6, 3, padding=1)
        self.lin = nn.Linear(8 + 4 + 6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        e = self.emb(ids)  # (B, T, 8)
        c = self.conv_s(torch.relu(self.conv(img)))  # (B, 4, H/2, W/2)
        s = self.conv1d(e.transpose(1, 2))  # (B, 6, T)
        h = self.lin(torch.cat([e.mean(1), c.mean((2, 3)), s.mean(2)], dim=1))
        return torch.cat([e.flatten(1), c.flatten(1), s.flatten(1), self.head(torch.tanh(h))], dim=1)


def _ids(batch: int = 2, length: int = 6, vocab: int = 64, seed: int = 123) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


@dataclass
class ModelSpec:
    build: Callable[[], nn.Module]
    task_type: str | None
    targets: list[str]
    make_inputs: Callable[[], dict[str, torch.Tensor]]
    layers_pattern: str = "layers"
    extra: dict[str, Any] = field(default_factory=dict)


def _lm_inputs() -> dict[str, torch.Tensor]:
    ids = _ids()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _t5_inputs() -> dict[str, torch.Tensor]:
    ids = _ids()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": _ids(length=4, seed=7)}


def _custom_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 20, (2, 5), generator=g)
    ids[0, 0] = 0  # the padding index
    return {"ids": ids, "img": torch.randn(2, 2, 6, 6, generator=g)}


MODELS: dict[str, ModelSpec] = {
    "llama": ModelSpec(_llama, "CAUSAL_LM", ["q_proj", "v_proj", "o_proj", "down_proj"], _lm_inputs, "layers"),
    "gpt2": ModelSpec(_gpt2, "CAUSAL_LM", ["c_attn", "c_proj", "c_fc"], _lm_inputs, "h"),
    "bert": ModelSpec(_bert, "SEQ_CLS", ["query", "value", "dense"], _lm_inputs, "layer"),
    "t5": ModelSpec(_t5, "SEQ_2_SEQ_LM", ["q", "k", "v", "o", "wi", "wo"], _t5_inputs, "block"),
    "custom": ModelSpec(Custom, None, ["emb", "conv", "conv_s", "conv1d", "lin"], _custom_inputs, ""),
}
HF_MODELS = ["llama", "gpt2", "bert", "t5"]


def build(name: str, seed: int = 0) -> nn.Module:
    """The base model ``name``, with weights fixed by ``seed``, in eval mode."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MODELS[name].build()
    return model.eval()


def inputs(name: str) -> dict[str, torch.Tensor]:
    return MODELS[name].make_inputs()


def lora_config(lib: Any, name: str, **overrides: Any) -> Any:
    """A LoRA config for model ``name`` in library ``lib`` (not identity: init_lora_weights=False)."""
    spec = MODELS[name]
    kwargs: dict[str, Any] = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": list(spec.targets),
        "init_lora_weights": False,
    }
    if spec.task_type is not None:
        kwargs["task_type"] = spec.task_type
    kwargs.update(overrides)
    return lib.LoraConfig(**kwargs)


@torch.no_grad()
def perturb_trainable(model: nn.Module, seed: int = 1) -> None:
    """Add noise to every trainable tensor, so that nothing saved equals its initial value."""
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


def make_peft_model(lib_name: str, name: str, adapter_seed: int = 1, **overrides: Any) -> Any:
    """A PeftModel of library ``lib_name`` on a fresh base model, with random adapter weights."""
    lib = LIBS[lib_name]
    base = build(name)
    torch.manual_seed(adapter_seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.get_peft_model(base, lora_config(lib, name, **overrides))
    perturb_trainable(model, adapter_seed)
    return model.eval()


def add_adapter(model: Any, lib_name: str, name: str, adapter_name: str, adapter_seed: int = 2, **overrides: Any) -> None:
    """Add a second adapter with random weights (trainable while it is filled, then frozen)."""
    lib = LIBS[lib_name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter(adapter_name, lora_config(lib, name, **overrides))
        model.set_adapter(adapter_name)
    perturb_trainable(model, adapter_seed)
    model.eval()


def load(lib_name: str, name: str, path: str, **kwargs: Any) -> Any:
    """Load an adapter folder onto a fresh base model with library ``lib_name``."""
    lib = LIBS[lib_name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.PeftModel.from_pretrained(build(name), path, **kwargs)
    return model.eval()


def save(model: Any, path: str, **kwargs: Any) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path, **kwargs)
    return path


@torch.no_grad()
def run(model: nn.Module, name: str) -> torch.Tensor:
    """The model's output tensor on the fixed inputs of model ``name``."""
    out = model(**inputs(name))
    if isinstance(out, torch.Tensor):
        return out
    return out.logits


def saved_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an ``adapter_model.safetensors``."""
    with safe_open(os.path.join(path, "adapter_model.safetensors"), framework="pt") as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}


def saved_tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "adapter_model.safetensors"))


def read_config(path: str) -> dict[str, Any]:
    with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as fh:
        return json.load(fh)


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name (relative to the user's model) -> LoRA layer, for either library."""
    base = model.get_base_model()
    layer_types = (peft.tuners.lora.LoraLayer, peftkit.LoraLayer)
    return {n: m for n, m in base.named_modules() if isinstance(m, layer_types)}


def lora_ranks(model: nn.Module, adapter: str = "default") -> dict[str, tuple[int, float]]:
    """Name -> (r, scaling) of one adapter in every LoRA layer that has it."""
    out = {}
    for n, m in lora_modules(model).items():
        if adapter in m.r:
            out[n] = (int(m.r[adapter]), float(m.scaling[adapter]))
    return out


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert sorted(before) == sorted(after)
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, equal_nan=True, msg=lambda m, k=k: f"{k}: {m}")
