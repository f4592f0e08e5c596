"""``peftkit fusion``: do two sparse SHiRA adapters fuse with less loss than two LoRA adapters?

all-MiniLM-L6-v2 learns two tasks, each with its own adapter: spam detection (SMS Spam
Collection) and sentiment (Sentiment Labelled Sentences; both UCI, CC BY 4.0, shipped in
``peftkit/data``). Each method gets the same parameter budget (SHiRA r·(m+n) entries = LoRA
rank r, on the same layers). The two adapters of a method are then fused into one by
``add_weighted_adapter`` (weights 1 and 1: the exact sum of the two weight changes for both
methods, LoRA through ``cat``), and each task is evaluated again with the fused adapter and its
own classifier head. Each task keeps its own classifier head (trained with its adapter and swapped in for its
evaluation), so the table isolates what fusion does to the encoder: the accuracy of each task
before and after fusion.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from importlib import resources

import torch

from .demo import load_base, load_sms_spam, model_path, predict, split, train_steps

SENTIMENT_FILES = ("amazon_cells_labelled.txt", "imdb_labelled.txt", "yelp_labelled.txt")
TARGETS = ["query", "key", "value", "dense"]


def load_sentiment() -> list[tuple[str, int]]:
    """(sentence, label) pairs; label 1 is positive."""
    rows = []
    for name in SENTIMENT_FILES:
        text = resources.files("peftkit").joinpath("data", "sentiment", name).read_text(encoding="utf-8")
        for line in text.splitlines():
            sentence, _, label = line.rpartition("\t")
            if sentence and label.strip() in ("0", "1"):
                rows.append((sentence, int(label)))
    return rows


def make_config(method: str, r: int, seed: int):
    """The encoder adapter; each task's classifier head is trained beside it and kept apart."""
    from .. import LoraConfig, ShiraConfig

    if method == "shira":
        return ShiraConfig(r=r, target_modules=TARGETS, random_seed=seed)
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS)


def accuracy(model, tok, rows) -> float:
    logits, labels = predict(model, tok, rows)
    return (logits.argmax(-1) == labels).float().mean().item()


def train(model, tok, rows, steps: int, lr: float, batch_size: int, seed: int, desc: str) -> None:
    train_steps(model, tok, rows, steps, batch_size, lr, seed, desc, weight_decay=0.0)


def shira_overlap(model, a: str, b: str) -> float:
    """Fraction of adapter ``a``'s positions that ``b`` also trains (all layers)."""
    shared = total = 0
    for _, layer in model.base_model.adapter_layers():
        ia, ib = layer.shira_indices[a].long(), layer.shira_indices[b].long()
        cols = layer.base_layer.weight.shape[1]
        fa, fb = ia[0] * cols + ia[1], ib[0] * cols + ib[1]
        shared += int(torch.isin(fa, fb).sum())
        total += fa.numel()
    return shared / max(total, 1)


def run_method(method: str, args, tok, tasks: dict) -> dict:
    from .. import get_peft_model

    names = list(tasks)
    base = load_base(model_path(), args.seed)
    head = base.classifier
    initial_head = {k: v.clone() for k, v in head.state_dict().items()}
    model = get_peft_model(base, make_config(method, args.r, args.seed + 1), adapter_name=names[0])
    for i, name in enumerate(names[1:], start=2):
        model.add_adapter(name, make_config(method, args.r, args.seed + i))
    adapter_params = None
    alone, heads = {}, {}
    for name, (train_rows, test_rows) in tasks.items():
        model.set_adapter(name)
        adapter_params = adapter_params or model.get_nb_trainable_parameters()[0]
        head.load_state_dict(initial_head)
        head.requires_grad_(True)
        lr = args.shira_lr if method == "shira" else args.lora_lr
        train(model, tok, train_rows, args.steps, lr, args.batch_size, args.seed, f"{method} on {name}")
        head.requires_grad_(False)
        heads[name] = {k: v.clone() for k, v in head.state_dict().items()}
        alone[name] = accuracy(model, tok, test_rows)
    combo = "linear" if method == "shira" else "cat"
    model.add_weighted_adapter(names, [1.0] * len(names), "fused", combination_type=combo)
    model.set_adapter("fused")
    fused = {}
    for name, (_, test_rows) in tasks.items():
        head.load_state_dict(heads[name])
        fused[name] = accuracy(model, tok, test_rows)
    overlap = shira_overlap(model, names[0], names[1]) if method == "shira" else None
    return {"trainable": adapter_params, "alone": alone, "fused": fused, "overlap": overlap}


def run_fusion(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(model_path())
    tasks = {"spam": split(load_sms_spam(), 0.2, args.seed), "sentiment": split(load_sentiment(), 0.2, args.seed)}
    if args.eval_limit:  # a random subset: the split lists the test set class by class
        tasks = {k: (tr, random.Random(args.seed).sample(te, min(args.eval_limit, len(te)))) for k, (tr, te) in tasks.items()}
    for name, (tr, te) in tasks.items():
        print(f"{name}: {len(tr)} training / {len(te)} held-out examples")
    start = time.perf_counter()
    results = {m: run_method(m, args, tok, tasks) for m in args.methods.split(",")}
    elapsed = time.perf_counter() - start

    print(f"\nFusion of two task adapters (all-MiniLM-L6-v2, {args.steps} steps per task, r={args.r}, "
          f"{elapsed:.0f} s): held-out accuracy with each task's own adapter, then with the fused one")
    print("| method | adapter params | task | own adapter | fused | change |")
    print("|---|---|---|---|---|---|")
    for method, res in results.items():
        for name in tasks:
            a, f = res["alone"][name], res["fused"][name]
            print(f"| {method} | {res['trainable']:,} | {name} | {a:.4f} | {f:.4f} | {f - a:+.4f} |")
    for method, res in results.items():
        mean_drop = sum(res["alone"][n] - res["fused"][n] for n in tasks) / len(tasks)
        extra = f"; positions shared by the two adapters: {res['overlap']:.2%}" if res["overlap"] is not None else ""
        print(f"{method}: mean accuracy lost by fusion {mean_drop:+.4f}{extra}")
    return 0
