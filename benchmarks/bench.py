#!/usr/bin/env python
"""peftkit vs HF PEFT on the same workloads, reported as ratios.

Each (case, library) pair runs in a fresh child process (this script with
``--child CASE LIB``) that imports only that library, so import side effects never mix
and the child's peak memory can be read (``ru_maxrss`` on CPU,
``torch.cuda.max_memory_allocated`` on CUDA). The parent interleaves the libraries
(the order alternates from round to round), pools the timed samples of all rounds and
reports medians and ratios ``peftkit / peft`` (and ``/ base`` where a base exists).

Models are transformers ``LlamaForCausalLM`` built from configs with random weights; no
network is used (``HF_HUB_OFFLINE=1``).

Usage::

    python benchmarks/bench.py                 # full run (~10 min on 2 CPU cores)
    python benchmarks/bench.py --quick         # CI smoke (~2 min)
    python benchmarks/bench.py --cases train_step,get_peft_model --json out.json
    python benchmarks/bench.py --device cuda   # on a GPU machine

Cases:
  train_step        LoRA r=16 on all linear layers of a 4-layer hidden-512 Llama, batch 4 x 128:
                    forward + backward + AdamW step. ``base`` is the frozen base model's
                    forward + backward with grad-requiring input embeddings (the work any
                    adapter step does anyway).
  get_peft_model    get_peft_model on a 24-layer Llama (fresh base per repeat, not timed).
  merge_and_unload  merge_and_unload on the 4-layer model, init_lora_weights=False.
  save_load         save_pretrained (timed), then PeftModel.from_pretrained(fresh base, dir).
  train_memory      peak memory of a child that builds the 4-layer model and runs 3 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

MARK = "@@BENCH_RESULT@@ "
CASES = ("train_step", "get_peft_model", "merge_and_unload", "save_load", "train_memory")
LIBS = ("peftkit", "peft")
BASE = "base"
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Model and batch sizes (the brief's workloads).
HIDDEN, INTERMEDIATE, HEADS, VOCAB = 512, 1376, 8, 8000
SMALL_LAYERS, BIG_LAYERS = 4, 24
BATCH, SEQ = 4, 128
RANK, ALPHA = 16, 32
MEMORY_STEPS = 3

# Per-child timed samples (and warm-up steps for train_step), full / quick.
DEFAULT_REPEATS = {
    "full": {"train_step": 5, "get_peft_model": 7, "merge_and_unload": 15, "save_load": 15},
    "quick": {"train_step": 2, "get_peft_model": 3, "merge_and_unload": 5, "save_load": 5},
}
DEFAULT_WARMUP = {"full": 2, "quick": 1}
DEFAULT_ROUNDS = {"full": 2, "quick": 1}

# Targets on the ratio peftkit / peft (None: reported, no target).
TARGETS = {
    "train_step": 0.95,
    "get_peft_model": 0.5,
    "merge_and_unload": 0.5,
    "save_pretrained": None,
    "from_pretrained": 1.0,
    "train_memory": 1.0,
}


# ============================================================================ child side
def _child_env_setup(threads: int) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _rss_mb() -> tuple[float, float]:
    """(current RSS, high-water mark) in MB from /proc, or (nan, ru_maxrss) elsewhere."""
    cur = hwm = float("nan")
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    cur = int(line.split()[1]) / 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) / 1024
    except OSError:
        pass
    if hwm != hwm:  # nan
        hwm = _maxrss_mb()
    return cur, hwm


def _maxrss_mb() -> float:
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1024 * 1024) if sys.platform == "darwin" else kb / 1024  # macOS reports bytes


def run_child(case: str, lib: str, args: argparse.Namespace) -> dict:
    _child_env_setup(args.threads)
    import warnings

    warnings.filterwarnings("ignore")
    t_import = time.perf_counter()
    import gc
    import shutil
    import tempfile

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    if lib == "peft":
        import peft as L
    elif lib == "peftkit":
        import peftkit as L
    elif lib == BASE:
        L = None
    else:
        raise SystemExit(f"unknown lib {lib!r}")
    import_s = time.perf_counter() - t_import

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    rss_after_import, _ = _rss_mb()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def clock() -> float:
        sync()
        return time.perf_counter()

    def build(layers: int, seed: int = 0) -> torch.nn.Module:
        cfg = LlamaConfig(
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=layers,
            num_attention_heads=HEADS,
            num_key_value_heads=HEADS,
            vocab_size=VOCAB,
            max_position_embeddings=max(SEQ, 256),
            use_cache=False,
            tie_word_embeddings=False,
        )
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
        return model.to(device)

    def lora_config(init: bool = True):
        return L.LoraConfig(
            r=RANK,
            lora_alpha=ALPHA,
            lora_dropout=0.0,
            target_modules=list(TARGET_MODULES),
            init_lora_weights=init,
            task_type="CAUSAL_LM",
        )

    def batch() -> torch.Tensor:
        g = torch.Generator().manual_seed(1234)
        return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g).to(device)

    def train_setup():
        """(step function, model) for this lib: a LoRA step, or the frozen base's fwd+bwd."""
        model = build(SMALL_LAYERS)
        ids = batch()
        if lib == BASE:
            model.requires_grad_(False)
            model.enable_input_require_grads()
            model.train()

            def step() -> float:
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                return loss.detach()

            return step, model
        model = L.get_peft_model(model, lora_config())
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step() -> float:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        return step, model

    out: dict = {"case": case, "lib": lib, "samples": {}, "info": {}}
    out["info"]["import_s"] = import_s
    out["info"]["version"] = getattr(L, "__version__", None) if L is not None else None
    samples = out["samples"]
    repeats = args.repeats

    if case == "train_step":
        step, model = train_setup()
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        out["info"]["trainable_params"] = n_train
        first = None
        for _ in range(args.warmup):
            loss = step()
            first = float(loss) if first is None else first
        times = []
        for _ in range(repeats):
            gc.collect()
            t0 = clock()
            loss = step()
            sync()
            times.append(time.perf_counter() - t0)
            first = float(loss) if first is None else first
        samples["train_step"] = times
        out["info"]["loss_first_step"] = first

    elif case == "train_memory":
        rss_before_build, _ = _rss_mb()
        step, model = train_setup()
        rss_after_build, hwm_after_build = _rss_mb()
        losses = [float(step()) for _ in range(MEMORY_STEPS)]
        out["info"].update(
            rss_after_import_mb=rss_after_import,
            rss_after_build_mb=rss_after_build,
            hwm_after_build_mb=hwm_after_build,
            losses=losses,
        )

    elif case == "get_peft_model":
        times = []
        for i in range(repeats):
            base = build(BIG_LAYERS, seed=i)
            cfg = lora_config()
            gc.collect()
            t0 = clock()
            pm = L.get_peft_model(base, cfg)
            sync()
            times.append(time.perf_counter() - t0)
            out["info"]["lora_layers"] = sum(1 for n, _ in pm.named_modules() if n.endswith("lora_A"))
            del pm, base
        samples["get_peft_model"] = times

    elif case == "merge_and_unload":
        times = []
        for i in range(repeats):
            pm = L.get_peft_model(build(SMALL_LAYERS, seed=i), lora_config(init=False))
            gc.collect()
            t0 = clock()
            merged = pm.merge_and_unload()
            sync()
            times.append(time.perf_counter() - t0)
            out["info"]["merged_type"] = type(merged).__name__
            del pm, merged
        samples["merge_and_unload"] = times

    elif case == "save_load":
        root = tempfile.mkdtemp(prefix="peftbench-")
        try:
            pm = L.get_peft_model(build(SMALL_LAYERS), lora_config(init=False))
            ref = {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}
            save_times = []
            for i in range(repeats):
                d = os.path.join(root, f"save{i}")
                gc.collect()
                t0 = clock()
                pm.save_pretrained(d)
                save_times.append(time.perf_counter() - t0)
            src = os.path.join(root, "save0")
            out["info"]["saved_files"] = sorted(os.listdir(src))
            del pm
            load_times = []
            for i in range(repeats):
                base = build(SMALL_LAYERS)
                gc.collect()
                t0 = clock()
                loaded = L.PeftModel.from_pretrained(base, src)
                sync()
                load_times.append(time.perf_counter() - t0)
                if i == 0:  # check the load really restored the adapter
                    got = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
                    out["info"]["load_ok"] = set(got) == set(ref) and all(
                        torch.equal(got[n].detach(), ref[n]) for n in ref
                    )
                del loaded, base
            samples["save_pretrained"] = save_times
            samples["from_pretrained"] = load_times
        finally:
            shutil.rmtree(root, ignore_errors=True)
    else:
        raise SystemExit(f"unknown case {case!r}")

    sync()
    out["peak_rss_mb"] = _maxrss_mb()
    if cuda:
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["info"]["device_name"] = torch.cuda.get_device_name()
    return out


