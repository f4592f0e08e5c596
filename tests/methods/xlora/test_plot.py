"""X-LoRA scalings heat maps (``peftkit.methods.xlora.plot``) and the ``peftkit xlora-plot`` command."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit
from peftkit.cli import main
from peftkit.methods.xlora.plot import is_layerwise, plot_scalings, scalings_figure, scalings_for_prompt

plt = pytest.importorskip("matplotlib.pyplot")

WORDS = ["to", "be", "or", "not", "that", "is", "the", "question", "what", "a", "piece", "of", "work", "man",
         "write", "short", "poem", "about", "sea", "list", "three", "colours", ",", ".", ":", "!", "?"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tiny_base(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=1, bos_token_id=2, eos_token_id=3)
    return LlamaForCausalLM(config).eval()


def _tiny_tokenizer():
    """A word-level tokenizer over a 64-entry vocabulary (built offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", "<s>", "</s>"] + WORDS)}
    vocab.update({f"w{i}": i for i in range(len(vocab), 64)})
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                                   eos_token="</s>")


@pytest.fixture(scope="module")
def plot_env(tmp_path_factory):
    """(base folder with tokenizer, {name: expert folder}) for two random non-zero LoRA experts."""
    root = tmp_path_factory.mktemp("xlora_plot")
    base_dir = root / "base"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _tiny_base().save_pretrained(base_dir)
        _tiny_tokenizer().save_pretrained(base_dir)
        experts = {}
        for i, (name, targets) in enumerate({"shakespeare": ["q_proj", "v_proj"], "instruct": ["v_proj", "o_proj"]}.items()):
            torch.manual_seed(10 + i)
            lora = peftkit.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=targets, init_lora_weights=False)
            model = peftkit.get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), lora)
            experts[name] = str(root / f"expert_{name}")
            model.save_pretrained(experts[name])
    return base_dir, experts


def _xlora(plot_env, **kw):
    base_dir, experts = plot_env
    torch.manual_seed(0)
    config = peftkit.XLoraConfig(task_type="CAUSAL_LM", adapters=experts, **kw)
    return peftkit.get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), config)


def _panels(fig) -> list:
    return [ax for ax in fig.axes if ax.get_label().startswith("layer ")]


def _assert_png(path) -> None:
    from PIL import Image

    assert os.path.getsize(path) > 1000
    with open(path, "rb") as fh:
        assert fh.read(8) == PNG_MAGIC
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100


def test_scalings_for_prompt_and_png(plot_env, tmp_path):
    model = _xlora(plot_env)
    model.train()
    tokens, scalings = scalings_for_prompt(model, _tiny_tokenizer(), "to be or not to be , that is the question")
    assert model.training  # mode restored
    assert tokens[:3] == ["to", "be", "or"] and len(tokens) == 11
    n_layers = len(list(model.base_model.lora_model.adapter_layers()))
    assert scalings.shape == (11, n_layers, 2) and scalings.requires_grad is False
    torch.testing.assert_close(scalings.sum(-1), torch.ones(11, n_layers))  # softmax over the experts
    assert not is_layerwise(scalings)

    names = model.base_model.expert_names
    path = plot_scalings(scalings, tmp_path / "sub" / "heat.png", tokens=tokens, expert_names=names, title="t")
    assert path == str(tmp_path / "sub" / "heat.png")
    _assert_png(path)
    # the raw 4-d output of get_latest_scalings() (batch 1) is accepted too: one shared panel
    fig = scalings_figure(model.get_latest_scalings(), tokens=tokens, expert_names=names)
    try:
        (panel,) = _panels(fig)
        assert [t.get_text() for t in panel.get_xticklabels()] == ["shakespeare", "instruct"]
        assert [t.get_text() for t in panel.get_yticklabels()][:2] == ["to", "be"]
        assert panel.get_title() == "all layers"
        assert len(fig.axes) == 2  # the panel and the colorbar
    finally:
        plt.close(fig)


