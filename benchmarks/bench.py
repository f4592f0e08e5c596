#!/usr/bin/env python
"""peftkit vs HF PEFT on the same workloads, reported as ratios.

Each (case, library) pair runs in a fresh child process (this script with
``--child CASE LIB``) that imports only that library (``base`` imports neither), so
import side effects never mix and the child's own peak memory can be read
(``ru_maxrss`` on CPU, ``torch.cuda.max_memory_allocated`` on CUDA). At the end the child
prints one JSON line with its timings and peak memory.

Interleaving: the children of one case are started together, set up (imports, model
build) and then wait; the parent tells them in turn to take one sample each
(peftkit, peft, base, then the next repeat with the order rotated), so only one child
computes at a time and samples of different libraries taken at the same moment sit next
to each other. This matters on shared, noisy cores, whose throughput can swing several-fold
within seconds. The peftkit, peft and base columns are medians of the pooled timed samples;
the ratios (peftkit/peft, peftkit/base, peft/base) are medians over repeats of the ratio of
the samples taken back to back in that repeat, which stays fair when the machine switches
between fast and slow phases (the ratio of the pooled medians does not, and is shown too).
Targets are checked on the paired ratio; memory ratios are plain ratios of peak memory.

Models are transformers ``LlamaForCausalLM`` built from configs with random weights; no
network is used (``HF_HUB_OFFLINE=1``).

Usage::

    python benchmarks/bench.py                 # full run (2 CPU cores: ~14 min quiet, 5 of them the
                                               # shira_* cases; more when noisy)
    python benchmarks/bench.py --quick         # CI smoke (~5 min on 2 CPU cores, 2.5 of them shira_*)
    python benchmarks/bench.py --cases train_step,get_peft_model --json out.json
    python benchmarks/bench.py --device cuda   # on a GPU machine
    python benchmarks/bench.py --child train_step peftkit --repeats 5   # one child alone (profiling)
    python benchmarks/bench.py --quick --cases shira   # all shira_* cases ("shira" expands to them)
    python benchmarks/bench.py --cases lokr,loha,ia3   # the lokr_*, loha_* and ia3_* cases (~4 min full, quiet)
    python benchmarks/bench.py --cases oft,boft        # the oft_*, boft_* and boft2_* cases
    python benchmarks/bench.py --cases qlora --threads 1   # the qlora_* cases (LoRA on a bitsandbytes nf4 model)
    python benchmarks/bench.py --cases prompt          # the prompt_tuning_*, p_tuning_*, prefix_*, adaption_prompt_* cases
    python benchmarks/bench.py --child prefix_generate peftkit --repeats 3   # one prompt-learning child alone
    python benchmarks/bench.py --cases xlora --threads 1   # xlora_forward, xlora_generate (~6 min)
    python benchmarks/bench.py --child shira_switch_merged peftkit_lora   # a SHiRA case's LoRA reference alone
    PYTHONPATH=/path/to/checkout/src python benchmarks/bench.py   # measure another peftkit tree
                                                                   # (its path and git commit are printed)

Cases:
  train_step        LoRA r=16, alpha=32 on all linear layers of a 4-layer hidden-512 Llama,
                    batch 4 x 128, labels=input_ids: forward + backward + AdamW step.
                    ``base``: the frozen base's forward + backward with grad-requiring input
                    embeddings (the work any adapter step does anyway).
                    16 repeats a round in a full run (the ratio sits near its target and single
                    samples on a shared 2-core machine spread by ±30%).
  get_peft_model    get_peft_model on a 24-layer Llama (fresh base per repeat, not timed).
  merge_and_unload  merge_and_unload on the 4-layer model, init_lora_weights=False.
  save_load         save_pretrained to a temp dir (timed), then
                    PeftModel.from_pretrained(fresh base, dir) (timed separately).
  train_memory      peak memory of a child that builds the 4-layer model and runs 3 steps
                    (one set of children, not repeated per round; --quick leaves out base).
  dora_train_step   train_step with DoRA (use_dora=True, r=16, alpha=32, all linear layers);
                    ``base`` as in train_step. Extra row "above base" as for mixed_batch (no target).
  dora_eval_forward eval-mode forward under torch.no_grad of the same DoRA model, batch 4 x 128;
                    ``base``: the plain model's eval forward. Extra row "above base" (no target).
                    The plain forward is a floor: peftkit/peft can go no lower than base/peft.
  mixed_batch       8 LoRA adapters (r=16, init_lora_weights=False, all linear layers) on the
                    4-layer model, eval, no_grad forward of 16 x 64 tokens with adapter_names
                    cycling over the 8 adapters. ``base``: the plain model's forward on the same
                    batch. Extra row "cost above base": (lib - base) per repeat, and the ratio
                    (peftkit - base) / (peft - base) of samples taken back to back.
                    Checked once (untimed): the mixed output equals per-adapter runs.
  switch_merged     hidden-2048 Llama (intermediate 5504, 2 layers, 16 heads, vocab 1000), two
                    adapters "a", "b" (init_lora_weights=False, all linear layers), "a" merged.
                    One sample = switch the merged adapter to the other one. peft:
                    unmerge_adapter(); set_adapter(other); merge_adapter(). peftkit:
                    base_model.swap_merged_adapter(other). Row switch_merged_3calls: peftkit with
                    peft's three calls (no target; peft's column there is the same three calls).
                    Each child takes both switches per sample (a -> b -> a), so pairs stay back
                    to back. Checked once (untimed): merged weights after a switch equal the
                    original weights plus the other adapter's delta.
  weighted_svd      add_weighted_adapter(["a", "b"], [0.6, 0.4], "c<i>", combination_type="svd",
                    svd_rank=16) on the 4-layer model with two r=16 adapters
                    (init_lora_weights=False); the new adapter is deleted after each sample
                    (untimed). Checked once: its delta is the rank-16 truncation of the weighted sum.

SHiRA cases (the shira_* cases): peftkit's SHiRA is compared with more than peft's SHiRA, so these
cases run extra children: ``peftkit`` and ``peft`` run SHiRA (ShiraConfig(r=16, all linear layers,
random_seed=42; init_weights=True unless said)), ``peftkit_lora`` / ``peft_lora`` run LoRA r=16,
alpha=32 (the same trainable-parameter count, r·(m+n) per layer) with the same library, and ``base``
as in train_step. Every child imports only its own library, and all of a case's children are
interleaved as above. Their results go to a second table, one row per (metric, reference): the
paired ratio peftkit SHiRA / reference, checked against SHIRA_TARGETS (pairs without a target are
shown for context).
  shira_train_step      train_step with SHiRA (init 0, so the first-step loss equals the base's);
                        children peftkit, peft, peftkit_lora, base, base_sddmm (the frozen base's forward +
                        backward that also computes, for every targeted layer, the r·(m+n) sampled entries of
                        Gᵀ X with torch.sparse.sampled_addmm, Xᵀ made once per input as peftkit does: an exact
                        SHiRA values gradient, stock torch's cheapest, without the forward's W + S). Targets:
                        ≤ 0.8 × peft SHiRA, ≤ 1.1 × peftkit LoRA. Checked: first-step losses agree, equal
                        parameter counts.
                        Note: the floor base_sddmm / peft and base_sddmm / peftkit LoRA.
  shira_train_memory    train_memory with SHiRA; children peftkit, peft, peftkit_lora. Targets on the
                        peak (RSS, or CUDA alloc): ≤ peft SHiRA, ≤ peftkit LoRA. On CPU an extra row
                        (no target) gives the peak above the RSS after imports (the libraries' import
                        footprints differ).
  shira_switch_merged   switch_merged's hidden-2048 model with two adapters "a" (random_seed=42), "b"
                        (43), init_weights=False / init_lora_weights=False, "a" merged. One sample =
                        a -> b -> a, reported per switch. peftkit children (SHiRA and LoRA):
                        base_model.swap_merged_adapter(other); peft children: unmerge_adapter();
                        set_adapter(other); merge_adapter(). Targets: ≤ 0.2 × peft LoRA, < 1.0 ×
                        peftkit LoRA, ≤ 0.5 × peft SHiRA. Checked once (untimed): after each switch the
                        weights equal the original plus the new adapter's delta.
  shira_get_peft_model  get_peft_model with SHiRA on the 24-layer Llama (fresh base per repeat, not
                        timed); children peftkit, peft. Target ≤ 0.1 × peft SHiRA. Checked once: every
                        layer holds r·(m+n) distinct in-range positions.
  shira_save_load       save_load with SHiRA (init_weights=False); children peftkit, peft, peftkit_lora
                        (LoRA, init_lora_weights=False). Target: from_pretrained ≤ 1.5 × peftkit LoRA.
                        Checked: the loaded values and positions equal the saved ones.

LoKr, LoHa and IA3 cases (lokr_*, loha_*, ia3_*): tables of the same kind as SHiRA's, one per method, peftkit's method
against peft's (targets from METHOD_TARGETS) and the frozen base (context). Same model, batch and target
modules as train_step. LoKr: LoKrConfig(r=16, alpha=32), PEFT's defaults otherwise (init_weights=True: W1 = 0,
so the model starts as the base). IA3: IA3Config(all linear layers, feedforward_modules = gate_proj,
up_proj, down_proj; vectors start at 1). A method that the peftkit under test lacks (no LoKrConfig /
IA3Config) fails its cases with a message saying so; the other cases still run, the failures are listed
at the end and the exit status is 1 (this holds for any case whose child dies).
  lokr_train_step     train_step with LoKr; children peftkit, peft, peftkit_lora (LoRA r=16, alpha=32), base.
                      Target ≤ 0.5 × peft LoKr. LoRA is context: at these shapes LoKr's two small products
                      (N·(c·d·b + c·b·a) multiply-adds per layer, the cheaper order) are ~1.5x LoRA r=16's
                      N·r·(in+out), in forward and backward alike.
                      Checked: first-step losses agree (all equal the base's), equal trainable counts.
  loha_train_step     train_step with LoHa (r=16, alpha=32); children peftkit, peft, base, base_ft (the frozen base's
                      forward + backward that also computes the full gradient of every targeted weight). Target
                      ≤ 0.6 × peft LoHa. Note: the floor base_ft / peft. An exact LoHa gradient needs each targeted
                      weight's full gradient Gᵀ X (dL/dW1 = (Gᵀ X) ⊙ W2), or the rank-r² face-splitting route,
                      which costs more here; so peftkit's LoHa step can be no faster than base_ft.
  loha_train_memory   train_memory with LoHa; children peftkit, peft. Target: peak ≤ peft LoHa.
  lokr_train_memory   train_memory with LoKr; children peftkit, peft. Target: peak ≤ peft LoKr (plus the
                      row above the RSS after imports on CPU, no target).
  ia3_train_step      train_step with IA3; children peftkit, peft, base. Target ≤ 1.0 × peft IA3.
                      Checked: first-step losses agree, and (init deterministic) the loss after one AdamW
                      step agrees between peftkit and peft; equal trainable counts.
  ia3_train_memory    train_memory with IA3; children peftkit, peft. Target: peak ≤ peft IA3.

QLoRA cases (qlora_*): LoRA r=16, alpha=32 on the train_step model whose linear layers (all but lm_head) are
bitsandbytes 4-bit nf4 Linear4bit (compute dtype float32, quantized once from the same seeded weights, so every
child holds the same 4-bit model), the model marked ``is_loaded_in_4bit`` as transformers marks it (PEFT then uses
its bnb LoRA layer). Needs bitsandbytes (CPU works); a table of their own.
  qlora_train_step    train_step on the 4-bit model; children peftkit, peft, base (the frozen 4-bit base's forward
                      + backward). Target ≤ 1.0 × peft. Checked: first-step losses agree (B = 0: all equal the base's),
                      equal trainable counts.
  qlora_train_memory  train_memory on the 4-bit model; children peftkit, peft. Target: peak ≤ peft.

OFT and BOFT cases (oft_*, boft*_*): tables of the same kind, one per method. Same model, batch and target modules
as train_step. OFT: OFTConfig(r=0, oft_block_size=32), PEFT's defaults otherwise (Cayley-Neumann with 5 terms,
no coft, no block_share; init_weights=True: rotations = identity, so the model starts as the base). BOFT:
BOFTConfig(boft_block_size=8, boft_block_num=0, boft_n_butterfly_factor=1), PEFT's defaults otherwise
(rotations = identity, scale 1 at init). A first run of peft's BOFT on CPU tries to build its fbd_cuda
extension (untimed setup; it fails without CUDA and peft then forces the butterfly factor to 1).
  oft_train_step      train_step with OFT; children peftkit, peft, base. Target ≤ 0.8 × peft OFT.
                      Checked: first-step losses agree (all equal the base's), the loss after one AdamW step
                      (deterministic init) agrees between peftkit and peft, equal trainable counts.
  oft_train_memory    train_memory with OFT; children peftkit, peft. Target: peak ≤ peft OFT.
  boft_train_step     train_step with BOFT; children peftkit, peft, peftkit_lora (LoRA r=16, alpha=32), base.
                      Targets ≤ 0.3 × peft BOFT, ≤ 2.0 × peftkit LoRA. Checked as oft_train_step. peft's BOFT
                      step takes ~1.7 s on 2 CPU cores (LoRA ~0.26 s), hence 6 repeats in a full run.
  boft_train_memory   train_memory with BOFT; children peftkit, peft. Target: peak ≤ peft BOFT.
  boft2_train_step    train_step with BOFT, boft_n_butterfly_factor=2 (block size 8); children peftkit,
                      peftkit_lora only. Target ≤ 2.0 × peftkit LoRA. peft is left out: without its CUDA
                      extension (on CPU) it silently forces factor 1, so it would time a different adapter.

Prompt-learning cases (groups prompt_tuning, p_tuning, prefix, adaption_prompt; "prompt" expands to all four):
one table per method, peftkit's method against peft's (target ≤ 1.05 × peft, both rows) and the plain base
(context). Configs, the same in both libraries (task_type="CAUSAL_LM", PEFT's defaults otherwise):
PromptTuningConfig(num_virtual_tokens=20) (random init), PromptEncoderConfig(num_virtual_tokens=20,
encoder_hidden_size=128) (MLP encoder), PrefixTuningConfig(num_virtual_tokens=20) (no projection),
AdaptionPromptConfig(adapter_len=10, adapter_layers=2) (gates 0: the model starts as the base). Both libraries
draw the same init from the same seed, so their outputs are compared exactly.
  <m>_train_step      train_step with the method (same model and batch; the virtual tokens make the sequence
                      longer); children peftkit, peft, base (the frozen base's forward + backward, as in
                      train_step). Checked: peftkit's and peft's losses agree at init and after one AdamW step
                      (Llama-Adapter: also the base's at init), equal trainable counts.
  <m>_generate        model.eval(); generate(input_ids, attention_mask, max_new_tokens=32, min_new_tokens=32,
                      do_sample=False, pad_token_id=0, use_cache=True) on 4 prompts x 16 tokens, one call per
                      sample (1 warm-up call); peftkit / peft: PeftModel.generate, base: the plain model's
                      generate. Checked: peftkit's 4 x 32 new tokens equal peft's exactly, every call of a child
                      gives the same tokens (and Llama-Adapter's equal the base's).

X-LoRA cases (group xlora): 4 LoRA experts (r=16, alpha=32, all linear layers, random B) saved by the child's own
library, XLoraConfig(task_type="CAUSAL_LM") with PEFT's defaults (classifier depth 1, dense softmax, scaling pass
value 0), the classifier's weights drawn from one fixed seed in both libraries; peft's model has use_cache=False
(it refuses the cache). Children peftkit, peft, base (the plain model).
  xlora_forward       eval forward under no_grad, batch 4 x 128. Notes: logits agreement and the floor
                      (backbone + base) / peft: any exact X-LoRA forward runs the backbone for the scaling pass and
                      the full model for the real pass.
  xlora_generate      as <m>_generate (4 prompts x 16 tokens, 32 new tokens, greedy); peft regenerates the whole
                      sequence through both passes at every step, peftkit keeps a cache per pass.

Noise on shared cores: when a co-tenant loads one of the two vCPUs, 2-thread GEMMs wait on
the slow thread and steps run up to ~10x slower for seconds at a time. Interleaving keeps the
ratios fair, but absolute times swing; the notes under the table give each sample range and
the ratio of minima. ``--threads 1`` is steadier there if needed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import weakref

MARK = "@@BENCH@@ "
SHIRA_CASES = ("shira_train_step", "shira_train_memory", "shira_switch_merged", "shira_get_peft_model",
               "shira_save_load")
LOKR_CASES = ("lokr_train_step", "lokr_train_memory")
LOHA_CASES = ("loha_train_step", "loha_train_memory")
IA3_CASES = ("ia3_train_step", "ia3_train_memory")
OFT_CASES = ("oft_train_step", "oft_train_memory")
QLORA_CASES = ("qlora_train_step", "qlora_train_memory")
# boft2_train_step: peftkit's BOFT with butterfly factor 2 (peft's needs its CUDA extension for that, see BOFT_FACTOR2)
BOFT_CASES = ("boft_train_step", "boft_train_memory", "boft2_train_step")
# Prompt learning: a training step and 32-token greedy generation per method (group "prompt": all four)
PROMPT_TUNING_CASES = ("prompt_tuning_train_step", "prompt_tuning_generate")
P_TUNING_CASES = ("p_tuning_train_step", "p_tuning_generate")
PREFIX_CASES = ("prefix_train_step", "prefix_generate")
ADAPTION_PROMPT_CASES = ("adaption_prompt_train_step", "adaption_prompt_generate")
PROMPT_METHODS = ("prompt_tuning", "p_tuning", "prefix", "adaption_prompt")
# X-LoRA: XLORA_EXPERTS LoRA experts, an eval forward and 32-token greedy generation
XLORA_CASES = ("xlora_forward", "xlora_generate")
GENERATE_CASES = ("prompt_tuning_generate", "p_tuning_generate", "prefix_generate", "adaption_prompt_generate",
                  "xlora_generate")
# Method cases: peftkit's <method> against peft's <method> and other references, in a table of their own;
# the group name on --cases ("shira", "lokr", "loha", "ia3", "oft", "boft") expands to all of a method's cases.
METHOD_CASES = {"shira": SHIRA_CASES, "lokr": LOKR_CASES, "loha": LOHA_CASES, "ia3": IA3_CASES, "oft": OFT_CASES,
                "boft": BOFT_CASES, "prompt_tuning": PROMPT_TUNING_CASES, "p_tuning": P_TUNING_CASES,
                "prefix": PREFIX_CASES, "adaption_prompt": ADAPTION_PROMPT_CASES, "xlora": XLORA_CASES,
                "qlora": QLORA_CASES}
METHOD_NAMES = {"shira": "SHiRA", "lokr": "LoKr", "loha": "LoHa", "ia3": "IA3", "oft": "OFT", "boft": "BOFT",
                "prompt_tuning": "prompt tuning", "p_tuning": "P-tuning", "prefix": "prefix tuning",
                "adaption_prompt": "Llama-Adapter", "xlora": "X-LoRA", "qlora": "QLoRA"}
# Groups of method groups on --cases: "prompt" stands for the four prompt-learning methods.
GROUP_ALIASES = {"prompt": PROMPT_METHODS}
CASES = ("train_step", "get_peft_model", "merge_and_unload", "save_load", "train_memory",
         "dora_train_step", "dora_eval_forward", "mixed_batch", "switch_merged", "weighted_svd", *SHIRA_CASES,
         *LOKR_CASES, *LOHA_CASES, *IA3_CASES, *OFT_CASES, *BOFT_CASES, *PROMPT_TUNING_CASES, *P_TUNING_CASES,
         *PREFIX_CASES, *ADAPTION_PROMPT_CASES, *XLORA_CASES, *QLORA_CASES)
LIBS = ("peftkit", "peft")
BASE = "base"
# loha_train_step's floor: the frozen base plus the full gradient of every targeted weight (see _floor_notes)
BASE_FT = "base_ft"
# shira_train_step's floor: the frozen base plus every targeted layer's sampled gradient (see _floor_notes)
BASE_SDDMM = "base_sddmm"
# Reference children of the SHiRA cases: the same library running LoRA (r=16, alpha=32) instead.
REF_LIBS = ("peftkit_lora", "peft_lora")
CHILD_LIBS = (*LIBS, BASE, BASE_FT, BASE_SDDMM, *REF_LIBS)
MEMORY_CASES = ("train_memory", "shira_train_memory", "lokr_train_memory", "loha_train_memory", "ia3_train_memory",
                "oft_train_memory", "boft_train_memory", "qlora_train_memory")
# In a SHiRA case, "peftkit" and "peft" run SHiRA; the others are references for peftkit's SHiRA.
SHIRA_LIBS = {
    "shira_train_step": ["peftkit", "peft", "peftkit_lora", BASE, BASE_SDDMM],
    "shira_train_memory": ["peftkit", "peft", "peftkit_lora"],
    "shira_switch_merged": ["peftkit", "peft", "peftkit_lora", "peft_lora"],
    "shira_get_peft_model": ["peftkit", "peft"],
    "shira_save_load": ["peftkit", "peft", "peftkit_lora"],
}
# Children of every method case (in the LoKr and IA3 cases "peftkit" and "peft" run that method).
METHOD_LIBS = {
    **SHIRA_LIBS,
    "lokr_train_step": ["peftkit", "peft", "peftkit_lora", BASE],
    "lokr_train_memory": ["peftkit", "peft"],
    "loha_train_step": ["peftkit", "peft", BASE, BASE_FT],
    "loha_train_memory": ["peftkit", "peft"],
    "ia3_train_step": ["peftkit", "peft", BASE],
    "ia3_train_memory": ["peftkit", "peft"],
    "oft_train_step": ["peftkit", "peft", BASE],
    "oft_train_memory": ["peftkit", "peft"],
    "boft_train_step": ["peftkit", "peft", "peftkit_lora", BASE],
    "boft_train_memory": ["peftkit", "peft"],
    # butterfly factor 2: peftkit only (peft's BOFT silently runs factor 1 without its CUDA extension)
    "boft2_train_step": ["peftkit", "peftkit_lora"],
    "qlora_train_step": ["peftkit", "peft", BASE],
    "qlora_train_memory": ["peftkit", "peft"],
    **{c: ["peftkit", "peft", BASE] for m in PROMPT_METHODS for c in METHOD_CASES[m]},
    **{c: ["peftkit", "peft", BASE] for c in XLORA_CASES},
}
# Names of the reference children in the method tables ("peftkit"/"peft": "<lib> <method>", see _label).
LIB_LABELS = {"peftkit_lora": "peftkit LoRA", "peft_lora": "peft LoRA", BASE: "base",
              BASE_FT: "base + targeted weights' gradients", BASE_SDDMM: "base + sampled gradients"}

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Model and batch sizes.
HIDDEN, INTERMEDIATE, HEADS, VOCAB = 512, 1376, 8, 8000
SMALL_LAYERS, BIG_LAYERS = 4, 24
BATCH, SEQ = 4, 128
RANK, ALPHA = 16, 32
MEMORY_STEPS = 3
MIXED_ADAPTERS, MIXED_BATCH, MIXED_SEQ = 8, 16, 64
# switch_merged: a wider model, so that the weight passes dominate
SWITCH_HIDDEN, SWITCH_INTERMEDIATE, SWITCH_LAYERS, SWITCH_HEADS, SWITCH_VOCAB = 2048, 5504, 2, 16, 1000
# SHiRA: r=16 trains r·(m+n) entries per layer, LoRA r=16's parameter count; fixed mask seeds
SHIRA_SEED, SHIRA_SEED_B = 42, 43
# IA3: the MLP projections scale their input (feedforward_modules must be a subset of the targets)
IA3_FEEDFORWARD = ["gate_proj", "up_proj", "down_proj"]
# OFT: block size 32 (r=0: the rank follows from it), PEFT's defaults otherwise (Cayley-Neumann, 5 terms)
OFT_BLOCK_SIZE = 32
# BOFT: block size 8 (boft_block_num=0: follows from it), butterfly factor 1; boft2_train_step uses factor 2
BOFT_BLOCK_SIZE, BOFT_FACTOR, BOFT_FACTOR2 = 8, 1, 2
# Prompt learning: virtual tokens (prompt tuning, P-tuning, prefix), P-tuning's MLP width, Llama-Adapter's sizes
PROMPT_VIRTUAL_TOKENS, PTUNING_ENCODER_HIDDEN = 20, 128
ADAPTION_LEN, ADAPTION_LAYERS = 10, 2
# *_generate: greedy generation of exactly GEN_NEW tokens from GEN_BATCH prompts of GEN_PROMPT tokens (KV cache on)
GEN_BATCH, GEN_PROMPT, GEN_NEW = 4, 16, 32
# X-LoRA: experts (LoRA r=16 on all linear layers), PEFT's XLoraConfig defaults otherwise (depth 1, dense softmax)
XLORA_EXPERTS = 4

# Timed samples per child, warm-up samples per child, and rounds (fresh sets of children).
DEFAULT_REPEATS = {
    "full": {"train_step": 16, "get_peft_model": 8, "merge_and_unload": 12, "save_load": 12, "train_memory": 1,
             "dora_train_step": 10, "dora_eval_forward": 15, "mixed_batch": 20, "switch_merged": 10,
             "weighted_svd": 5, "shira_train_step": 8, "shira_train_memory": 1, "shira_switch_merged": 10,
             "shira_get_peft_model": 4, "shira_save_load": 12, "lokr_train_step": 8, "lokr_train_memory": 1,
             "loha_train_step": 8, "loha_train_memory": 1, "ia3_train_step": 8, "ia3_train_memory": 1,
             "oft_train_step": 8, "oft_train_memory": 1, "boft_train_step": 6, "boft_train_memory": 1,
             "boft2_train_step": 8, "qlora_train_step": 8, "qlora_train_memory": 1,
             **{c: 6 for m in PROMPT_METHODS for c in METHOD_CASES[m]}, "xlora_forward": 10, "xlora_generate": 4},
    "quick": {"train_step": 2, "get_peft_model": 2, "merge_and_unload": 3, "save_load": 3, "train_memory": 1,
              "dora_train_step": 3, "dora_eval_forward": 6, "mixed_batch": 8, "switch_merged": 3,
              "weighted_svd": 2, "shira_train_step": 2, "shira_train_memory": 1, "shira_switch_merged": 4,
              "shira_get_peft_model": 2, "shira_save_load": 3, "lokr_train_step": 2, "lokr_train_memory": 1,
              "loha_train_step": 2, "loha_train_memory": 1, "ia3_train_step": 2, "ia3_train_memory": 1,
              "oft_train_step": 2, "oft_train_memory": 1, "boft_train_step": 2, "boft_train_memory": 1,
              "boft2_train_step": 2, "qlora_train_step": 2, "qlora_train_memory": 1,
              **{c: 2 for m in PROMPT_METHODS for c in METHOD_CASES[m]}, "xlora_forward": 3, "xlora_generate": 2},
}
DEFAULT_TRAIN_WARMUP = {"full": 2, "quick": 1}
OTHER_WARMUP = {"train_step": None, "get_peft_model": 1, "merge_and_unload": 1, "save_load": 1, "train_memory": 0,
                "dora_train_step": None, "dora_eval_forward": 1, "mixed_batch": 1, "switch_merged": 1,
                "weighted_svd": 1, "shira_train_step": None, "shira_train_memory": 0, "shira_switch_merged": 1,
                "shira_get_peft_model": 1, "shira_save_load": 1, "lokr_train_step": None, "lokr_train_memory": 0,
                "loha_train_step": None, "loha_train_memory": 0, "ia3_train_step": None, "ia3_train_memory": 0,
                "oft_train_step": None, "oft_train_memory": 0, "boft_train_step": None, "boft_train_memory": 0,
                "boft2_train_step": None, "qlora_train_step": None, "qlora_train_memory": 0,
                **{f"{m}_train_step": None for m in PROMPT_METHODS}, **{c: 1 for c in GENERATE_CASES},
                "xlora_forward": 1}
DEFAULT_ROUNDS = {"full": 2, "quick": 1}

# Targets on the ratio peftkit / peft (None: reported without a target).
TARGETS = {
    "train_step": 0.95,
    "get_peft_model": 0.5,
    "merge_and_unload": 0.5,
    "save_pretrained": None,
    "from_pretrained": 1.0,
    "train_memory": 1.0,
    "dora_train_step": 0.8,
    "dora_train_step_above_base": None,
    "dora_eval_forward": 0.6,
    "dora_eval_forward_above_base": None,
    "mixed_batch": 0.9,
    "mixed_batch_above_base": 0.5,  # (peftkit - base) / (peft - base)
    "switch_merged": 0.3,
    "switch_merged_3calls": None,
    "weighted_svd": 1.0,
}
TIME_METRICS = ("train_step", "get_peft_model", "merge_and_unload", "save_pretrained", "from_pretrained",
                "dora_train_step", "dora_eval_forward", "mixed_batch", "switch_merged", "switch_merged_3calls",
                "weighted_svd")
# SHiRA cases: targets on peftkit SHiRA / reference, per (metric, reference lib): (op, bound).
# Pairs not listed are reported without a target.
SHIRA_TARGETS = {
    ("shira_train_step", "peft"): ("<=", 0.8),
    ("shira_train_step", "peftkit_lora"): ("<=", 1.1),
    ("shira_train_memory", "peft"): ("<=", 1.0),
    ("shira_train_memory", "peftkit_lora"): ("<=", 1.0),
    ("shira_switch_merged", "peft_lora"): ("<=", 0.2),
    ("shira_switch_merged", "peftkit_lora"): ("<", 1.0),
    ("shira_switch_merged", "peft"): ("<=", 0.5),
    ("shira_get_peft_model", "peft"): ("<=", 0.1),
    ("shira_from_pretrained", "peftkit_lora"): ("<=", 1.5),
}
SHIRA_TIME_METRICS = ("shira_train_step", "shira_switch_merged", "shira_get_peft_model", "shira_save_pretrained",
                      "shira_from_pretrained")
# LoKr and IA3 cases: the same kind of table (peftkit's method / reference), targets from the issue.
METHOD_TARGETS = {
    **SHIRA_TARGETS,
    ("lokr_train_step", "peft"): ("<=", 0.5),
    ("lokr_train_memory", "peft"): ("<=", 1.0),
    ("loha_train_step", "peft"): ("<=", 0.6),
    ("loha_train_memory", "peft"): ("<=", 1.0),
    ("ia3_train_step", "peft"): ("<=", 1.0),
    ("ia3_train_memory", "peft"): ("<=", 1.0),
    ("oft_train_step", "peft"): ("<=", 0.8),
    ("oft_train_memory", "peft"): ("<=", 1.0),
    ("boft_train_step", "peft"): ("<=", 0.3),
    ("boft_train_step", "peftkit_lora"): ("<=", 2.0),
    ("boft_train_memory", "peft"): ("<=", 1.0),
    ("boft2_train_step", "peftkit_lora"): ("<=", 2.0),
    ("qlora_train_step", "peft"): ("<=", 1.0),
    ("qlora_train_memory", "peft"): ("<=", 1.0),
    **{(c, "peft"): ("<=", 1.05) for m in PROMPT_METHODS for c in METHOD_CASES[m]},
    ("xlora_forward", "peft"): ("<=", 0.6),
    ("xlora_generate", "peft"): ("<=", 0.3),
}
METHOD_TIME_METRICS = {"shira": SHIRA_TIME_METRICS, "lokr": ("lokr_train_step",), "loha": ("loha_train_step",),
                       "ia3": ("ia3_train_step",), "oft": ("oft_train_step",),
                       "boft": ("boft_train_step", "boft2_train_step"), "qlora": ("qlora_train_step",),
                       **{m: METHOD_CASES[m] for m in PROMPT_METHODS}, "xlora": XLORA_CASES}
# Derived rows: the cost above the base of a case with a base child, (lib - base) per repeat.
ABOVE_BASE = {"dora_train_step": "dora_train_step_above_base", "dora_eval_forward": "dora_eval_forward_above_base",
              "mixed_batch": "mixed_batch_above_base"}


def _method_of(case: str) -> str | None:
    """The method of a method case ("shira", "lokr", ..., "prefix", "adaption_prompt"), else None."""
    return next((m for m, cs in METHOD_CASES.items() if case in cs), None)


def _label(lib: str, method: str) -> str:
    """A child's name in a method table: "peftkit LoKr", "peft IA3", "peftkit LoRA", "base"."""
    if lib in LIBS:
        return f"{lib} {METHOD_NAMES[method]}"
    return LIB_LABELS[lib]


