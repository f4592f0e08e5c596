"""Prompt-learning configs: files round-trip between the libraries; bad values fail early and clearly."""

from __future__ import annotations

import json
import os

import peft
import pytest
import torch

import peftkit

from .helpers import DIRECTION_IDS, DIRECTIONS, LIBS, METHOD_NAMES, N_VIRTUAL, NAMES, build, make, quiet, read_config, save

FIELDS = {
    "common": ["peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads",
               "num_transformer_submodules", "inference_mode"],
    "PROMPT_TUNING": ["prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs"],
    "P_TUNING": ["encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers", "encoder_dropout"],
}
SIZES = {  # name -> (token_dim, num_layers, num_attention_heads) of the tiny models
    "llama": (16, 2, 2), "gpt2": (16, 2, 2), "bert": (16, 2, 2),
}


def _value(v):
    return getattr(v, "value", v)


def _fields(peft_type):
    return FIELDS["common"] + FIELDS[peft_type]


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("name", NAMES)
def test_saved_config_same_as_oracle(name, method, tmp_path):
    save(make("peftkit", name, method), tmp_path / "kit")
    save(make("peft", name, method), tmp_path / "ref")
    c_kit, c_ref = read_config(str(tmp_path / "kit")), read_config(str(tmp_path / "ref"))
    for key in _fields(c_ref["peft_type"]) + ["modules_to_save"]:
        a, b = c_kit.get(key), c_ref.get(key)
        if isinstance(a, list) and isinstance(b, list):  # PEFT lists the task head's modules twice
            a, b = sorted(set(a)), sorted(set(b))
        assert a == b, key
    dim, layers, heads = SIZES[name]
    assert (c_kit["token_dim"], c_kit["num_layers"], c_kit["num_attention_heads"]) == (dim, layers, heads)
    assert c_kit["num_virtual_tokens"] == N_VIRTUAL and c_kit["num_transformer_submodules"] == 1
    if c_kit["peft_type"] == "P_TUNING":
        assert c_kit["encoder_hidden_size"] == 8


def test_saved_config_has_oracle_keys(tmp_path):
    """Every key PEFT writes is written by peftkit too (PEFT needs none of its own defaults filled in)."""
    for method in ("pt_text", "ptune_lstm"):
        save(make("peftkit", "llama", method), tmp_path / f"kit_{method}")
        save(make("peft", "llama", method), tmp_path / f"ref_{method}")
        c_kit, c_ref = read_config(str(tmp_path / f"kit_{method}")), read_config(str(tmp_path / f"ref_{method}"))
        missing = set(c_ref) - set(c_kit) - {"peft_version", "revision", "base_model_name_or_path"}
        assert not missing, missing


@pytest.mark.parametrize("src,dst", DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_config_loads_in_other_library(src, dst, method, tmp_path):
    save(make(src, "gpt2", method), tmp_path)
    original = LIBS[src].PeftConfig.from_pretrained(str(tmp_path))
    loaded = LIBS[dst].PeftConfig.from_pretrained(str(tmp_path))
    expected_cls = {"PROMPT_TUNING": "PromptTuningConfig", "P_TUNING": "PromptEncoderConfig"}[_value(original.peft_type)]
    assert type(loaded).__name__ == expected_cls
    assert isinstance(loaded, getattr(LIBS[dst], expected_cls))
    for key in _fields(_value(original.peft_type)):
        assert _value(getattr(loaded, key)) == _value(getattr(original, key)), key
    assert loaded.is_prompt_learning


def test_explicit_config_values_round_trip(tmp_path):
    """Values set by hand (not read from the model) survive a save and load in both libraries."""
    cfg = peftkit.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=7, encoder_hidden_size=12,
                                      encoder_reparameterization_type="LSTM", encoder_num_layers=1,
                                      encoder_dropout=0.25, num_layers=2, num_attention_heads=2, token_dim=16)
    model = quiet(peftkit.get_peft_model, build("llama"), cfg)
    save(model, tmp_path)
    on_disk = read_config(str(tmp_path))
    assert on_disk["encoder_reparameterization_type"] == "LSTM" and on_disk["encoder_dropout"] == 0.25
    for lib in (peft, peftkit):
        c = lib.PeftConfig.from_pretrained(str(tmp_path))
        assert (c.num_virtual_tokens, c.encoder_hidden_size, c.encoder_num_layers, c.encoder_dropout) == (7, 12, 1, 0.25)
        assert _value(c.encoder_reparameterization_type) == "LSTM"
    assert tuple(model.prompt_encoder["default"].lstm_head.weight_ih_l0.shape) == (4 * 12, 16)
    assert quiet(peftkit.PeftModel.from_pretrained, build("llama"), str(tmp_path)).peft_config["default"].num_virtual_tokens == 7


