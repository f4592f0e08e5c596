"""``ShiraConfig``: PEFT's fields, plus ``mask_fn`` (set on the instance, never saved)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...config import PeftConfig
from ...types import PeftType


@dataclass
class ShiraConfig(PeftConfig):
    """Configuration of a SHiRA adapter: train ``r·(m+n)`` chosen entries of each m×n weight.

    Attributes:
        r: sets the number of trained entries per layer, ``r·(m+n)``: LoRA's parameter count at
            rank r. It does not limit the rank of the update.
        mask_type: "random": a random set of entries, drawn from ``random_seed`` (the default
            mask). Any other value requires ``config.mask_fn``.
        random_seed: the seed of the random mask; the same seed gives the same mask on every
            machine. None draws the seed from torch's global generator (``torch.manual_seed``).
        target_modules: module names to adapt (list suffix, regex string); nn.Linear and
            transformers Conv1D only.
        fan_in_fan_out: the base weight is stored (in, out), as in GPT-2's Conv1D (set for you).
        init_weights: True starts every value at zero (the base model); False draws them from
            a normal distribution (tests).
        modules_to_save: extra modules trained in full and saved with the adapter.

    ``config.mask_fn = fn`` sets a mask function: ``fn(base_layer, r, **kwargs)`` returns a 0/1
    tensor shaped like ``base_layer.weight`` with exactly ``r·(m+n)`` ones, on the weight's
    device and dtype. It is called when the adapter is created, not when it is loaded (the
    positions come from the file), and it is not written to ``adapter_config.json``.
    """

    r: int = 32
    mask_type: str = "random"
    random_seed: int | None = None
    target_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_weights: bool = True
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.SHIRA
        super().__post_init__()
        self.mask_fn: Callable[..., Any] | None = None  # the default random mask unless set