def _set_env(env: dict, threads: int) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["HF_DATASETS_OFFLINE"] = "1"
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env.setdefault("PYTHONWARNINGS", "ignore")


def _warmup_for(case: str, args: argparse.Namespace) -> int:
    w = OTHER_WARMUP[case]
    return args.warmup if w is None else w


# ============================================================================ child side
def _emit(obj: dict) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _proc_rss_mb() -> float:
    """Current RSS in MB (Linux), else nan."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _maxrss_mb() -> float:
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**20 if sys.platform == "darwin" else kb / 1024  # macOS reports bytes


def run_child(case: str, lib: str, args: argparse.Namespace) -> dict:
    """Set up one case for one library, take samples (on the parent's command when driven)."""
    _set_env(os.environ, args.threads)
    import warnings

    warnings.filterwarnings("ignore")
    t_import = time.perf_counter()
    import gc
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    if lib not in CHILD_LIBS:
        raise SystemExit(f"unknown lib {lib!r}; choose from {', '.join(CHILD_LIBS)}")
    pkg = lib.split("_")[0]  # the library this child imports: peftkit, peft or base (neither)
    if pkg == "peft":
        import peft as L
    elif pkg == "peftkit":
        try:
            import peftkit as L
        except Exception as e:  # e.g. a method half-written by someone: one clear line in the failure list
            raise SystemExit(f"case {case}: import peftkit failed: {type(e).__name__}: {e}") from e
    else:
        L = None
    import_s = time.perf_counter() - t_import
    # method cases: "peftkit" and "peft" run the method, "peftkit_lora" and "peft_lora" LoRA (references)
    method = _method_of(case)
    use_method = method is not None and L is not None and lib in LIBS
    use_shira = use_method and method == "shira"
    cfg_name = {"shira": "ShiraConfig", "lokr": "LoKrConfig", "loha": "LoHaConfig", "ia3": "IA3Config",
                "oft": "OFTConfig", "boft": "BOFTConfig", "prompt_tuning": "PromptTuningConfig",
                "p_tuning": "PromptEncoderConfig", "prefix": "PrefixTuningConfig",
                "adaption_prompt": "AdaptionPromptConfig", "xlora": "XLoraConfig", "qlora": "LoraConfig"}.get(method or "")
    if use_method and not hasattr(L, cfg_name):
        # e.g. a peftkit tree without that method yet: say so instead of a traceback deep in setup
        raise SystemExit(f"case {case}: {pkg} {getattr(L, '__version__', '?')} at {os.path.dirname(L.__file__)} "
                         f"has no {cfg_name} (method {METHOD_NAMES[method]} not implemented or not importable)")

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def build(layers: int, seed: int = 0, hidden: int = HIDDEN, intermediate: int = INTERMEDIATE,
              heads: int = HEADS, vocab: int = VOCAB) -> torch.nn.Module:
        cfg = LlamaConfig(
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            vocab_size=vocab,
            max_position_embeddings=max(SEQ, 256),
            use_cache=False,
            tie_word_embeddings=False,
        )
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
        return quantize_4bit(model) if method == "qlora" else model.to(device)

    def quantize_4bit(model):
        """Every nn.Linear but lm_head as a bitsandbytes nf4 Linear4bit (as BitsAndBytesConfig(load_in_4bit) does)."""
        import bitsandbytes as bnb

        for name, mod in list(model.named_modules()):
            if type(mod) is torch.nn.Linear and not name.endswith("lm_head"):
                q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                      compute_dtype=torch.float32, quant_type="nf4")
                q.load_state_dict(mod.state_dict())
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, q)
        model = model.to(device)  # bitsandbytes quantizes on .to(device)
        model.is_loaded_in_4bit = True
        return model

    def lora_config(init: bool = True, dora: bool = False):
        return L.LoraConfig(
            r=RANK,
            lora_alpha=ALPHA,
            lora_dropout=0.0,
            target_modules=list(TARGET_MODULES),
            init_lora_weights=init,
            use_dora=dora,
            task_type="CAUSAL_LM",
        )

    def shira_config(init: bool = True, seed: int = SHIRA_SEED):
        return L.ShiraConfig(r=RANK, target_modules=list(TARGET_MODULES), init_weights=init, random_seed=seed,
                             task_type="CAUSAL_LM")

    def lokr_config():
        # PEFT's LoKr defaults otherwise: init_weights=True (W1 = 0), no decompose_both, decompose_factor=-1
        return L.LoKrConfig(r=RANK, alpha=ALPHA, target_modules=list(TARGET_MODULES), task_type="CAUSAL_LM")

    def loha_config():
        # PEFT's LoHa defaults otherwise: init_weights=True (hada_w2_b = 0: starts as the base model)
        return L.LoHaConfig(r=RANK, alpha=ALPHA, target_modules=list(TARGET_MODULES), task_type="CAUSAL_LM")

    def ia3_config():
        return L.IA3Config(target_modules=list(TARGET_MODULES), feedforward_modules=list(IA3_FEEDFORWARD),
                           task_type="CAUSAL_LM")

    def oft_config():
        # PEFT's OFT defaults otherwise: init_weights=True (skew-symmetric part 0: starts as the base model),
        # use_cayley_neumann=True with num_cayley_neumann_terms=5, no coft, no block_share
        return L.OFTConfig(r=0, oft_block_size=OFT_BLOCK_SIZE, target_modules=list(TARGET_MODULES),
                           task_type="CAUSAL_LM")

    def boft_config(factor: int = BOFT_FACTOR):
        # PEFT's BOFT defaults otherwise: init_weights=True (rotations = identity: starts as the base model)
        return L.BOFTConfig(boft_block_size=BOFT_BLOCK_SIZE, boft_block_num=0, boft_n_butterfly_factor=factor,
                            target_modules=list(TARGET_MODULES), task_type="CAUSAL_LM")

    def prompt_config():
        """The prompt-learning configs (the same for both libraries; init drawn from the seeded global RNG)."""
        if method == "prompt_tuning":
            return L.PromptTuningConfig(num_virtual_tokens=PROMPT_VIRTUAL_TOKENS, task_type="CAUSAL_LM")
        if method == "p_tuning":
            return L.PromptEncoderConfig(num_virtual_tokens=PROMPT_VIRTUAL_TOKENS,
                                         encoder_hidden_size=PTUNING_ENCODER_HIDDEN, task_type="CAUSAL_LM")
        if method == "prefix":
            return L.PrefixTuningConfig(num_virtual_tokens=PROMPT_VIRTUAL_TOKENS, task_type="CAUSAL_LM")
        # Llama-Adapter: gates start at 0, so the model starts as the base
        return L.AdaptionPromptConfig(adapter_len=ADAPTION_LEN, adapter_layers=ADAPTION_LAYERS, task_type="CAUSAL_LM")

    def xlora_model(model):
        """X-LoRA over XLORA_EXPERTS LoRA experts saved by this library, with a classifier drawn from a fixed seed."""
        d = tempfile.mkdtemp(prefix="xlora-bench-")
        adapters = {}
        for i in range(XLORA_EXPERTS):
            torch.manual_seed(100 + i)
            expert = L.get_peft_model(build(SMALL_LAYERS), lora_config(init=False))
            expert.save_pretrained(os.path.join(d, f"expert{i}"))
            adapters[str(i)] = os.path.join(d, f"expert{i}")  # numeric names: peft 0.21 needs them
        if pkg == "peft":
            model.config.use_cache = False  # peft refuses the cache
        xmodel = L.get_peft_model(model, L.XLoraConfig(task_type="CAUSAL_LM", hidden_size=HIDDEN, adapters=adapters))
        shutil.rmtree(d, ignore_errors=True)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in xmodel.base_model.internal_xlora_classifier.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        return xmodel.to(device)

    def adapter_config(init: bool = True, seed: int = SHIRA_SEED):
        """This child's adapter in a method case: the method (peftkit, peft) or LoRA r=16 (references)."""
        if not use_method:
            return lora_config(init)
        if method == "lokr":
            return lokr_config()
        if method == "loha":
            return loha_config()
        if method == "ia3":
            return ia3_config()
        if method == "oft":
            return oft_config()
        if method == "boft":
            return boft_config(BOFT_FACTOR2 if case == "boft2_train_step" else BOFT_FACTOR)
        if method == "qlora":
            return lora_config()
        if method in PROMPT_METHODS:
            return prompt_config()
        return shira_config(init, seed)

    def shira_layers(model):
        """(module, base weight) of every SHiRA layer, found the same way in both libraries."""
        return [(m, m.base_layer.weight) for m in model.modules()
                if hasattr(m, "shira_weight") and hasattr(m, "base_layer") and len(m.shira_weight)]

    def shira_delta(m, adapter: str, w: torch.Tensor) -> torch.Tensor:
        """The dense SHiRA delta, from its values and (row, col) positions in the weight's layout."""
        idx = m.shira_indices[adapter].long()
        d = torch.zeros(w.shape, dtype=m.shira_weight[adapter].dtype, device=w.device)
        d[idx[0], idx[1]] = m.shira_weight[adapter].detach() * m.scaling[adapter]
        return d

    def lora_layers(model):
        """(module, base weight) of every LoRA layer, found the same way in both libraries."""
        return [(m, m.base_layer.weight) for m in model.modules()
                if hasattr(m, "lora_A") and hasattr(m, "base_layer") and len(m.lora_A)]

    def delta(m, adapter: str) -> torch.Tensor:
        """s * B @ A of one plain LoRA Linear layer, from its parameters (library-agnostic)."""
        return (m.lora_B[adapter].weight @ m.lora_A[adapter].weight) * m.scaling[adapter]

    def timed(fn):
        gc.collect()
        sync()
        t0 = time.perf_counter()
        res = fn()
        sync()
        return time.perf_counter() - t0, res

    info: dict = {"import_s": import_s, "version": getattr(L, "__version__", None) if L else None,
                  "path": os.path.dirname(L.__file__) if L else None}

    last_input: dict = {}  # base_sddmm: the last input seen and its token-major copy (q, k, v share one)

    def sampled_gradient_hook(module) -> None:
        """base_sddmm: in backward, (Gᵀ X) at r·(m+n) random positions of the module's weight, as a SHiRA
        values gradient is computed (row-major Gᵀ, Xᵀ made once per input tensor, int32 CSR, zero values
        made per call), then dropped."""
        out_f, in_f = module.weight.shape
        k = RANK * (out_f + in_f)
        flat = torch.randperm(out_f * in_f, generator=torch.Generator().manual_seed(SHIRA_SEED))[:k].sort().values
        rows, cols = flat // in_f, (flat % in_f).to(torch.int32)
        crow = torch.zeros(out_f + 1, dtype=torch.int32)
        crow[1:] = torch.bincount(rows, minlength=out_f).cumsum(0)
        crow, cols = crow.to(device), cols.to(device)

        def forward_hook(mod, inputs, output):
            src = inputs[0]
            seen = last_input.get("entry")
            if seen is not None and seen[0]() is src:
                xt = seen[1]
            else:
                xt = src.detach().reshape(-1, in_f).t().contiguous()
                last_input["entry"] = (weakref.ref(src), xt)

            def grad_hook(g):
                zeros = torch.sparse_csr_tensor(crow, cols, torch.zeros(k, device=g.device), (out_f, in_f),
                                                check_invariants=False)
                torch.sparse.sampled_addmm(zeros, g.reshape(-1, out_f).t().contiguous(), xt.t(), beta=0.0)

            output.register_hook(grad_hook)

        module.register_forward_hook(forward_hook)

    def train_setup(dora: bool = False):
        """A step function for this lib: a LoRA step, or the frozen base's forward + backward."""
        model = build(SMALL_LAYERS)
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1234)).to(device)
        if lib in (BASE, BASE_FT, BASE_SDDMM):
            model.requires_grad_(False)
            model.enable_input_require_grads()
            model.train()
            targets = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGET_MODULES]
            # base_ft: also every targeted weight's full gradient (fresh each step, no accumulation)
            weights = [m.weight for m in targets] if lib == BASE_FT else []
            for w in weights:
                w.requires_grad_(True)
            if lib == BASE_SDDMM:
                for m in targets:
                    sampled_gradient_hook(m)

            def step():
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                for w in weights:
                    w.grad = None
                return loss.detach()

        else:
            model = L.get_peft_model(model, adapter_config() if method else lora_config(dora=dora))
            model.train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

            def step():
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss.detach()

        info["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return step

    # Each case: setup here, then sample() -> {metric: seconds} (one repeat).
    cleanup = None
    if case in ("train_step", "dora_train_step", "shira_train_step", "lokr_train_step", "loha_train_step",
                "ia3_train_step", "oft_train_step", "boft_train_step", "boft2_train_step", "qlora_train_step",
                *(f"{m}_train_step" for m in PROMPT_METHODS)):
        step = train_setup(dora=case == "dora_train_step")
        losses: list[float] = []

        def sample():
            dt, loss = timed(step)
            if len(losses) < 2:  # the loss at init, and after one optimizer step
                losses.append(float(loss))
                info.setdefault("loss_first_step", losses[0])
                info["losses_first_steps"] = list(losses)
            return {case: dt}

    elif case in GENERATE_CASES:
        # greedy generation with the KV cache (the bench config has use_cache=False, so it is passed here);
        # peftkit / peft: PeftModel.generate, base: the plain model's generate. X-LoRA: peft's forces
        # use_cache=False (every step reruns both passes over the whole sequence); peftkit's keeps a cache per pass.
        model = build(SMALL_LAYERS)
        if lib != BASE:
            model = xlora_model(model) if method == "xlora" else L.get_peft_model(model, adapter_config())
        model.eval()
        ids = torch.randint(0, VOCAB, (GEN_BATCH, GEN_PROMPT), generator=torch.Generator().manual_seed(4321)).to(device)
        mask = torch.ones_like(ids)

        def gen():
            with torch.no_grad():
                return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=GEN_NEW,
                                      min_new_tokens=GEN_NEW, do_sample=False, pad_token_id=0, use_cache=True)

        def sample():
            dt, out = timed(gen)
            new = out[:, -GEN_NEW:].tolist()
            if "gen_tokens" not in info:  # the first call's new tokens, compared across children in the notes
                info["gen_tokens"] = new
                info["gen_shape"] = list(out.shape)
            info["gen_same_every_call"] = info.get("gen_same_every_call", True) and new == info["gen_tokens"]
            return {case: dt}

        info["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)

    elif case == "xlora_forward":
        # eval forward under no_grad, batch 4 x 128: both passes (peftkit, peft), or the plain model (base)
        model = build(SMALL_LAYERS)
        if lib != BASE:
            model = xlora_model(model)
        model.eval()
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1234)).to(device)

        def sample():
            def forward():
                with torch.no_grad():
                    return model(input_ids=ids).logits

            dt, logits = timed(forward)
            info.setdefault("logits_checksum", float(logits.double().sum()))
            if lib == BASE:  # the backbone alone (no output head): X-LoRA's scaling pass, for the floor
                def backbone():
                    with torch.no_grad():
                        return model.model(input_ids=ids)[0]

                info.setdefault("backbone_s", []).append(timed(backbone)[0])
            return {case: dt}

    elif case == "dora_eval_forward":
        model = build(SMALL_LAYERS)
        if lib != BASE:
            model = L.get_peft_model(model, lora_config(dora=True))
        model.eval()
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1234)).to(device)

        def forward():
            with torch.no_grad():
                return model(input_ids=ids).logits

        # B = 0 at init and m = ||W||: the output is the base model's, the same in every child
        info["logits_head"] = forward()[0, :4, :4].flatten().tolist()

        def sample():
            dt, _ = timed(forward)
            return {"dora_eval_forward": dt}

    elif case == "mixed_batch":
        model = build(SMALL_LAYERS)
        ids = torch.randint(0, VOCAB, (MIXED_BATCH, MIXED_SEQ), generator=torch.Generator().manual_seed(1234)).to(device)
        names = [f"m{i % MIXED_ADAPTERS}" for i in range(MIXED_BATCH)]
        if lib == BASE:
            model.eval()

            def forward():
                with torch.no_grad():
                    return model(input_ids=ids).logits

        else:
            model = L.get_peft_model(model, lora_config(init=False), adapter_name=names[0])
            for n in names[1:MIXED_ADAPTERS]:
                model.add_adapter(n, lora_config(init=False))
            model.eval()

            def forward():
                with torch.no_grad():
                    return model(input_ids=ids, adapter_names=names).logits

            # untimed check: each row equals a run of its adapter alone on those rows
            out = forward()
            err = 0.0
            with torch.no_grad():
                for n in dict.fromkeys(names):
                    rows = [i for i, x in enumerate(names) if x == n]
                    model.set_adapter(n)
                    ref = model(input_ids=ids[rows]).logits
                    err = max(err, float((out[rows] - ref).abs().max()))
                model.set_adapter(names[0])
                with model.disable_adapter():
                    plain = model(input_ids=ids).logits
            info["mixed_max_err"] = err
            info["mixed_vs_base_diff"] = float((out - plain).abs().max())  # > 0: the adapters do act
            info["mixed_ok"] = err < 1e-3 * max(1.0, float(out.abs().max()))
            del out, ref, plain

        def sample():
            dt, _ = timed(forward)
            return {"mixed_batch": dt}

    elif case == "switch_merged":
        model = build(SWITCH_LAYERS, hidden=SWITCH_HIDDEN, intermediate=SWITCH_INTERMEDIATE, heads=SWITCH_HEADS,
                      vocab=SWITCH_VOCAB)
        model = L.get_peft_model(model, lora_config(init=False), adapter_name="a")
        model.add_adapter("b", lora_config(init=False))
        model.set_adapter("a")
        model.eval()
        layers = lora_layers(model)
        info["lora_layers"] = len(layers)
        original = [w.detach().clone() for _, w in layers]
        model.merge_adapter()
        state = {"cur": "a"}

        def switch_3calls(other):
            model.unmerge_adapter()
            model.set_adapter(other)
            model.merge_adapter()

        def switch_fast(other):
            if lib == "peftkit":
                model.base_model.swap_merged_adapter(other)
            else:
                switch_3calls(other)

        def check(label: str, fn) -> None:
            """Switch once with fn (untimed) and compare every weight with original + the new delta."""
            other = "b" if state["cur"] == "a" else "a"
            with torch.no_grad():
                fn(other)
                state["cur"] = other
                err = max(float((w - (w0 + delta(m, other).to(w.dtype))).abs().max())
                          for (m, w), w0 in zip(layers, original))
            info[f"switch_err_{label}"] = err
            info["switch_ok"] = info.get("switch_ok", True) and err < 1e-4

        check("fast", switch_fast)
        if lib == "peftkit":
            check("3calls", switch_3calls)
        if state["cur"] != "a":
            switch_fast("a")
            state["cur"] = "a"
        del original
        counter = iter(range(10**6))

        def sample():
            # two switches per sample (a -> b -> a): the fast one and the three calls, the order
            # alternating between samples; peft's "fast" path is its three calls
            i = next(counter)
            order = [("switch_merged", switch_fast), ("switch_merged_3calls", switch_3calls)]
            out = {}
            for metric, fn in (order if i % 2 == 0 else order[::-1]):
                other = "b" if state["cur"] == "a" else "a"
                dt, _ = timed(lambda: fn(other))
                state["cur"] = other
                out[metric] = dt
            return out

    elif case == "weighted_svd":
        model = L.get_peft_model(build(SMALL_LAYERS), lora_config(init=False), adapter_name="a")
        model.add_adapter("b", lora_config(init=False))
        model.set_adapter("a")
        counter = iter(range(10**6))

        def sample():
            name = f"c{next(counter)}"
            dt, _ = timed(lambda: model.add_weighted_adapter(["a", "b"], [0.6, 0.4], name,
                                                             combination_type="svd", svd_rank=RANK))
            if "svd_rel_err" not in info:  # untimed check on one layer: best rank-16 approximation
                m, _ = lora_layers(model)[0]
                with torch.no_grad():
                    # PEFT's svd combination: sum_i w_i * delta_i (delta_i = s_i B_i A_i), new scaling 1
                    target = sum(w * delta(m, n) for n, w in (("a", 0.6), ("b", 0.4)))
                    u, sv, vh = torch.linalg.svd(target.double(), full_matrices=False)
                    best = (u[:, :RANK] * sv[:RANK]) @ vh[:RANK]
                    got = delta(m, name).double()
                    info["svd_rel_err"] = float((got - best).norm() / best.norm())
                    info["svd_ok"] = info["svd_rel_err"] < 1e-3
            model.delete_adapter(name)
            return {"weighted_svd": dt}

    elif case in MEMORY_CASES:
        info["rss_after_import_mb"] = _proc_rss_mb()
        step = train_setup()
        info["rss_after_build_mb"] = _proc_rss_mb()

        def sample():
            info["losses"] = [float(step()) for _ in range(MEMORY_STEPS)]
            sync()
            return {}

    elif case == "get_peft_model":
        counter = iter(range(10**6))

        def sample():
            base = build(BIG_LAYERS, seed=next(counter))
            cfg = lora_config()
            dt, pm = timed(lambda: L.get_peft_model(base, cfg))
            info["lora_layers"] = sum(1 for n, _ in pm.named_modules() if n.endswith("lora_A"))
            return {"get_peft_model": dt}

    elif case == "merge_and_unload":
        counter = iter(range(10**6))

        def sample():
            pm = L.get_peft_model(build(SMALL_LAYERS, seed=next(counter)), lora_config(init=False))
            dt, merged = timed(pm.merge_and_unload)
            info["merged_type"] = type(merged).__name__
            return {"merge_and_unload": dt}

    elif case == "save_load":
        root = tempfile.mkdtemp(prefix="peftbench-")
        cleanup = lambda: shutil.rmtree(root, ignore_errors=True)  # noqa: E731
        pm = L.get_peft_model(build(SMALL_LAYERS), lora_config(init=False))
        ref = {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}
        counter = iter(range(10**6))

        def sample():
            d = os.path.join(root, f"save{next(counter)}")
            t_save, _ = timed(lambda: pm.save_pretrained(d))
            info["saved_files"] = sorted(os.listdir(d))
            base = build(SMALL_LAYERS)
            t_load, loaded = timed(lambda: L.PeftModel.from_pretrained(base, d))
            got = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
            ok = set(got) == set(ref) and all(torch.equal(got[n].detach().cpu(), ref[n].cpu()) for n in ref)
            info["load_ok"] = info.get("load_ok", True) and ok
            shutil.rmtree(d, ignore_errors=True)
            return {"save_pretrained": t_save, "from_pretrained": t_load}

    elif case == "shira_switch_merged":
        # two merged-adapter candidates on the wide model; SHiRA children: SHiRA, references: LoRA
        model = build(SWITCH_LAYERS, hidden=SWITCH_HIDDEN, intermediate=SWITCH_INTERMEDIATE, heads=SWITCH_HEADS,
                      vocab=SWITCH_VOCAB)
        model = L.get_peft_model(model, adapter_config(init=False), adapter_name="a")
        model.add_adapter("b", adapter_config(init=False, seed=SHIRA_SEED_B))
        model.set_adapter("a")
        model.eval()
        layers = shira_layers(model) if use_shira else lora_layers(model)
        info["adapter_layers"] = len(layers)
        original = [w.detach().clone() for _, w in layers]
        model.merge_adapter()
        state = {"cur": "a"}

        def switch(other):
            if pkg == "peftkit":
                model.base_model.swap_merged_adapter(other)
            else:
                model.unmerge_adapter()
                model.set_adapter(other)
                model.merge_adapter()

        def to_other() -> None:
            other = "b" if state["cur"] == "a" else "a"
            switch(other)
            state["cur"] = other

        def new_delta(m, adapter: str, w: torch.Tensor) -> torch.Tensor:
            return (shira_delta(m, adapter, w) if use_shira else delta(m, adapter)).to(w.dtype)

        # untimed: a -> b -> a, each compared with the original weights plus the new adapter's delta
        err = 0.0
        with torch.no_grad():
            for _ in range(2):
                to_other()
                cur = state["cur"]
                err = max([err] + [float((w - (w0 + new_delta(m, cur, w))).abs().max())
                                   for (m, w), w0 in zip(layers, original)])
        info["switch_err"] = err
        info["switch_ok"] = err < 1e-4
        del original

        def sample():
            # a -> b -> a: both directions in every sample, reported per switch
            dt, _ = timed(lambda: (to_other(), to_other()))
            return {"shira_switch_merged": dt / 2}

    elif case == "shira_get_peft_model":
        counter = iter(range(10**6))

        def sample():
            base = build(BIG_LAYERS, seed=next(counter))
            cfg = adapter_config()
            dt, pm = timed(lambda: L.get_peft_model(base, cfg))
            info["trainable_params"] = sum(p.numel() for p in pm.parameters() if p.requires_grad)
            if "mask_ok" not in info:  # untimed, once: r·(m+n) distinct in-range positions per layer
                layers = shira_layers(pm)
                ok = bool(layers)
                for m, w in layers:
                    idx = m.shira_indices["default"].long()
                    flat = (idx[0] * w.shape[1] + idx[1]).sort().values
                    ok = ok and (flat.numel() == RANK * sum(w.shape) == m.shira_weight["default"].numel()
                                 and int(idx.min()) >= 0 and int(idx[0].max()) < w.shape[0]
                                 and int(idx[1].max()) < w.shape[1] and bool((flat[1:] > flat[:-1]).all()))
                info["adapter_layers"] = len(layers)
                info["mask_ok"] = ok
            return {"shira_get_peft_model": dt}

    elif case == "shira_save_load":
        root = tempfile.mkdtemp(prefix="peftbench-")
        cleanup = lambda: shutil.rmtree(root, ignore_errors=True)  # noqa: E731

        def adapter_state(pm) -> dict:
            """Trained tensors by name, plus SHiRA's positions (kept outside state_dict in both libraries)."""
            out = {n: p.detach().clone() for n, p in pm.named_parameters() if "shira_" in n or "lora_" in n}
            for n, m in pm.named_modules():
                if hasattr(m, "shira_indices") and hasattr(m, "base_layer") and "default" in m.shira_indices:
                    out[n + ".shira_indices"] = m.shira_indices["default"].detach().long().clone()
            return out

        pm = L.get_peft_model(build(SMALL_LAYERS), adapter_config(init=False))
        ref = adapter_state(pm)
        counter = iter(range(10**6))

        def sample():
            d = os.path.join(root, f"save{next(counter)}")
            t_save, _ = timed(lambda: pm.save_pretrained(d))
            info["saved_files"] = sorted(os.listdir(d))
            base = build(SMALL_LAYERS)
            t_load, loaded = timed(lambda: L.PeftModel.from_pretrained(base, d))
            got = adapter_state(loaded)
            ok = set(got) == set(ref) and all(torch.equal(got[n].cpu(), ref[n].cpu()) for n in ref)
            info["load_ok"] = info.get("load_ok", True) and ok
            info["saved_tensors"] = len(ref)
            shutil.rmtree(d, ignore_errors=True)
            return {"shira_save_pretrained": t_save, "shira_from_pretrained": t_load}

    else:
        raise SystemExit(f"unknown case {case!r}")

    samples: dict[str, list[float]] = {}
    warm: dict[str, list[float]] = {}

    def take(is_warm: bool) -> dict:
        s = sample()
        for k, v in s.items():
            (warm if is_warm else samples).setdefault(k, []).append(v)
        return s

    try:
        if args.driven:
            _emit({"event": "ready"})
            for line in sys.stdin:
                cmd = line.strip()
                if cmd in ("go", "warm"):
                    _emit({"event": "sample", "times": take(cmd == "warm")})
                elif cmd == "end":
                    break
        else:
            for _ in range(_warmup_for(case, args)):
                take(True)
            for _ in range(args.repeats):
                take(False)
    finally:
        if cleanup:
            cleanup()
    sync()
    out = {"event": "result", "case": case, "lib": lib, "samples": samples, "warmup_samples": warm,
           "peak_rss_mb": _maxrss_mb(), "info": info}
    if cuda:
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        info["device_name"] = torch.cuda.get_device_name()
    return out