def test_enum_values_accepted():
    a = peftkit.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init=peftkit.PromptTuningInit.SAMPLE_VOCAB)
    assert a.prompt_tuning_init == "SAMPLE_VOCAB"
    b = peftkit.PromptEncoderConfig(num_virtual_tokens=2,
                                    encoder_reparameterization_type=peftkit.PromptEncoderReparameterizationType.LSTM)
    assert b.encoder_reparameterization_type == "LSTM"
    assert json.loads(json.dumps(a.to_dict()))["prompt_tuning_init"] == "SAMPLE_VOCAB"


def test_user_config_not_changed():
    """get_peft_model fills token_dim etc. in its own copy; the same config can go to a second model."""
    cfg = peftkit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    model = quiet(peftkit.get_peft_model, build("llama"), cfg)
    assert model.peft_config["default"].token_dim == 16
    other = quiet(peftkit.get_peft_model, build("gpt2"), cfg)
    assert other.peft_config["default"].num_virtual_tokens == 3


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("n", [0, -1, 2.5, True, "4"])
@pytest.mark.parametrize("cls", ["PromptTuningConfig", "PromptEncoderConfig"])
def test_num_virtual_tokens_must_be_positive_int(cls, n):
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        getattr(peftkit, cls)(task_type="CAUSAL_LM", num_virtual_tokens=n)


@pytest.mark.parametrize("cls", ["PromptTuningConfig", "PromptEncoderConfig"])
def test_num_virtual_tokens_required(cls):
    base = build("llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        quiet(peftkit.get_peft_model, base, getattr(peftkit, cls)(task_type="CAUSAL_LM"))
    assert not hasattr(base, "peft_config")
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


@pytest.mark.parametrize("cls", ["PromptTuningConfig", "PromptEncoderConfig"])
def test_token_dim_mismatch(cls):
    with pytest.raises(ValueError, match="token_dim"):
        quiet(peftkit.get_peft_model, build("gpt2"), getattr(peftkit, cls)(task_type="CAUSAL_LM", num_virtual_tokens=2,
                                                                          token_dim=32))
    # matching the model is fine
    model = quiet(peftkit.get_peft_model, build("gpt2"),
                  getattr(peftkit, cls)(task_type="CAUSAL_LM", num_virtual_tokens=2, token_dim=16))
    assert model.peft_config["default"].token_dim == 16


@pytest.mark.parametrize("field", ["token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules"])
@pytest.mark.parametrize("value", [0, -3])
def test_size_fields_positive(field, value):
    with pytest.raises(ValueError, match=field):
        peftkit.PromptTuningConfig(num_virtual_tokens=2, **{field: value})


def test_text_init_needs_tokenizer():
    with pytest.raises(ValueError, match="tokenizer_name_or_path"):
        peftkit.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="alpha")


@pytest.mark.parametrize("text", [None, ""])
def test_text_init_needs_text(text, tmp_path):
    with pytest.raises(ValueError, match="prompt_tuning_init_text"):
        peftkit.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", tokenizer_name_or_path=str(tmp_path),
                                   prompt_tuning_init_text=text)


def test_text_init_text_without_tokens():
    from .helpers import tokenizer_dir

    cfg = peftkit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, prompt_tuning_init="TEXT",
                                     tokenizer_name_or_path=tokenizer_dir(), prompt_tuning_init_text="   ")
    with pytest.raises(ValueError, match="no tokens"):
        quiet(peftkit.get_peft_model, build("llama"), cfg)


def test_tokenizer_kwargs_only_with_text():
    with pytest.raises(ValueError, match="tokenizer_kwargs"):
        peftkit.PromptTuningConfig(num_virtual_tokens=2, tokenizer_kwargs={"use_fast": True})


@pytest.mark.parametrize("init", ["random", "VOCAB", "", "TEXTS"])
def test_unknown_prompt_tuning_init(init):
    with pytest.raises(ValueError, match="prompt_tuning_init"):
        peftkit.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init=init)


@pytest.mark.parametrize("kind", ["GRU", "mlp", "", "TRANSFORMER"])
def test_unknown_encoder_type(kind):
    with pytest.raises(ValueError, match="encoder_reparameterization_type"):
        peftkit.PromptEncoderConfig(num_virtual_tokens=2, encoder_reparameterization_type=kind)


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_encoder_dropout_is_probability(p):
    with pytest.raises(ValueError, match="encoder_dropout"):
        peftkit.PromptEncoderConfig(num_virtual_tokens=2, encoder_dropout=p)


def test_unknown_init_in_file_rejected(tmp_path):
    """A hand-edited adapter_config.json with a bad init is refused when read."""
    save(make("peftkit", "llama", "pt_random"), tmp_path)
    path = os.path.join(tmp_path, "adapter_config.json")
    cfg = read_config(str(tmp_path))
    cfg["prompt_tuning_init"] = "NOPE"
    with open(path, "w") as fh:
        json.dump(cfg, fh)
    with pytest.raises(ValueError, match="prompt_tuning_init"):
        peftkit.PeftConfig.from_pretrained(str(tmp_path))
