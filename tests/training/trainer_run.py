"""One Trainer scenario, importable in-process and runnable in a subprocess (``python trainer_run.py DIR``).

Train a LoRA tiny Llama for 5 steps with a checkpoint every 3; then train a fresh model (other
adapter values) resuming from checkpoint-3. Both final adapters are written to DIR/final-*.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "--hide-peft" in sys.argv:
    sys.modules["peft"] = None  # before transformers is imported: it then sees no peft installed

import torch
from transformers import Trainer, TrainingArguments

import peftkit
from tests.models import tiny_llama


def lora_model(seed: int) -> peftkit.PeftModel:
    base = tiny_llama()
    torch.manual_seed(seed)
    config = peftkit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM",
                                init_lora_weights=False)
    return peftkit.get_peft_model(base, config)


def data() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    rows = [torch.randint(0, 64, (16,), generator=g) for _ in range(24)]
    return [{"input_ids": r, "labels": r.clone()} for r in rows]


def trainer(model: peftkit.PeftModel, out: str) -> Trainer:
    args = TrainingArguments(
        output_dir=out, max_steps=5, per_device_train_batch_size=4, learning_rate=1e-2, lr_scheduler_type="linear",
        save_strategy="steps", save_steps=3, report_to=[], use_cpu=True, seed=11, logging_steps=1,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=data())


def main(out: str) -> None:
    full = trainer(lora_model(seed=1), os.path.join(out, "full"))
    full.train()
    full.model.save_pretrained(os.path.join(out, "final-full"))
    resumed = trainer(lora_model(seed=2), os.path.join(out, "resumed"))
    resumed.train(resume_from_checkpoint=os.path.join(out, "full", "checkpoint-3"))
    resumed.model.save_pretrained(os.path.join(out, "final-resumed"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    if "--hide-peft" in sys.argv:
        from transformers.utils import is_peft_available

        assert not is_peft_available()
    main(sys.argv[1])