# ============================================================================ parent side
class Child:
    """One driven child process; its MARK lines arrive on a queue (read by a thread)."""

    def __init__(self, case: str, lib: str, args: argparse.Namespace, repeats: int) -> None:
        self.case, self.lib = case, lib
        cmd = [sys.executable, os.path.abspath(__file__), "--child", case, lib, "--driven",
               "--device", args.device, "--threads", str(args.threads), "--repeats", str(repeats)]
        env = dict(os.environ)
        _set_env(env, args.threads)
        self.err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, text=True, bufsize=1)
        self.q: queue.Queue = queue.Queue()
        self.timeout = args.child_timeout
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                self.q.put(json.loads(line[len(MARK):]))
        self.q.put(None)  # EOF

    def wait(self, event: str) -> dict:
        try:
            msg = self.q.get(timeout=self.timeout)
        except queue.Empty:
            msg = None
        if msg is None or msg.get("event") != event:
            self.kill()
            self.err.seek(0)
            tail = "\n".join(self.err.read().splitlines()[-30:])
            raise RuntimeError(f"child {self.case}/{self.lib} failed waiting for {event!r} "
                               f"(rc={self.proc.poll()}):\n{tail}")
        return msg

    def send(self, cmd: str) -> None:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _libs_for(case: str, quick: bool) -> list[str]:
    if case in METHOD_LIBS:
        return list(METHOD_LIBS[case])
    if case in ("train_step", "dora_train_step", "dora_eval_forward", "mixed_batch") or (
            case == "train_memory" and not quick):
        return [*LIBS, BASE]
    return list(LIBS)