# ============================================================================ parent side
def _libs_for(case: str, quick: bool) -> list[str]:
    if case == "train_step":
        return [*LIBS, BASE]
    if case == "train_memory":
        return list(LIBS) if quick else [*LIBS, BASE]
    return list(LIBS)


def _spawn(case: str, lib: str, args: argparse.Namespace, repeats: int) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child", case, lib,
        "--device", args.device,
        "--threads", str(args.threads),
        "--repeats", str(repeats),
        "--warmup", str(args.warmup),
    ]
    env = dict(os.environ)
    _child_env_setup_into(env, args.threads)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.child_timeout)
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            res = json.loads(line[len(MARK):])
            res["wall_s"] = wall
            return res
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
    raise RuntimeError(f"child {case}/{lib} failed (rc={proc.returncode}):\n{tail}")


def _child_env_setup_into(env: dict, threads: int) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONWARNINGS", "ignore")


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "—"
    if s >= 1:
        return f"{s:.3f} s"
    return f"{s * 1e3:.1f} ms"


def _fmt_ratio(r: float | None) -> str:
    return "—" if r is None else f"{r:.3f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarise(children: list[dict], device: str) -> list[dict]:
    """One row per reported metric: medians of pooled samples, ratios, target status."""
    pooled: dict[str, dict[str, list[float]]] = {}
    peaks: dict[str, dict[str, list[float]]] = {}
    for ch in children:
        for metric, xs in ch["samples"].items():
            pooled.setdefault(metric, {}).setdefault(ch["lib"], []).extend(xs)
        if ch["case"] == "train_memory":
            key = "cuda_peak_mb" if device == "cuda" else "peak_rss_mb"
            peaks.setdefault("train_memory", {}).setdefault(ch["lib"], []).append(ch[key])
    rows = []
    order = ["train_step", "get_peft_model", "merge_and_unload", "save_pretrained", "from_pretrained"]
    for metric in order:
        if metric not in pooled:
            continue
        by = pooled[metric]
        med = {lib: _median(xs) for lib, xs in by.items()}
        rows.append(_row(metric, "time", med, {lib: len(xs) for lib, xs in by.items()}, by))
    if "train_memory" in peaks:
        by = peaks["train_memory"]
        med = {lib: _median(xs) for lib, xs in by.items()}
        rows.append(_row("train_memory", "memory", med, {lib: len(xs) for lib, xs in by.items()}, by))
    return rows


