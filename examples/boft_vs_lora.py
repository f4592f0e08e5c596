"""BOFT next to LoRA (and OFT) on a real task: all-MiniLM-L6-v2 as an SMS spam classifier.

Every method runs the same fine-tune as ``peftkit demo``: the same stratified split, the same
seed (so the same classifier-head init and the same batches), the same steps, batch size and
max_length 64, each with its own learning rate (``peftkit.cli.demo.DEFAULT_LR``). The table
gives trainable parameters, accuracy and spam F1 on the held-out split before and after
training, the median step time and the total training time. One training runs at a time.

    python examples/boft_vs_lora.py                # 200 steps, all methods, about 5 min on 2 cores
    python examples/boft_vs_lora.py --steps 50 --methods lora,boft2
    make example-boft EXAMPLE_ARGS="--steps 100"
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from peftkit import get_peft_model  # noqa: E402
from peftkit.cli.demo import (  # noqa: E402
    DEFAULT_LR,
    load_base,
    make_config,
    predict,
    scores,
    setup,
    train_steps,
)

# name in the table -> (demo method, BOFT butterfly factor, description)
RUNS = {
    "lora": ("lora", 2, "LoRA r=8, alpha 16"),
    "boft1": ("boft", 1, "BOFT block 8, factor 1"),
    "boft2": ("boft", 2, "BOFT block 8, factor 2"),
    "oft": ("oft", 2, "OFT block 32"),
}


def run_one(name: str, path: str, tok, train: list, test: list, args: argparse.Namespace) -> dict:
    method, factor, label = RUNS[name]
    lr = getattr(args, f"lr_{method}") or DEFAULT_LR[method]
    model = get_peft_model(load_base(path, args.seed), make_config(method, boft_factor=factor))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    before = scores(*predict(model, tok, test))
    times: list[float] = []
    total = train_steps(model, tok, train, args.steps, args.batch_size, lr, args.seed, f"{name} (lr {lr:g})", times)
    after = scores(*predict(model, tok, test))
    # The first steps include one-off work (allocator warm-up, lazy init); the median ignores them.
    return {"name": label, "lr": lr, "params": trainable, "before": before, "after": after,
            "step_ms": 1000 * statistics.median(times), "total_s": total}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(RUNS), help=f"comma-separated, from {', '.join(RUNS)}")
    parser.add_argument("--lr-lora", type=float, default=None, help=f"default {DEFAULT_LR['lora']:g}")
    parser.add_argument("--lr-boft", type=float, default=None, help=f"default {DEFAULT_LR['boft']:g}")
    parser.add_argument("--lr-oft", type=float, default=None, help=f"default {DEFAULT_LR['oft']:g}")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--eval-limit", type=int, default=0, help="evaluate on this many held-out messages (0: all)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    path, tok, train, test = setup(args)
    print(f"{args.steps} steps, batch {args.batch_size}, seed {args.seed}")

    results = [run_one(n, path, tok, train, test, args) for n in names]

    print()
    print("| method | lr | trainable params | accuracy before → after | spam F1 before → after "
          "| median step (ms) | train time (s) |")
    print("|---|---|---:|---|---|---:|---:|")
    for r in results:
        print(f"| {r['name']} | {r['lr']:g} | {r['params']:,} | {r['before'][0]:.4f} → {r['after'][0]:.4f} "
              f"| {r['before'][1]:.4f} → {r['after'][1]:.4f} | {r['step_ms']:.0f} | {r['total_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
