"""LoRA and SHiRA train under DDP and FSDP2 on 2 CPU processes (gloo) like one process on the global batch;
the adapter saved from the sharded model loads in one process and in PEFT with the same outputs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.testing import assert_close

from . import workers

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


def launch(out: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -m tests.distributed.workers OUT [args]``: the two ranks, from a fresh interpreter."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return subprocess.run(
        [sys.executable, "-m", "tests.distributed.workers", out, *args], cwd=root, check=False,
        capture_output=True, text=True, timeout=timeout,
    )


def gloo_unusable(out: str) -> str | None:
    """Why two local processes cannot form a gloo group here (a sandbox without loopback TCP), or None."""
    try:
        done = launch(out, "--probe", timeout=120)
    except subprocess.TimeoutExpired:
        return "a 2-process gloo all_reduce did not finish in 120 s"
    if done.returncode == 0:
        return None
    tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
    return f"a 2-process gloo all_reduce failed (exit {done.returncode}): {tail}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> str:
    why = gloo_unusable(str(tmp_path_factory.mktemp("probe")))
    if why:
        pytest.skip(f"this machine cannot run torch.distributed on loopback: {why}")
    killed = []
    for _ in range(2):
        out = str(tmp_path_factory.mktemp("dist"))
        done = launch(out)
        if done.returncode == 0:
            return out
        log = (done.stderr or done.stdout).strip()
        if "ProcessRaisedException" in log or "terminated with signal" not in log:
            pytest.fail(f"a rank failed:\n{log[-4000:]}")  # a Python error in the training or checks: a real failure
        killed.append(log.splitlines()[-1])
    # both attempts lost a rank to a signal before any Python error (seen once in a sandbox: gloo's C++
    # threads aborting with "terminate called without an active exception"): the machine, not the code
    pytest.skip(f"gloo ranks were killed by a signal twice: {killed}")


@pytest.mark.parametrize("method", workers.METHODS)
@pytest.mark.parametrize("mode", workers.MODES)
def test_sharded_training_matches_one_process(runs, mode, method):
    folder = os.path.join(runs, f"{mode}-{method}")
    assert sorted(f for f in os.listdir(folder) if not f.startswith("logits")) == [
        "adapter_config.json", "adapter_model.safetensors"
    ]
    saved = load_file(os.path.join(folder, "adapter_model.safetensors"))
    ref = workers.reference_state(method)
    assert saved.keys() == ref.keys()
    untrained = peftkit_state(method)
    for key, value in ref.items():
        assert tuple(saved[key].shape) == tuple(value.shape), key  # full tensors, not one rank's shard
        assert_close(saved[key], value, rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    assert any(not torch.equal(ref[k], untrained[k]) for k in ref if k in untrained and ref[k].is_floating_point())


def peftkit_state(method: str) -> dict[str, torch.Tensor]:
    import peftkit

    return peftkit.get_peft_model_state_dict(workers.make_model(method))


@pytest.mark.parametrize("method", workers.METHODS)
@pytest.mark.parametrize("mode", workers.MODES)
def test_saved_adapter_loads_in_one_process_and_in_peft(runs, mode, method):
    from peft import PeftModel as PeftPeftModel

    import peftkit

    folder = os.path.join(runs, f"{mode}-{method}")
    rank0 = torch.load(os.path.join(folder, "logits-rank0.pt"))
    rank1 = torch.load(os.path.join(folder, "logits-rank1.pt"))
    assert torch.equal(rank0, rank1)
    with torch.no_grad():
        mine = peftkit.PeftModel.from_pretrained(workers.tiny_llama(), folder).eval()(input_ids=workers.probe()).logits
        theirs = PeftPeftModel.from_pretrained(workers.tiny_llama(), folder).eval()(input_ids=workers.probe()).logits
        base = workers.tiny_llama().eval()(input_ids=workers.probe()).logits
    assert_close(mine, rank0, rtol=0, atol=0)
    assert_close(theirs, mine, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mine, base, atol=1e-4)  # the adapter does something