def _row(metric: str, kind: str, med: dict, n: dict, raw: dict) -> dict:
    k, p, b = med.get("peftkit"), med.get("peft"), med.get(BASE)
    ratio = _ratio(k, p)
    target = TARGETS.get(metric)
    return {
        "case": metric,
        "kind": kind,
        "peftkit": k,
        "peft": p,
        "base": b,
        "ratio": ratio,
        "peftkit_over_base": _ratio(k, b),
        "peft_over_base": _ratio(p, b),
        "target": target,
        "met": None if target is None or ratio is None else ratio <= target,
        "n": n,
        "samples": raw,
    }


def markdown(rows: list[dict], device: str) -> str:
    mem_label = "peak CUDA alloc" if device == "cuda" else "peak RSS"
    lines = [
        "| case | peftkit | peft | ratio peftkit/peft | target | base | peftkit/base | peft/base |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kind"] == "memory":
            name = f"train_memory ({mem_label}, {MEMORY_STEPS} steps)"
            fmt = lambda v: "—" if v is None else f"{v:.0f} MB"  # noqa: E731
        else:
            name = r["case"]
            fmt = _fmt_time
        tgt = "—" if r["target"] is None else f"≤ {r['target']:.2f} " + ("(met)" if r["met"] else "(MISSED)")
        lines.append(
            f"| {name} | {fmt(r['peftkit'])} | {fmt(r['peft'])} | {_fmt_ratio(r['ratio'])} | {tgt} | "
            f"{fmt(r['base'])} | {_fmt_ratio(r['peftkit_over_base'])} | {_fmt_ratio(r['peft_over_base'])} |"
        )
    return "\n".join(lines)