def drive_case(case: str, rnd: int, args: argparse.Namespace, mode: str, log) -> list[dict]:
    """Start this case's children together, then take samples from them in turn."""
    libs = _libs_for(case, mode == "quick")
    repeats = 1 if case in MEMORY_CASES else (args.repeats or DEFAULT_REPEATS[mode][case])
    warmup = _warmup_for(case, args)
    t0 = time.perf_counter()
    children = {lib: Child(case, lib, args, repeats) for lib in libs}
    try:
        for ch in children.values():
            ch.wait("ready")
        t_ready = time.perf_counter() - t0
        for i in range(warmup + repeats):
            k = (i + rnd) % len(libs)
            for lib in libs[k:] + libs[:k]:  # rotate who goes first each repeat
                children[lib].send("warm" if i < warmup else "go")
                children[lib].wait("sample")
        results = []
        for lib, ch in children.items():
            ch.send("end")
            res = ch.wait("result")
            ch.proc.wait(timeout=60)
            res["round"] = rnd
            results.append(res)
    finally:
        for ch in children.values():
            ch.kill()
    log(f"  round {rnd} {case:17s} [{', '.join(libs)}] setup {t_ready:5.1f} s, "
        f"{warmup}+{repeats} samples each, {time.perf_counter() - t0:6.1f} s")
    return results


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "—"
    return f"{s:.3f} s" if s >= 1 else f"{s * 1e3:.1f} ms"


