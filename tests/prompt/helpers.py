"""Tiny models and helpers shared by the prompt-learning tests (prompt tuning, P-tuning).

Base models are the compatibility suite's (fixed seeds: two ``build(name)`` calls give the same
weights, one copy per library). Both libraries draw the prompt (or P-tuning's encoder) from the
global generator in the same order, so the same seed gives the same adapter.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
import warnings
from typing import Any

import peft
import torch
from torch import nn

import peftkit
from tests.compat._helpers import build, read_config, saved_tensors  # noqa: F401

LIBS = {"peft": peft, "peftkit": peftkit}
DIRECTIONS = [("peft", "peftkit"), ("peftkit", "peft")]
DIRECTION_IDS = ["peft_to_peftkit", "peftkit_to_peft"]
TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}
NAMES = list(TASKS)
LM_NAMES = ["llama", "gpt2"]
VOCAB = 64
N_VIRTUAL = 4

# a method name -> (config class name, its keyword arguments)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "pt_random": ("PromptTuningConfig", {"prompt_tuning_init": "RANDOM"}),
    "pt_vocab": ("PromptTuningConfig", {"prompt_tuning_init": "SAMPLE_VOCAB"}),
    "pt_text": ("PromptTuningConfig", {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "alpha beta gamma"}),
    "ptune_mlp": ("PromptEncoderConfig", {"encoder_hidden_size": 8}),
    "ptune_lstm": ("PromptEncoderConfig", {"encoder_hidden_size": 8, "encoder_reparameterization_type": "LSTM"}),
}
METHOD_NAMES = list(METHODS)

_WORDS = ["[UNK]", "[PAD]", "alpha", "beta", "gamma", "delta", "epsilon", "zeta"]


@functools.lru_cache(maxsize=None)
def tokenizer_dir() -> str:
    """A folder holding a tiny word-level tokenizer (ids < 8), built without the network."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i + 10 for i, w in enumerate(_WORDS)}  # ids 10..17: not the embeddings' first rows
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    path = tempfile.mkdtemp(prefix="peftkit_prompt_tok_")
    atexit.register(shutil.rmtree, path, True)
    fast.save_pretrained(path)
    return path


def text_ids(text: str) -> list[int]:
    vocab = {w: i + 10 for i, w in enumerate(_WORDS)}
    return [vocab.get(w, 10) for w in text.split()]


def prompt_config(lib: Any, name: str, method: str, **overrides: Any) -> Any:
    cls_name, kwargs = METHODS[method]
    kwargs = {"task_type": TASKS[name], "num_virtual_tokens": N_VIRTUAL, **kwargs}
    if method == "pt_text":
        kwargs["tokenizer_name_or_path"] = tokenizer_dir()
    kwargs.update(overrides)
    return getattr(lib, cls_name)(**kwargs)


def quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def make(lib_name: str, name: str, method: str, seed: int = 1, base: nn.Module | None = None, **overrides: Any) -> Any:
    """A prompt-learning PeftModel of library ``lib_name`` on a fresh base ``name``, eval mode."""
    lib = LIBS[lib_name]
    base = build(name) if base is None else base
    torch.manual_seed(seed)
    model = quiet(lib.get_peft_model, base, prompt_config(lib, name, method, **overrides))
    return model.eval()


def load(lib_name: str, name: str, path: Any, **kwargs: Any) -> Any:
    model = quiet(LIBS[lib_name].PeftModel.from_pretrained, build(name), str(path), **kwargs)
    return model.eval() if not kwargs.get("is_trainable") else model


def save(model: Any, path: Any, **kwargs: Any) -> Any:
    quiet(model.save_pretrained, str(path), **kwargs)
    return path


def batch(name: str, left_pad: bool = True, with_labels: bool = False) -> dict[str, torch.Tensor]:
    """Fixed inputs: 3 rows of 6 tokens; the first row left-padded by 2 (mask zeros at the start)."""
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(3, VOCAB, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    if left_pad:
        mask[0, :2] = 0
        ids[0, :2] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if name == "bert":
        tt = torch.zeros_like(ids)
        tt[:, 4:] = 1  # a second segment: token types matter
        out["token_type_ids"] = tt
    if with_labels:
        out["labels"] = labels(name, out)
    return out


def labels(name: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    if name == "bert":
        return torch.tensor([0, 2, 1])
    lab = inputs["input_ids"].clone()
    lab[inputs["attention_mask"] == 0] = -100
    return lab


def forward(model: nn.Module, name: str, with_labels: bool = True, **kw: Any) -> Any:
    with torch.no_grad():
        return quiet(model, **batch(name, with_labels=with_labels, **kw))


def generate(model: Any, name: str, seed: int = 0, left_pad: bool = True, **kwargs: Any) -> torch.Tensor:
    inputs = batch(name, left_pad=left_pad)
    kwargs = {"max_new_tokens": 8, "min_new_tokens": 8, "pad_token_id": 0, **kwargs}
    torch.manual_seed(seed)
    with torch.no_grad():
        return quiet(model.generate, **inputs, **kwargs)


def prompt_table(model: Any, adapter: str = "default") -> torch.Tensor:
    """The virtual token embeddings an adapter feeds the model, for either library."""
    if isinstance(model, peftkit.PeftModel):
        return model.get_prompt_embedding_to_save(adapter).clone()
    # PEFT's get_prompt_embedding_to_save runs the P-tuning encoder, which a loaded (inference) adapter lacks
    assert adapter == model.active_adapter
    with torch.no_grad():
        return model.get_prompt(batch_size=1)[0].detach().cpu()


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The user's model's tensors other than a task head (cloned)."""
    return {k: v.detach().clone() for k, v in model.get_base_model().state_dict().items()
            if "classifier" not in k and "modules_to_save" not in k}