def notes(rows: list[dict], children: list[dict], device: str) -> str:
    out = []
    by = {r["case"]: r for r in rows}
    ts = by.get("train_step")
    if ts and ts["base"] and ts["peftkit"] and ts["peft"]:
        ok, op = ts["peftkit"] - ts["base"], ts["peft"] - ts["base"]
        out.append(
            f"- train_step cost above the frozen base: peftkit {ok * 1e3:+.1f} ms "
            f"({ok / ts['base'] * 100:+.1f}%), peft {op * 1e3:+.1f} ms ({op / ts['base'] * 100:+.1f}%)."
        )
        losses = {c["lib"]: c["info"].get("loss_first_step") for c in children if c["case"] == "train_step"}
        out.append("- first-step loss (LoRA B=0, so all three should agree): "
                   + ", ".join(f"{k}={v:.5f}" for k, v in losses.items() if v is not None))
    for name in ("train_step", "get_peft_model", "merge_and_unload", "save_pretrained", "from_pretrained"):
        r = by.get(name)
        if not r:
            continue
        spreads = []
        for lib, xs in r["samples"].items():
            if len(xs) > 1:
                spreads.append(f"{lib} {_fmt_time(min(xs))}..{_fmt_time(max(xs))} (n={len(xs)})")
        if spreads:
            out.append(f"- {name} sample range: " + "; ".join(spreads))
    mem = [c for c in children if c["case"] == "train_memory"]
    if mem:
        parts = []
        for c in mem:
            i = c["info"]
            parts.append(
                f"{c['lib']}: after import {i['rss_after_import_mb']:.0f} MB, after build "
                f"{i['rss_after_build_mb']:.0f} MB, peak {c['peak_rss_mb']:.0f} MB"
                + (f", CUDA peak {c['cuda_peak_mb']:.0f} MB" if "cuda_peak_mb" in c else "")
            )
        out.append("- train_memory RSS (import and build are included in the peak): " + "; ".join(parts))
    imports = {}
    for c in children:
        imports.setdefault(c["lib"], []).append(c["info"]["import_s"])
    out.append("- child import time (not in any timing): "
               + ", ".join(f"{k} {statistics.median(v):.2f} s" for k, v in imports.items()))
    sl = [c for c in children if c["case"] == "save_load"]
    if sl:
        out.append("- from_pretrained restored the saved adapter exactly: "
                   + ", ".join(f"{c['lib']}={c['info'].get('load_ok')}" for c in sl))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and rounds (CI smoke, ~2 min)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--repeats", type=int, default=None, help="timed samples per child (default: per case)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps for train_step")
    ap.add_argument("--rounds", type=int, default=None, help="children per (case, lib), order alternating")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every child")
    ap.add_argument("--json", metavar="OUT", default=None, help="write all results and samples here")
    ap.add_argument("--child-timeout", type=float, default=900.0, help=argparse.SUPPRESS)
    ap.add_argument("--child", nargs=2, metavar=("CASE", "LIB"), default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    mode = "quick" if args.quick else "full"
    if args.warmup is None:
        args.warmup = DEFAULT_WARMUP[mode]

    if args.child:
        case, lib = args.child
        if args.repeats is None:
            args.repeats = DEFAULT_REPEATS[mode].get(case, 1)
        res = run_child(case, lib, args)
        sys.stdout.write(MARK + json.dumps(res) + "\n")
        sys.stdout.flush()
        return 0

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad:
        ap.error(f"unknown case(s) {bad}; choose from {', '.join(CASES)}")
    rounds = args.rounds or DEFAULT_ROUNDS[mode]
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda, but torch sees no CUDA device")

    plan = []
    for rnd in range(rounds):
        for case in cases:
            libs = _libs_for(case, args.quick)
            if case == "train_memory" and rnd > 0:
                continue  # peak memory is deterministic enough: one child per lib
            k = rnd % len(libs)
            for lib in libs[k:] + libs[:k]:  # rotate the order each round
                plan.append((rnd, case, lib))

    print(f"# peftkit vs peft: {mode} run, device={args.device}, threads={args.threads}, rounds={rounds}, "
          f"{len(plan)} child processes", file=sys.stderr)
    children = []
    t_start = time.perf_counter()
    for i, (rnd, case, lib) in enumerate(plan, 1):
        reps = args.repeats or DEFAULT_REPEATS[mode].get(case, 1)
        res = _spawn(case, lib, args, reps)
        res["round"] = rnd
        children.append(res)
        print(f"  [{i:2d}/{len(plan)}] round {rnd} {case:17s} {lib:8s} {res['wall_s']:6.1f} s "
              f"(elapsed {time.perf_counter() - t_start:5.0f} s)", file=sys.stderr, flush=True)
    total = time.perf_counter() - t_start

    rows = summarise(children, args.device)
    import torch
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version()}
    for c in children:
        if c["info"].get("version"):
            versions[c["lib"]] = c["info"]["version"]
    dev = args.device
    if dev == "cuda":
        dev += " (" + next((c["info"]["device_name"] for c in children if "device_name" in c["info"]), "?") + ")"
    else:
        dev += f" ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible)"
    header = (f"peftkit vs peft — {mode} run on {dev}, torch threads={args.threads}, rounds={rounds}, "
              f"total {total:.0f} s; medians of pooled samples; " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print()
    print(header)
    print()
    print(markdown(rows, args.device))
    print()
    print(notes(rows, children, args.device))
    missed = [r["case"] for r in rows if r["met"] is False]
    print()
    print("targets missed: " + (", ".join(missed) if missed else "none"))

    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": {"mode": mode, "device": dev, "threads": args.threads, "rounds": rounds,
                                "cases": cases, "versions": versions, "total_s": total, "argv": sys.argv[1:]},
                       "rows": rows, "children": children}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