def _fmt_mb(v: float | None) -> str:
    return "—" if v is None else f"{v:.0f} MB"


def _fmt_ratio(r: float | None) -> str:
    return "—" if r is None else f"{r:.3f}"


def _paired(per_round: dict[int, dict[str, list[float]]], num: str, den: str) -> float | None:
    """Median over repeats of num_i / den_i: sample i of each child was taken back to back."""
    ratios = []
    for libs in per_round.values():
        if num in libs and den in libs:
            ratios += [a / b for a, b in zip(libs[num], libs[den]) if b > 0]
    return _median(ratios)


def summarise(children: list[dict], device: str) -> list[dict]:
    """One row per metric: medians of pooled samples, paired and pooled ratios, target status."""
    rows = []
    for metric in TIME_METRICS:
        by: dict[str, list[float]] = {}
        per_round: dict[int, dict[str, list[float]]] = {}
        for ch in children:
            xs = ch["samples"].get(metric)
            if xs:
                by.setdefault(ch["lib"], []).extend(xs)
                per_round.setdefault(ch["round"], {})[ch["lib"]] = xs
        if not by:
            continue
        med = {lib: _median(xs) for lib, xs in by.items()}
        ratios = {"ratio": _paired(per_round, "peftkit", "peft"),
                  "peftkit_over_base": _paired(per_round, "peftkit", BASE),
                  "peft_over_base": _paired(per_round, "peft", BASE)}
        rows.append(_row(metric, "time", med, by, ratios))
        if metric in ABOVE_BASE:
            rows.append(_above_base_row(ABOVE_BASE[metric], per_round))
    mem: dict[str, list[float]] = {}
    key = "cuda_peak_mb" if device == "cuda" else "peak_rss_mb"
    for ch in children:
        if ch["case"] == "train_memory":
            mem.setdefault(ch["lib"], []).append(ch[key])
    if mem:
        med = {lib: _median(xs) for lib, xs in mem.items()}
        k, p, b = med.get("peftkit"), med.get("peft"), med.get(BASE)
        ratios = {"ratio": _ratio(k, p), "peftkit_over_base": _ratio(k, b), "peft_over_base": _ratio(p, b)}
        rows.append(_row("train_memory", "memory", med, mem, ratios))
    return rows


