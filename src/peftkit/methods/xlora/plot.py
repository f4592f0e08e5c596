"""Heat maps of X-LoRA's per-token expert weights (scalings) for one prompt.

    tokens, scalings = scalings_for_prompt(model, tokenizer, "To be, or not to be")
    plot_scalings(scalings, "scalings.png", tokens=tokens, expert_names=model.base_model.expert_names)

``scalings`` is what ``get_latest_scalings()`` returns for a batch of one: (1, seq, n_layers,
n_experts), or (seq, n_layers, n_experts). Each panel is a tokens × experts grid (a row per token,
a column per expert). When the classifier predicts one set of weights per layer
(``layerwise_scalings=True``) the layers differ and each gets its own panel, on a grid; otherwise
every layer holds the same weights and one panel shows them. "Layer" means X-LoRA's layer index:
the position among the adapted modules (e.g. q_proj and v_proj of every block), the index of the
scalings' third dimension, not a transformer block.

matplotlib is imported only when a plot is drawn (``pip install matplotlib``).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch

MAX_PANELS = 16  # layerwise scalings of a deep model: this many evenly spaced layers by default
MAX_LABEL = 14  # longer token labels are cut to this many characters
MAX_TOKEN_LABELS = 96  # longer prompts get every k-th token labelled


def scalings_for_prompt(model: Any, tokenizer: Any, text: str, add_special_tokens: bool = True) -> tuple[list[str], torch.Tensor]:
    """One forward of ``text`` (eval mode, no gradients); returns (tokens, scalings (seq, n_layers, n_experts)).

    ``model`` is an X-LoRA ``PeftModel`` (or ``XLoraModel``); ``tokens`` are the prompt's tokens,
    each decoded on its own. The model's train/eval mode is restored afterwards.
    """
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=add_special_tokens)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(**enc, use_cache=False)
    finally:
        model.train(was_training)
    scalings = model.get_latest_scalings()
    if scalings is None:
        raise ValueError("The model predicted no scalings: is it an X-LoRA model with its experts enabled?")
    ids = enc["input_ids"][0].tolist()
    tokens = [tokenizer.decode([i]) for i in ids]
    return tokens, scalings[0].detach().float().cpu().contiguous()


def is_layerwise(scalings: torch.Tensor) -> bool:
    """Whether (seq, n_layers, n_experts) scalings differ from one layer to another."""
    s = _as_3d(scalings)
    return bool(s.shape[1] > 1 and not torch.equal(s, s[:, :1].expand_as(s)))


def scalings_figure(
    scalings: torch.Tensor,
    tokens: Sequence[str] | None = None,
    expert_names: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    title: str | None = None,
    max_panels: int = MAX_PANELS,
) -> Any:
    """The matplotlib ``Figure`` that ``plot_scalings`` saves (arguments as there).

    Each heat-map axes is labelled ``"layer <i>"`` (``ax.get_label()``), so the panels can be
    found among the figure's axes (the colorbar's axes is the other one).
    """
    plt = _pyplot()
    s = _as_3d(scalings)
    seq, _, n_experts = s.shape
    if tokens is not None and len(tokens) != seq:
        raise ValueError(f"plot_scalings: {len(tokens)} tokens for scalings over {seq} positions.")
    if expert_names is not None and len(expert_names) != n_experts:
        raise ValueError(f"plot_scalings: {len(expert_names)} expert names for {n_experts} experts.")
    panels = _panels(s, layers, max_panels)
    token_labels = [_label(t) for t in tokens] if tokens is not None else [str(i) for i in range(seq)]
    experts = list(expert_names) if expert_names is not None else [f"expert {i}" for i in range(n_experts)]
    shared = len(panels) == 1 and not is_layerwise(s)

    ncols = min(len(panels), 4)
    nrows = math.ceil(len(panels) / ncols)
    panel_w = max(1.6, 0.55 * n_experts + 0.9)
    panel_h = min(max(2.0, 0.2 * seq + 0.8), 14.0)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(1.4 + ncols * panel_w + 1.0, nrows * panel_h + 0.9), squeeze=False, sharey=True
    )
    vmax = float(s.max()) if s.numel() else 1.0
    vmin = min(0.0, float(s.min())) if s.numel() else 0.0
    step = max(1, math.ceil(seq / MAX_TOKEN_LABELS))
    image = None
    for k, ax in enumerate(axes.flat):
        if k >= len(panels):
            ax.set_visible(False)
            continue
        layer = panels[k]
        image = ax.imshow(s[:, layer, :].numpy(), aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax,
                          interpolation="nearest")
        ax.set_label(f"layer {layer}")
        ax.set_title("all layers" if shared else f"layer {layer}", fontsize=9)
        ax.set_xticks(range(n_experts))
        ax.set_xticklabels(experts, rotation=45 if n_experts > 2 or max(map(len, experts)) > 8 else 0,
                           ha="right" if n_experts > 2 else "center", fontsize=8)
        ax.set_yticks(range(0, seq, step))
        ax.set_yticklabels(token_labels[::step], fontsize=7)
    fig.suptitle(title or "X-LoRA scalings per token", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.9, 0.97))
    if image is not None:
        cax = fig.add_axes((0.92, 0.12, 0.018, 0.76))
        fig.colorbar(image, cax=cax, label="expert weight")
    return fig


def plot_scalings(
    scalings: torch.Tensor,
    path: str | os.PathLike,
    tokens: Sequence[str] | None = None,
    expert_names: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    title: str | None = None,
    max_panels: int = MAX_PANELS,
    dpi: int = 120,
) -> str:
    """Draw one prompt's scalings as a heat map and save it (PNG, or any format matplotlib knows from ``path``).

    Args:
        scalings: (seq, n_layers, n_experts) or (1, seq, n_layers, n_experts), e.g.
            ``model.get_latest_scalings()`` after a forward of one prompt.
        path: the image file to write (its folder is created).
        tokens: the prompt's tokens, one label per position (long ones are cut); default: positions.
        expert_names: one name per expert, e.g. ``model.base_model.expert_names``.
        layers: the layers to draw, one panel each. Default: every layer when the scalings differ
            across layers (at most ``max_panels``, evenly spaced), else a single panel.
        title: the figure's title.

    Returns:
        ``path`` as a string.
    """
    fig = scalings_figure(scalings, tokens, expert_names, layers, title, max_panels)
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    try:
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
    finally:
        _pyplot().close(fig)
    return path


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("Plotting X-LoRA scalings needs matplotlib: pip install matplotlib") from err
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def _as_3d(scalings: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(scalings).detach()
    if s.dim() == 4:
        if s.shape[0] != 1:
            raise ValueError(f"plot_scalings draws one prompt: got a batch of {s.shape[0]} (index it: scalings[i]).")
        s = s[0]
    if s.dim() != 3:
        raise ValueError(f"plot_scalings expects (seq, n_layers, n_experts) or (1, seq, n_layers, n_experts) scalings, "
                         f"got shape {tuple(s.shape)}.")
    return s.float().cpu()


def _panels(s: torch.Tensor, layers: Sequence[int] | None, max_panels: int) -> list[int]:
    n_layers = s.shape[1]
    if layers is not None:
        chosen = [int(i) for i in layers]
        bad = [i for i in chosen if not -n_layers <= i < n_layers]
        if bad or not chosen:
            raise ValueError(f"plot_scalings: layers {bad or chosen} out of range for {n_layers} layers.")
        return [i % n_layers for i in chosen]
    if not is_layerwise(s):
        return [0]
    if n_layers <= max_panels:
        return list(range(n_layers))
    if max_panels < 2:
        return [0]
    return sorted({round(i * (n_layers - 1) / (max_panels - 1)) for i in range(max_panels)})


def _label(token: str) -> str:
    text = str(token).replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    if not text.strip():
        text = repr(text)
    elif text != text.strip():
        text = text.replace(" ", "·")
    return text if len(text) <= MAX_LABEL else text[: MAX_LABEL - 1] + "…"
