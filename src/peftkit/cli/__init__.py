"""The ``peftkit`` command: ``peftkit demo``, ``peftkit fusion``, ``peftkit inspect``, ``peftkit xlora-plot``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peftkit", description="Parameter-efficient fine-tuning, PEFT-compatible.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="LoRA fine-tune of all-MiniLM-L6-v2 on the SMS Spam Collection.")
    demo.add_argument("--method", default="lora", choices=["lora", "shira", "oft", "boft"], help="adapter method")
    demo.add_argument("--steps", type=int, default=150, help="optimiser steps (default 150)")
    demo.add_argument("--out", default="out/demo-adapter", help="where to save the adapter")
    demo.add_argument("--batch-size", type=int, default=16)
    demo.add_argument("--lr", type=float, default=None, help="learning rate (default: the method's, see demo.py)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    demo.add_argument("--eval-limit", type=int, default=0, help="evaluate on this many held-out messages (0: all)")

    fusion = sub.add_parser("fusion", help="Fuse two task adapters (SMS spam, sentiment): SHiRA next to LoRA.")
    fusion.add_argument("--methods", default="shira,lora", help="comma-separated: shira, lora")
    fusion.add_argument("--steps", type=int, default=150, help="optimiser steps per task (default 150)")
    fusion.add_argument("--r", type=int, default=8, help="LoRA rank; SHiRA trains r·(m+n) entries per layer")
    fusion.add_argument("--batch-size", type=int, default=16)
    fusion.add_argument("--lora-lr", type=float, default=3e-3)
    fusion.add_argument("--shira-lr", type=float, default=3e-3)
    fusion.add_argument("--seed", type=int, default=0)
    fusion.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    fusion.add_argument("--eval-limit", type=int, default=0, help="evaluate on this many held-out examples (0: all)")

    inspect = sub.add_parser("inspect", help="Show an adapter folder's config and tensors.")
    inspect.add_argument("path")

    from .xlora_plot import add_parser as add_xlora_plot

    add_xlora_plot(sub)

    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(args)
    if args.command == "fusion":
        from .fusion import run_fusion

        return run_fusion(args)
    if args.command == "xlora-plot":
        from .xlora_plot import run_xlora_plot

        return run_xlora_plot(args)
    from .inspect import run_inspect

    return run_inspect(args.path)


if __name__ == "__main__":
    sys.exit(main())