def _method_refs(libs) -> list[str]:
    """The reference children present, in a fixed order (peftkit's method is the numerator)."""
    return [lib for lib in ("peft", "peftkit_lora", "peft_lora", BASE, BASE_FT, BASE_SDDMM) if lib in libs]


def _vs_row(metric: str, kind: str, ref: str, raw: dict[str, list[float]], ratio: float | None) -> dict:
    k, r = _median(raw["peftkit"]), _median(raw[ref])
    op, bound = METHOD_TARGETS.get((metric, ref), (None, None))
    met = None if bound is None or ratio is None else (ratio < bound if op == "<" else ratio <= bound)
    return {"case": metric, "kind": kind, "ref": ref, "peftkit": k, "reference": r, "ratio": ratio,
            "ratio_of_medians": _ratio(k, r), "target": bound, "target_op": op, "met": met,
            "samples": {"peftkit": raw["peftkit"], ref: raw[ref]}}


def summarise_method(children: list[dict], device: str, method: str = "shira") -> list[dict]:
    """A method's cases: one row per (metric, reference): peftkit's method against peft's, a LoRA, the base.

    Times: the ratio is the median over repeats of peftkit_i / reference_i (samples taken back to
    back), as in the main table. Memory: the ratio of the peaks.
    """
    rows = []
    for metric in METHOD_TIME_METRICS[method]:
        by: dict[str, list[float]] = {}
        per_round: dict[int, dict[str, list[float]]] = {}
        for ch in children:
            xs = ch["samples"].get(metric)
            if xs:
                by.setdefault(ch["lib"], []).extend(xs)
                per_round.setdefault(ch["round"], {})[ch["lib"]] = xs
        if "peftkit" in by:
            for ref in _method_refs(by):
                rows.append(_vs_row(metric, "vs_time", ref, by, _paired(per_round, "peftkit", ref)))
    mem_case = f"{method}_train_memory"
    mem = [c for c in children if c["case"] == mem_case]
    key = "cuda_peak_mb" if device == "cuda" else "peak_rss_mb"
    variants = [(mem_case, lambda c: c[key])]
    if device != "cuda":  # the import footprints differ between libraries: the peak above it, for context
        variants.append((f"{mem_case}_above_import",
                         lambda c: c["peak_rss_mb"] - c["info"]["rss_after_import_mb"]))
    for metric, get in variants:
        raw: dict[str, list[float]] = {}
        for c in mem:
            raw.setdefault(c["lib"], []).append(get(c))
        if "peftkit" in raw:
            for ref in _method_refs(raw):
                rows.append(_vs_row(metric, "vs_memory", ref, raw, _ratio(_median(raw["peftkit"]), _median(raw[ref]))))
    return rows


def _above_base_row(name: str, per_round: dict[int, dict[str, list[float]]]) -> dict:
    """(lib - base) per repeat for each lib; ratio = median over repeats of (peftkit - base) / (peft - base).

    Sample i of each child was taken back to back, so the differences and their ratio are per
    repeat. A repeat whose peft - base is not positive (noise) has no ratio and is counted.
    """
    above: dict[str, list[float]] = {}
    ratios: list[float] = []
    skipped = 0
    for libs in per_round.values():
        if BASE not in libs:
            continue
        for lib in LIBS:
            if lib in libs:
                above.setdefault(lib, []).extend(a - b for a, b in zip(libs[lib], libs[BASE]))
        if all(lib in libs for lib in LIBS):
            for k, p, b in zip(libs["peftkit"], libs["peft"], libs[BASE]):
                if p - b > 0:
                    ratios.append((k - b) / (p - b))
                else:
                    skipped += 1
    med = {lib: _median(xs) for lib, xs in above.items()}
    row = _row(name, "derived", med, above, {"ratio": _median(ratios), "peftkit_over_base": None,
                                              "peft_over_base": None})
    row["skipped_repeats"] = skipped
    return row


def _row(metric: str, kind: str, med: dict, raw: dict, ratios: dict) -> dict:
    k, p, b = med.get("peftkit"), med.get("peft"), med.get(BASE)
    ratio = ratios["ratio"]
    target = TARGETS.get(metric)
    return {"case": metric, "kind": kind, "peftkit": k, "peft": p, "base": b, "ratio": ratio,
            "ratio_of_medians": _ratio(k, p), "peftkit_over_base": ratios["peftkit_over_base"],
            "peft_over_base": ratios["peft_over_base"], "target": target,
            "met": None if target is None or ratio is None else ratio <= target, "samples": raw}


