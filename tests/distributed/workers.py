"""Two-process training runs (gloo, CPU) started by the tests in this folder, and their single-process reference.

Each rank trains on its half of one global batch; with the same number of tokens per rank, the
averaged gradients of DDP and FSDP2 are the gradients of the global batch, so the adapters must
match a one-process run on the whole batch.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import peftkit
from tests.models import tiny_llama

WORLD = 2
STEPS = 3
MODES = ("ddp", "fsdp2")
METHODS = ("lora", "shira")


def make_model(method: str) -> peftkit.PeftModel:
    base = tiny_llama()
    torch.manual_seed(1)
    if method == "lora":
        config = peftkit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                                    task_type="CAUSAL_LM")
    else:
        config = peftkit.ShiraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    return peftkit.get_peft_model(base, config)


def global_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 64, (2 * WORLD, 12), generator=g) for _ in range(STEPS)]


def probe() -> torch.Tensor:
    return torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(4))


def train(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for ids in batches:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def reference_state(method: str) -> dict[str, torch.Tensor]:
    """The adapter after a one-process run on the global batches."""
    model = make_model(method)
    train(model, global_batches())
    return peftkit.get_peft_model_state_dict(model)


def shard(model: peftkit.PeftModel, mode: str) -> torch.nn.Module:
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model.get_base_model().model.layers:  # frozen base and trainable adapters in each group
        fully_shard(layer)
    fully_shard(model)
    return model


def run(rank: int, mode: str, method: str, out: str) -> None:
    model = make_model(method)
    wrapped = shard(model, mode)
    local = [ids[rank * 2 : (rank + 1) * 2] for ids in global_batches()]
    train(wrapped, local)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if mode == "fsdp2":
        assert all(type(p).__name__ == "DTensor" for p in trainable)  # sharded: saving must gather
    folder = os.path.join(out, f"{mode}-{method}")
    model.save_pretrained(folder)  # every rank gathers, rank 0 writes
    dist.barrier()
    assert os.path.isfile(os.path.join(folder, "adapter_model.safetensors"))
    saved = peftkit.get_peft_model_state_dict(model)

    # loading back into the sharded model (what Trainer's resume does) puts each rank's shard in place
    with torch.no_grad():
        for p in trainable:
            p.zero_()
    model.load_adapter(folder, adapter_name="default", is_trainable=True)
    for key, value in peftkit.get_peft_model_state_dict(model).items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)
    loaded = peftkit.PeftModel.from_pretrained(tiny_llama(), folder).eval()
    with torch.no_grad():
        logits = loaded(input_ids=probe()).logits
    every = [torch.empty_like(logits) for _ in range(WORLD)]
    dist.all_gather(every, logits)
    for other in every:
        torch.testing.assert_close(other, logits, rtol=0, atol=0)
    torch.save(logits, os.path.join(folder, f"logits-rank{rank}.pt"))


def join_group(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one host: bind to loopback, not whatever the hostname names
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)


def probe_member(rank: int, init_file: str, out: str) -> None:
    """One all_reduce: can two local processes form a gloo group here at all?"""
    join_group(rank, init_file)
    try:
        t = torch.ones(1)
        dist.all_reduce(t)
        assert t.item() == WORLD
    finally:
        dist.destroy_process_group()


def worker(rank: int, init_file: str, out: str) -> None:
    join_group(rank, init_file)
    try:
        for mode in MODES:
            for method in METHODS:
                run(rank, mode, method, out)
    finally:
        dist.destroy_process_group()


def main(out: str, probe: bool = False) -> None:
    """Both ranks on ``out`` (or the probe alone); the tests start this in a fresh interpreter."""
    import torch.multiprocessing as mp

    mp.spawn(probe_member if probe else worker, args=(os.path.join(out, "init"), out), nprocs=WORLD, join=True)


if __name__ == "__main__":
    import sys

    main(sys.argv[1], probe="--probe" in sys.argv[2:])