def test_layerwise_gives_one_panel_per_layer(plot_env, tmp_path):
    model = _xlora(plot_env, layerwise_scalings=True)
    tokens, scalings = scalings_for_prompt(model, _tiny_tokenizer(), "what a piece of work is man")
    n_layers = scalings.shape[1]
    assert n_layers == 6 and is_layerwise(scalings)  # q, v (shakespeare), v, o (instruct): 3 modules x 2 blocks
    fig = scalings_figure(scalings, tokens=tokens, expert_names=model.base_model.expert_names)
    try:
        panels = _panels(fig)
        assert [ax.get_label() for ax in panels] == [f"layer {i}" for i in range(n_layers)]
        for i, ax in enumerate(panels):  # each panel shows its own layer's weights
            torch.testing.assert_close(torch.as_tensor(ax.images[0].get_array()).float(), scalings[:, i, :])
    finally:
        plt.close(fig)
    # a subset of layers; a cap on the number of panels (evenly spaced, first and last kept)
    fig = scalings_figure(scalings, layers=[1, -1])
    assert [ax.get_label() for ax in _panels(fig)] == ["layer 1", "layer 5"]
    plt.close(fig)
    fig = scalings_figure(scalings, max_panels=3)
    assert [ax.get_label() for ax in _panels(fig)] == ["layer 0", "layer 2", "layer 5"]
    plt.close(fig)
    _assert_png(plot_scalings(scalings, tmp_path / "layerwise.png", tokens=tokens))


def test_plot_argument_errors(tmp_path):
    s = torch.rand(5, 3, 2)
    with pytest.raises(ValueError, match="one prompt"):
        plot_scalings(torch.rand(2, 5, 3, 2), tmp_path / "x.png")
    with pytest.raises(ValueError, match="shape"):
        plot_scalings(torch.rand(5, 2), tmp_path / "x.png")
    with pytest.raises(ValueError, match="4 tokens"):
        plot_scalings(s, tmp_path / "x.png", tokens=["a"] * 4)
    with pytest.raises(ValueError, match="expert names"):
        plot_scalings(s, tmp_path / "x.png", expert_names=["a"])
    with pytest.raises(ValueError, match="out of range"):
        plot_scalings(s, tmp_path / "x.png", layers=[3])
    assert not (tmp_path / "x.png").exists()


def test_long_token_labels_are_cut(tmp_path):
    fig = scalings_figure(torch.rand(3, 1, 2), tokens=["a" * 40, "\n", " b"])
    try:
        labels = [t.get_text() for t in _panels(fig)[0].get_yticklabels()]
        assert len(labels[0]) <= 14 and labels[0].endswith("…")
        assert labels[1] == "\\n"  # a newline, escaped
        assert labels[2] == "·b"
    finally:
        plt.close(fig)


def test_cli_xlora_plot(plot_env, tmp_path, capsys):
    model = _xlora(plot_env, layerwise_scalings=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "xlora")
    out = tmp_path / "cli" / "heat.png"
    code = main(["xlora-plot", "--adapter", str(tmp_path / "xlora"), "--prompt", "to be or not to be", "--out",
                 str(out), "--layers", "0,2"])
    printed = capsys.readouterr().out
    assert code == 0
    _assert_png(out)
    assert "6 tokens, 6 X-LoRA layers" in printed and "shakespeare" in printed and str(out) in printed

    # --base given explicitly (the config's path is not needed)
    base_dir, _ = plot_env
    code = main(["xlora-plot", "--adapter", str(tmp_path / "xlora"), "--base", str(base_dir), "--prompt", "the sea",
                 "--out", str(tmp_path / "b.png")])
    assert code == 0
    _assert_png(tmp_path / "b.png")


def test_cli_xlora_plot_rejects_other_adapters(plot_env, tmp_path):
    _, experts = plot_env
    with pytest.raises(SystemExit, match="not an X-LoRA model"):
        main(["xlora-plot", "--adapter", experts["shakespeare"], "--prompt", "x", "--out", str(tmp_path / "x.png")])


def test_cli_resolves_gguf_bases(tmp_path):
    from peftkit.cli.xlora_plot import resolve_base

    (tmp_path / "m.gguf").write_bytes(b"")
    assert resolve_base(str(tmp_path / "m.gguf"), None) == (str(tmp_path), "m.gguf")
    assert resolve_base(str(tmp_path), None) == (str(tmp_path), "m.gguf")  # a folder with one .gguf, no config.json
    assert resolve_base("some/folder", "x.gguf") == ("some/folder", "x.gguf")
    (tmp_path / "config.json").write_text("{}")
    assert resolve_base(str(tmp_path), None) == (str(tmp_path), None)
    assert resolve_base("org/model", None) == ("org/model", None)
