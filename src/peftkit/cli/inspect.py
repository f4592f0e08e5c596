"""``peftkit inspect DIR``: what an adapter folder holds."""

from __future__ import annotations

import json
import os

from ..config import CONFIG_NAME
from ..io.serialization import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, load_state_dict


def run_inspect(path: str) -> int:
    for root, _, files in sorted(os.walk(path)):
        if CONFIG_NAME not in files:
            continue
        name = os.path.relpath(root, path)
        cfg = json.load(open(os.path.join(root, CONFIG_NAME), encoding="utf-8"))
        print(f"adapter {'default' if name == '.' else name!r}: {cfg.get('peft_type')} task={cfg.get('task_type')}")
        shown = {k: cfg[k] for k in ("r", "lora_alpha", "target_modules", "modules_to_save") if cfg.get(k) is not None}
        for k, v in shown.items():
            print(f"  {k}: {v}")
        weights = next((os.path.join(root, f) for f in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME) if f in files), None)
        if weights is None:
            print("  (no weights file)")
            continue
        state = load_state_dict(weights)
        total = sum(t.numel() for t in state.values())
        print(f"  {len(state)} tensors, {total:,d} values in {os.path.basename(weights)}")
        for key in list(state)[:6]:
            print(f"    {key} {tuple(state[key].shape)} {state[key].dtype}")
        if len(state) > 6:
            print(f"    ... {len(state) - 6} more")
    return 0