def markdown(rows: list[dict], device: str) -> str:
    mem_label = "peak CUDA alloc" if device == "cuda" else "peak RSS"
    lines = ["| case | peftkit | peft | ratio peftkit/peft | target | base | peftkit/base | peft/base "
             "| ratio of medians |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "memory":
            name, fmt = f"train_memory ({mem_label}, {MEMORY_STEPS} steps)", _fmt_mb
        elif r["kind"] == "derived":
            name, fmt = f"{r['case']} (lib − base; ratio of the differences)", _fmt_time
        else:
            name, fmt = r["case"], _fmt_time
        tgt = "—" if r["target"] is None else f"≤ {r['target']:.2f} " + ("(met)" if r["met"] else "(MISSED)")
        lines.append(f"| {name} | {fmt(r['peftkit'])} | {fmt(r['peft'])} | {_fmt_ratio(r['ratio'])} | {tgt} | "
                     f"{fmt(r['base'])} | {_fmt_ratio(r['peftkit_over_base'])} | {_fmt_ratio(r['peft_over_base'])} | "
                     f"{_fmt_ratio(r['ratio_of_medians'])} |")
    return "\n".join(lines)


def markdown_method(rows: list[dict], device: str, method: str = "shira") -> str:
    mem_label = "peak CUDA alloc" if device == "cuda" else "peak RSS"
    me = _label("peftkit", method)
    lines = [f"| case | {me} | reference | reference's | ratio {me} / reference | target "
             "| ratio of medians |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["case"] == f"{method}_train_memory":
            name, fmt = f"{r['case']} ({mem_label}, {MEMORY_STEPS} steps)", _fmt_mb
        elif r["case"] == f"{method}_train_memory_above_import":
            name, fmt = f"{method}_train_memory (peak RSS − RSS after imports)", _fmt_mb
        else:
            name, fmt = r["case"], _fmt_time
        if r["target"] is None:
            tgt = "—"
        else:
            op = "<" if r["target_op"] == "<" else "≤"
            tgt = f"{op} {r['target']:.2f} " + ("(met)" if r["met"] else "(MISSED)")
        lines.append(f"| {name} | {fmt(r['peftkit'])} | {_label(r['ref'], method)} | {fmt(r['reference'])} | "
                     f"{_fmt_ratio(r['ratio'])} | {tgt} | {_fmt_ratio(r['ratio_of_medians'])} |")
    return "\n".join(lines)


def method_notes(rows: list[dict], children: list[dict], method: str = "shira") -> str:
    out = []
    sh = [c for c in children if c["case"] in METHOD_CASES[method]]
    step_case, mem_case = f"{method}_train_step", f"{method}_train_memory"

    def lab(lib: str) -> str:
        return _label(lib, method)

    def per_lib(case: str, key: str, first_round: bool = False) -> dict:
        return {c["lib"]: c["info"][key] for c in sh
                if c["case"] == case and key in c["info"] and (c["round"] == 0 or not first_round)}

    for metric in METHOD_TIME_METRICS[method]:
        samples: dict[str, list[float]] = {}
        for r in rows:
            if r["case"] == metric:
                samples.update(r["samples"])
        if samples:
            parts = [f"{lab(lib)} {_fmt_time(min(xs))}..{_fmt_time(max(xs))} (n={len(xs)})"
                     for lib, xs in samples.items()]
            rmin = [f"{lib} {min(samples['peftkit']) / min(xs):.3f}" for lib, xs in samples.items() if lib != "peftkit"]
            out.append(f"- {metric} sample range: " + "; ".join(parts) + "; ratio of minima vs " + ", ".join(rmin))
    if method == "xlora":
        fwd = {c["lib"]: c for c in sh if c["case"] == "xlora_forward"}
        sums = {lib: c["info"]["logits_checksum"] for lib, c in fwd.items() if "logits_checksum" in c["info"]}
        if "peftkit" in sums and "peft" in sums:
            out.append(f"- xlora_forward logits sum: peftkit {sums['peftkit']:.6g}, peft {sums['peft']:.6g} "
                       f"(same experts and classifier: should agree)")
        backbone = [t for c in sh if c["case"] == "xlora_forward" and c["lib"] == BASE
                    for t in c["info"].get("backbone_s", [])]
        med = {lib: statistics.median(xs) for r in rows if r["case"] == "xlora_forward" for lib, xs in r["samples"].items()}
        if backbone and BASE in med and "peft" in med:
            floor = (statistics.median(backbone) + med[BASE]) / med["peft"]
            out.append(f"- xlora_forward floor: any exact X-LoRA forward runs the backbone (scaling pass, "
                       f"{_fmt_time(statistics.median(backbone))}) and the full model (real pass, "
                       f"{_fmt_time(med[BASE])}): (backbone + base) / peft = {floor:.3f}")
    init_note = {"shira": "SHiRA values 0 and LoRA B = 0 at init", "lokr": "LoKr W1 = 0 at init",
                 "loha": "LoHa hada_w2_b = 0 at init",
                 "ia3": "IA3 vectors 1 at init",
                 "oft": "OFT skew-symmetric blocks 0 at init, rotations = identity",
                 "boft": "BOFT rotations = identity, scale 1 and LoRA B = 0 at init",
                 "prompt_tuning": "same seed, same random virtual tokens: peftkit and peft should agree; base "
                                  "sees no virtual tokens",
                 "p_tuning": "same seed, same prompt encoder: peftkit and peft should agree; base sees no "
                             "virtual tokens",
                 "prefix": "same seed, same prefix: peftkit and peft should agree; base has no prefix",
                 "adaption_prompt": "Llama-Adapter gates 0 at init", "xlora": "",
                 "qlora": "LoRA B = 0 at init over the same nf4 weights"}[method]
    # the train-step cases with loss and parameter checks (BOFT: also the peftkit-only factor-2 row)
    step_cases = [step_case] + (["boft2_train_step"] if method == "boft" else [])
    for sc in step_cases:
        losses = per_lib(sc, "loss_first_step", first_round=True)
        if losses:
            should = "" if method in PROMPT_METHODS[:3] else ": all should agree"
            out.append(f"- {sc} first-step loss ({init_note}{should}): "
                       + ", ".join(f"{lab(k)} {v:.5f}" for k, v in losses.items()))
            # prompt tuning, P-tuning, prefix: the virtual tokens change the loss, so only peftkit vs peft
            vals = [v for k, v in losses.items() if k in LIBS or method not in PROMPT_METHODS[:3]]
            spread = max(vals) - min(vals)
            who = "peftkit and peft" if method in PROMPT_METHODS[:3] else "all"
            out.append(f"- {sc} first-step losses agree ({who}): {spread < 1e-4} (spread {spread:.1e})")
    if method in ("ia3", "oft", "boft", *PROMPT_METHODS):  # deterministic init, so the loss after one AdamW step agrees too
        second = {k: v[1] for k, v in per_lib(step_case, "losses_first_steps", first_round=True).items()
                  if len(v) > 1 and k in LIBS}
        if len(second) == 2:
            spread = max(second.values()) - min(second.values())
            out.append(f"- {step_case} loss after one AdamW step (same init): "
                       + ", ".join(f"{lab(k)} {v:.5f}" for k, v in second.items())
                       + f"; agree: {spread < 1e-3} (spread {spread:.1e})")
    what = {"shira": "SHiRA r=16 and LoRA r=16: r·(m+n) per layer", "lokr": f"LoKr r={RANK}", "loha": f"LoHa r={RANK}",
            "ia3": "IA3: one vector per layer",
            "oft": f"OFT block size {OFT_BLOCK_SIZE}: b(b-1)/2 per block",
            "boft": f"BOFT block size {BOFT_BLOCK_SIZE}, factor {BOFT_FACTOR}, plus the output scale",
            "prompt_tuning": f"{PROMPT_VIRTUAL_TOKENS} virtual tokens x hidden",
            "p_tuning": f"{PROMPT_VIRTUAL_TOKENS} virtual tokens + MLP encoder, width {PTUNING_ENCODER_HIDDEN}",
            "prefix": f"{PROMPT_VIRTUAL_TOKENS} virtual tokens x 2 x layers x hidden",
            "adaption_prompt": f"adapter_len {ADAPTION_LEN} x hidden + 1 gate, {ADAPTION_LAYERS} layers",
            "xlora": "the classifier", "qlora": f"LoRA r={RANK}: r·(m+n) per layer"}[method]
    for sc in step_cases:
        params = per_lib(sc, "trainable_params", first_round=True)
        if params:
            w = what if sc == step_case else f"BOFT block size {BOFT_BLOCK_SIZE}, factor {BOFT_FACTOR2}"
            same = len({v for k, v in params.items() if k in LIBS}) == 1
            out.append(f"- {sc} trainable parameters ({w}): "
                       + ", ".join(f"{lab(k)} {v:,}" for k, v in params.items())
                       + (f"; peftkit == peft: {same}" if all(k in params for k in LIBS) else ""))
    if method == "boft":
        out.append(f"- boft2_train_step: peftkit's BOFT with boft_n_butterfly_factor={BOFT_FACTOR2} (block size "
                   f"{BOFT_BLOCK_SIZE}) against peftkit LoRA only; peft's BOFT is left out because without its "
                   "fbd_cuda extension (not built on CPU) it silently forces the butterfly factor to 1, so it "
                   "would not run the same adapter")
    over = {r["ref"]: r for r in rows if r["case"] == step_case}
    if BASE in over:
        parts = [f"{lab('peftkit')} {(over[BASE]['ratio'] - 1) * 100:+.1f}%"]
        floor = ""
        for ref in ("peft", "peftkit_lora"):  # lib / base from the other children's samples, paired the same way
            by_round: dict[int, dict[str, list[float]]] = {}
            for c in sh:
                if c["case"] == step_case and c["samples"].get(step_case):
                    by_round.setdefault(c["round"], {})[c["lib"]] = c["samples"][step_case]
            r = _paired(by_round, ref, BASE)
            if r is not None:
                parts.append(f"{lab(ref)} {(r - 1) * 100:+.1f}%")
                if ref == "peft":  # an adapter step also runs the frozen base's work: peftkit/peft can't go lower
                    floor = f"; floor of peftkit/peft (base/peft, paired) {1 / r:.3f}"
        out.append(f"- {step_case} cost above the frozen base (median per-repeat lib/base - 1): "
                   + ", ".join(parts) + floor)
    if BASE_SDDMM in over:  # SHiRA: the values' gradient is (Gᵀ X) at the mask's positions
        by_round = {}
        for c in sh:
            if c["case"] == step_case and c["samples"].get(step_case):
                by_round.setdefault(c["round"], {})[c["lib"]] = c["samples"][step_case]
        parts = [f"{lab(BASE_SDDMM)} / {lab(ref)} (paired) = {r:.3f}"
                 for ref in ("peft", "peftkit_lora") if (r := _paired(by_round, BASE_SDDMM, ref)) is not None]
        out.append(f"- {step_case} floor: an exact SHiRA step runs the base step plus the values' gradient, "
                   f"(GᵀX) at the r·(m+n) positions of every targeted weight; with stock torch's sampled product "
                   f"(torch.sparse.sampled_addmm, which needs Gᵀ and Xᵀ token-contiguous; Xᵀ made once per input) "
                   f"that alone is "
                   + ", ".join(parts))
    if BASE_FT in over:  # LoHa: dL/dW1 = (Gᵀ X) ⊙ W2 needs each targeted weight's full gradient Gᵀ X
        by_round = {}
        for c in sh:
            if c["case"] == step_case and c["samples"].get(step_case):
                by_round.setdefault(c["round"], {})[c["lib"]] = c["samples"][step_case]
        r = _paired(by_round, BASE_FT, "peft")
        if r is not None:
            out.append(f"- {step_case} floor: an exact LoHa step needs every targeted weight's full gradient "
                       f"(dL/dW1 = (GᵀX) ⊙ W2, likewise W2), so it costs at least the base step plus those "
                       f"gradients ({lab(BASE_FT)}): {lab(BASE_FT)} / peft (paired) = {r:.3f}")
    gen_case = f"{method}_generate"
    toks = {c["lib"]: c["info"]["gen_tokens"] for c in sh if c["case"] == gen_case and "gen_tokens" in c["info"]}
    if toks:
        same_calls = all(c["info"].get("gen_same_every_call", False) for c in sh if c["case"] == gen_case)
        shape = next(c["info"]["gen_shape"] for c in sh if c["case"] == gen_case and "gen_shape" in c["info"])
        per_round = {}
        for c in sh:
            if c["case"] == gen_case and "gen_tokens" in c["info"]:
                per_round.setdefault(c["lib"], []).append(c["info"]["gen_tokens"])
        stable = all(all(t == ts[0] for t in ts) for ts in per_round.values())
        line = (f"- {gen_case}: greedy, {GEN_BATCH} prompts x {GEN_PROMPT} tokens, {GEN_NEW} new tokens (output "
                f"shape {shape}); every call of a child gave the same tokens: {same_calls and stable}")
        if all(k in toks for k in LIBS):
            eq = toks["peftkit"] == toks["peft"]
            diff = sum(a != b for ra, rb in zip(toks["peftkit"], toks["peft"]) for a, b in zip(ra, rb))
            line += f"; peftkit tokens == peft tokens: {eq}" + ("" if eq else f" ({diff} of {GEN_BATCH * GEN_NEW} differ)")
        if BASE in toks and "peftkit" in toks:
            line += f"; == base's: {toks['peftkit'] == toks[BASE]}" + (
                " (gates 0 at init: expected)" if method == "adaption_prompt"
                else " (the experts act: expected False)" if method == "xlora" else " (virtual tokens act: expected False)")
        out.append(line)
    mem = [c for c in sh if c["case"] == mem_case]
    if mem:
        parts = []
        for c in mem:
            i = c["info"]
            parts.append(f"{lab(c['lib'])}: after imports {i['rss_after_import_mb']:.0f} MB, after build "
                         f"{i['rss_after_build_mb']:.0f} MB, peak {c['peak_rss_mb']:.0f} MB"
                         + (f", CUDA peak {c['cuda_peak_mb']:.0f} MB" if "cuda_peak_mb" in c else ""))
        out.append(f"- {mem_case} RSS (the peak includes imports and the model): " + "; ".join(parts))
    checks = [("shira_switch_merged", "switch_ok", "switch_err",
               "weights after a -> b and b -> a equal the original + the new adapter's delta (max abs diff)"),
              ("shira_get_peft_model", "mask_ok", None, "r·(m+n) distinct in-range positions in every layer"),
              ("shira_save_load", "load_ok", None, "from_pretrained restored the saved values and positions exactly")]
    for case, flag, val, text in checks:
        agg: dict[str, tuple[bool, float | None]] = {}
        for c in sh:
            if c["case"] == case and flag in c["info"]:
                ok, v = agg.get(c["lib"], (True, None))
                x = c["info"].get(val) if val else None
                agg[c["lib"]] = (ok and bool(c["info"][flag]), x if v is None else max(v, x) if x is not None else v)
        if agg:
            out.append(f"- {case}: {text}: " + ", ".join(
                f"{lab(k)}={ok}" + (f" ({v:.1e})" if v is not None else "") for k, (ok, v) in agg.items()))
    return "\n".join(out)


def notes(rows: list[dict], children: list[dict]) -> str:
    out = []
    by = {r["case"]: r for r in rows}
    ts = by.get("train_step")
    if ts and ts["peftkit_over_base"] and ts["peft_over_base"]:
        out.append(f"- train_step cost above the frozen base (median per-repeat): peftkit "
                   f"{(ts['peftkit_over_base'] - 1) * 100:+.1f}%, peft {(ts['peft_over_base'] - 1) * 100:+.1f}%")
        losses = {c["lib"]: c["info"].get("loss_first_step") for c in children
                  if c["case"] == "train_step" and c["round"] == 0}
        out.append("- first-step loss (B = 0 at init, so all should agree): "
                   + ", ".join(f"{k} {v:.5f}" for k, v in losses.items() if v is not None))
    for name in TIME_METRICS:
        r = by.get(name)
        if r:
            parts = [f"{lib} {_fmt_time(min(xs))}..{_fmt_time(max(xs))} (n={len(xs)})"
                     for lib, xs in r["samples"].items()]
            mins = {lib: min(xs) for lib, xs in r["samples"].items()}
            rmin = _ratio(mins.get("peftkit"), mins.get("peft"))
            out.append(f"- {name} sample range: " + "; ".join(parts)
                       + (f"; ratio of minima {rmin:.3f}" if rmin is not None else ""))
    mem = [c for c in children if c["case"] == "train_memory"]
    if mem:
        parts = []
        for c in mem:
            i = c["info"]
            parts.append(f"{c['lib']}: after imports {i['rss_after_import_mb']:.0f} MB, after build "
                         f"{i['rss_after_build_mb']:.0f} MB, peak {c['peak_rss_mb']:.0f} MB"
                         + (f", CUDA peak {c['cuda_peak_mb']:.0f} MB" if "cuda_peak_mb" in c else ""))
        out.append("- train_memory RSS (the peak includes imports and the model): " + "; ".join(parts))
    imports: dict[str, list[float]] = {}
    for c in children:
        imports.setdefault(c["lib"], []).append(c["info"]["import_s"])
    out.append("- child import time (untimed; children import concurrently): "
               + ", ".join(f"{k} {statistics.median(v):.2f} s" for k, v in imports.items()))
    dts = [c for c in children if c["case"] == "dora_train_step" and c["round"] == 0]
    if dts:
        out.append("- dora_train_step first-step loss (B = 0 at init, so all should agree): "
                   + ", ".join(f"{c['lib']} {c['info']['loss_first_step']:.5f}" for c in dts
                               if c["info"].get("loss_first_step") is not None))
    dev = {c["lib"]: c["info"]["logits_head"] for c in children
           if c["case"] == "dora_eval_forward" and c["round"] == 0 and "logits_head" in c["info"]}
    if len(dev) >= 2:
        ref = next(iter(dev.values()))
        diff = max(abs(a - b) for v in dev.values() for a, b in zip(v, ref))
        out.append(f"- dora_eval_forward: logits of {', '.join(dev)} (B = 0 at init) differ by at most {diff:.2e}")
    for case, derived in ABOVE_BASE.items():
        r = by.get(derived)
        if not r or not by[case]["base"]:
            continue
        base = by[case]["base"]
        parts = [f"{lib} {_fmt_time(r[lib])} ({r[lib] / base * 100:+.0f}% of base)" for lib in LIBS
                 if r.get(lib) is not None]
        floor = _ratio(1.0, by[case]["peft_over_base"])  # median of per-repeat base / peft
        out.append(f"- {case} cost above the base (median of per-repeat lib - base): " + ", ".join(parts)
                   + (f"; floor of peftkit/peft (base/peft) {floor:.3f}" if floor else "")
                   + (f"; {r['skipped_repeats']} repeat(s) with peft <= base left out of the ratio"
                      if r["skipped_repeats"] else ""))
    checks = [("mixed_batch", "mixed_ok", "mixed_max_err",
               "mixed-batch output equals per-adapter runs (max abs diff)"),
              ("switch_merged", "switch_ok", "switch_err_fast",
               "weights after a switch equal original + other adapter's delta (max abs diff, fast path)"),
              ("weighted_svd", "svd_ok", "svd_rel_err",
               "svd adapter's delta is the rank-16 truncation of the weighted sum (relative error, one layer)")]
    for case, flag, val, text in checks:
        cs = [c for c in children if c["case"] == case and flag in c["info"]]
        if cs:
            agg: dict[str, tuple[bool, float]] = {}
            for c in cs:
                ok, v = agg.get(c["lib"], (True, 0.0))
                agg[c["lib"]] = (ok and bool(c["info"][flag]), max(v, c["info"].get(val, 0.0)))
            extra = ""
            if case == "switch_merged":
                e3 = [c["info"]["switch_err_3calls"] for c in cs if "switch_err_3calls" in c["info"]]
                if e3:
                    extra = f"; peftkit three calls {max(e3):.1e}"
            out.append(f"- {case}: {text}: " + ", ".join(f"{k}={ok} ({v:.1e})" for k, (ok, v) in agg.items()) + extra)
    sl = [c for c in children if c["case"] == "save_load"]
    if sl:
        ok: dict[str, bool] = {}
        for c in sl:
            ok[c["lib"]] = ok.get(c["lib"], True) and bool(c["info"].get("load_ok"))
        out.append("- from_pretrained restored the saved adapter exactly: "
                   + ", ".join(f"{k}={v}" for k, v in ok.items()))
    return "\n".join(out)


def _provenance(path: str) -> str:
    try:
        out = subprocess.run(["git", "-C", path, "describe", "--always", "--dirty", "--abbrev=10"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return f"{path}, git {out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats, one round (CI smoke, ~5 min)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--cases", default=",".join(CASES),
                    help=f"comma-separated subset of {','.join(CASES)} (groups \"shira\", \"lokr\", \"loha\", \"ia3\", "
                         "\"oft\", \"boft\", \"prompt_tuning\", \"p_tuning\", \"prefix\", \"adaption_prompt\": all of "
                         "that method's cases; \"prompt\": the four prompt-learning groups)")
    ap.add_argument("--repeats", type=int, default=None, help="timed samples per child (default: per case)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per child for train_step")
    ap.add_argument("--rounds", type=int, default=None, help="fresh sets of children per case (default 2, quick 1)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every child (default 2)")
    ap.add_argument("--json", metavar="OUT", default=None, help="write rows, raw samples and metadata here")
    ap.add_argument("--child", nargs=2, metavar=("CASE", "LIB"), default=None,
                    help="run one case for one lib (peftkit, peft, base; in the shira_* and boft*_train_step cases "
                         "also the LoRA references peftkit_lora, peft_lora) in this process and print its JSON")
    ap.add_argument("--driven", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-timeout", type=float, default=600.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    mode = "quick" if args.quick else "full"
    if args.warmup is None:
        args.warmup = DEFAULT_TRAIN_WARMUP[mode]

    if args.child:
        case, lib = args.child
        if args.repeats is None:
            args.repeats = DEFAULT_REPEATS[mode].get(case, 1)
        _emit(run_child(case, lib, args))
        return 0

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    # a method's name ("shira", "lokr", "loha", "ia3", "oft", "boft") stands for all of its cases
    cases = list(dict.fromkeys(x for c in cases for g in GROUP_ALIASES.get(c, (c,))
                               for x in METHOD_CASES.get(g, (g,))))
    bad = [c for c in cases if c not in CASES]
    if bad:
        ap.error(f"unknown case(s) {bad}; choose from {', '.join(CASES)} or the groups "
                 f"{', '.join([*METHOD_CASES, *GROUP_ALIASES])}")
    rounds = args.rounds or DEFAULT_ROUNDS[mode]
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda, but torch sees no CUDA device")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    log(f"# peftkit vs peft: {mode} run, device={args.device}, threads={args.threads}, rounds={rounds}")
    t_start = time.perf_counter()
    children: list[dict] = []
    failed: dict[str, str] = {}
    for rnd in range(rounds):
        for case in cases:
            if case in MEMORY_CASES and rnd > 0:
                continue  # peak memory barely moves between runs: one set of children
            if case in failed:
                continue
            try:
                children += drive_case(case, rnd, args, mode, log)
            except RuntimeError as e:  # a child died (e.g. a method not implemented yet): report, go on
                failed[case] = str(e)
                log(f"  round {rnd} {case:17s} FAILED: {str(e).splitlines()[0]}")
    total = time.perf_counter() - t_start

    rows = summarise(children, args.device)
    method_rows = {m: summarise_method(children, args.device, m) for m in METHOD_CASES}
    method_rows = {m: r for m, r in method_rows.items() if r}
    all_method_rows = [r for rs in method_rows.values() for r in rs]
    import torch
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version()}
    for c in children:
        if c["info"].get("version"):
            versions[c["lib"]] = c["info"]["version"]
    for c in children:  # where peftkit came from, and its commit when it is a git checkout
        if c["lib"] == "peftkit" and c["info"].get("path"):
            versions["peftkit"] = f"{versions.get('peftkit', '?')} ({_provenance(c['info']['path'])})"
            break
    if args.device == "cuda":
        dev = "cuda (" + next((c["info"]["device_name"] for c in children if "device_name" in c["info"]), "?") + ")"
    else:
        dev = f"cpu ({platform.machine()}, {os.cpu_count()} cores visible)"
    print(f"\npeftkit vs peft: {mode} run on {dev}, torch threads={args.threads}, rounds={rounds}, "
          f"wall {total:.0f} s; " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "\n")
    if rows or not (all_method_rows or failed):
        print(markdown(rows, args.device))
        print()
    if children:
        print(notes(rows, children))
    intro = {"shira": "peftkit's SHiRA against each reference (peft's SHiRA, the LoRA r=16 of the same "
                      "parameter count, the frozen base)",
             "lokr": f"peftkit's LoKr (r={RANK}, alpha={ALPHA}, all linear layers) against peft's LoKr and the "
                     "frozen base",
             "loha": f"peftkit's LoHa (r={RANK}, alpha={ALPHA}, all linear layers) against peft's LoHa and the "
                     "frozen base",
             "ia3": f"peftkit's IA3 (all linear layers, feedforward {'/'.join(IA3_FEEDFORWARD)}) against peft's "
                    "IA3 and the frozen base",
             "oft": f"peftkit's OFT (block size {OFT_BLOCK_SIZE}, Cayley-Neumann 5 terms, all linear layers) against "
                    "peft's OFT and the frozen base",
             "boft": f"peftkit's BOFT (block size {BOFT_BLOCK_SIZE}, butterfly factor {BOFT_FACTOR}, all linear layers) "
                     "against peft's BOFT, peftkit's LoRA r=16 and the frozen base; row boft2_train_step: butterfly "
                     f"factor {BOFT_FACTOR2}, peftkit only",
             "prompt_tuning": f"peftkit's prompt tuning ({PROMPT_VIRTUAL_TOKENS} virtual tokens) against peft's and "
                              "the plain base",
             "p_tuning": f"peftkit's P-tuning ({PROMPT_VIRTUAL_TOKENS} virtual tokens, MLP encoder width "
                         f"{PTUNING_ENCODER_HIDDEN}) against peft's and the plain base",
             "prefix": f"peftkit's prefix tuning ({PROMPT_VIRTUAL_TOKENS} virtual tokens, no projection) against "
                       "peft's and the plain base",
             "adaption_prompt": f"peftkit's Llama-Adapter (adapter_len {ADAPTION_LEN}, top {ADAPTION_LAYERS} "
                                "layers) against peft's and the plain base",
             "xlora": f"peftkit's X-LoRA ({XLORA_EXPERTS} LoRA experts r={RANK} on all linear layers, classifier depth 1) "
                      "against peft's and the plain base model (xlora_forward: eval forward, batch "
                      f"{BATCH}x{SEQ}; xlora_generate: {GEN_NEW} new tokens, peft without the cache, which it refuses)",
             "qlora": f"peftkit's LoRA (r={RANK}, alpha={ALPHA}, all linear layers) on a bitsandbytes nf4 model "
                      "against peft's LoRA on the same 4-bit model and the frozen 4-bit base"}
    for m, mrows in method_rows.items():
        print(f"\n{METHOD_NAMES[m]}: {intro[m]}; ratios as above, paired per repeat\n")
        print(markdown_method(mrows, args.device, m))
        print()
        print(method_notes(mrows, children, m))
    noisy = [r["case"] for r in rows if r["kind"] == "time"
             and any(min(xs) > 0 and max(xs) / min(xs) > 3 for xs in r["samples"].values())]
    noisy += list(dict.fromkeys(r["case"] for r in all_method_rows if r["kind"] == "vs_time"
                                and any(min(xs) > 0 and max(xs) / min(xs) > 3 for xs in r["samples"].values())))
    if noisy:
        print(f"\nwarning: samples of {', '.join(noisy)} vary more than 3x: the machine was noisy during the run "
              "(on shared vCPUs, --threads 1 is steadier); trust the paired ratios over the absolute times.")
    missed = [r["case"] for r in rows if r["met"] is False]
    missed += [f"{r['case']} vs {r['ref']}" for r in all_method_rows if r["met"] is False]
    print("\ntargets missed: " + (", ".join(missed) if missed else "none"))
    if failed:
        print("\ncases that failed (no numbers):")
        for case, err in failed.items():
            print(f"- {case}: " + "\n  ".join(err.splitlines()[-4:]))

    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": {"mode": mode, "device": dev, "threads": args.threads, "rounds": rounds,
                                "cases": cases, "versions": versions, "wall_s": total, "argv": sys.argv[1:]},
                       "rows": rows + all_method_rows, "children": children, "failed": failed}, fh, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
