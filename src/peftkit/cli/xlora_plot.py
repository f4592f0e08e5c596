"""``peftkit xlora-plot``: heat map of a saved X-LoRA model's per-token expert weights for one prompt.

    peftkit xlora-plot --adapter out/xlora --prompt "To be, or not to be" --out scalings.png
    peftkit xlora-plot --adapter out/xlora --prompt "..." --out s.png --base path/to/model.gguf
    peftkit xlora-plot --adapter out/xlora --prompt "..." --out s.png --base folder --gguf-file model.gguf

The base model is ``--base`` or else the adapter config's ``base_model_name_or_path``: a model
folder or Hub id (read from the local cache, offline), a ``.gguf`` file, or a folder with
``--gguf-file`` (de-quantized by transformers; needs ``pip install gguf``). A folder without
``config.json`` that holds exactly one ``.gguf`` file is read as that file. The tokenizer is the
base's unless ``--tokenizer`` names another.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("xlora-plot", help="Heat map of a saved X-LoRA model's per-token expert weights for a prompt.")
    p.add_argument("--adapter", required=True, help="folder of a saved X-LoRA model (save_pretrained)")
    p.add_argument("--prompt", required=True, help="the text whose tokens are plotted")
    p.add_argument("--out", default="xlora_scalings.png", help="image file to write (default xlora_scalings.png)")
    p.add_argument("--base", default=None,
                   help="base model: folder, Hub id or .gguf file (default: the config's base_model_name_or_path)")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside the --base folder")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub id (default: the base's)")
    p.add_argument("--layers", default=None, help="comma-separated X-LoRA layer indices to draw (default: all "
                   "layers when the scalings are layerwise, else one panel)")
    p.add_argument("--title", default=None)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p


def resolve_base(base: str, gguf_file: str | None) -> tuple[str, str | None]:
    """(folder or Hub id, GGUF file name or None) for a ``--base`` / ``--gguf-file`` pair."""
    if gguf_file:
        return base, gguf_file
    if base.endswith(".gguf") and os.path.isfile(base):
        folder, name = os.path.split(os.path.abspath(base))
        return folder, name
    if os.path.isdir(base) and not os.path.isfile(os.path.join(base, "config.json")):
        found = sorted(f for f in os.listdir(base) if f.endswith(".gguf"))
        if len(found) == 1:
            return base, found[0]
    return base, None


def run_xlora_plot(args: argparse.Namespace) -> int:
    import torch
    import transformers

    from ..config import PeftConfig
    from ..methods.xlora.plot import plot_scalings, scalings_for_prompt
    from ..peft_model import PeftModel
    from ..types import PeftType

    if args.threads:
        torch.set_num_threads(args.threads)
    config = PeftConfig.from_pretrained(args.adapter)
    if config.peft_type != PeftType.XLORA.value:
        raise SystemExit(f"xlora-plot: {args.adapter} holds a {config.peft_type} adapter, not an X-LoRA model.")
    base = args.base or config.base_model_name_or_path
    if not base:
        raise SystemExit("xlora-plot: the adapter config names no base model (base_model_name_or_path): pass --base.")
    folder, gguf = resolve_base(base, args.gguf_file)
    extra = {"gguf_file": gguf} if gguf else {}
    task = config.task_type.value if hasattr(config.task_type, "value") else config.task_type
    auto = getattr(transformers, _AUTO_CLASSES.get(str(task), "AutoModelForCausalLM"))
    print(f"base: {folder}{' (' + gguf + ')' if gguf else ''}; {auto.__name__}", flush=True)
    model = auto.from_pretrained(folder, dtype=torch.float32, **extra)
    if args.tokenizer:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **extra)
    model = PeftModel.from_pretrained(model, args.adapter)
    layers = [int(x) for x in args.layers.split(",") if x.strip()] if args.layers else None

    tokens, scalings = scalings_for_prompt(model, tokenizer, args.prompt)
    names = list(model.base_model.expert_names)
    path = plot_scalings(scalings, args.out, tokens=tokens, expert_names=names, layers=layers,
                         title=args.title or f"X-LoRA scalings: {args.prompt[:60]}")
    seq, n_layers, _ = scalings.shape
    mean = scalings.mean(dim=(0, 1))
    print(f"{seq} tokens, {n_layers} X-LoRA layers; mean weight per expert: "
          + ", ".join(f"{n} {float(m):.3f}" for n, m in zip(names, mean)))
    print(f"heat map written to {path}")
    return 0
