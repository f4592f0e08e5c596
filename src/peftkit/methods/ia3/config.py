"""``IA3Config``: the fields PEFT writes for (IA)³, so configs round-trip between the libraries."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...config import PeftConfig
from ...types import PeftType


@dataclass
class IA3Config(PeftConfig):
    """Configuration of an (IA)³ adapter: one learned vector that rescales a layer's activations.

    A normal target scales its output channels, ``l ⊙ (W x + b)``; a feed-forward target scales
    its input channels, ``W (l ⊙ x) + b``. Merging multiplies the rows (output scaling, bias
    included) or the columns (input scaling) of the weight; unmerging divides them out again.

    Attributes:
        target_modules: module names to adapt: a list (exact name or name suffix), a regex string
            (full match), or ``"all-linear"``. None uses the model type's default (nn.Linear,
            transformers Conv1D and nn.Conv1d/2d/3d can be adapted).
        exclude_modules: modules never to adapt, in the same two forms.
        feedforward_modules: the targets whose *input* is scaled (the paper's feed-forward
            layers): a list (a target whose name ends with an entry) or a regex string (full
            match). A list must be a subset of a list ``target_modules``. None uses the model
            type's default; ``[]`` says that no target is feed-forward.
        fan_in_fan_out: the base weight is stored (in, out), as in GPT-2's Conv1D (set for you).
        modules_to_save: extra modules trained in full and saved with the adapter.
        init_ia3_weights: True starts every vector at one (the base model); False draws them
            from a standard normal distribution (tests only).
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        self.peft_type = PeftType.IA3
        super().__post_init__()
        if isinstance(self.feedforward_modules, (list, tuple)):
            self.feedforward_modules = set(self.feedforward_modules)
        if isinstance(self.feedforward_modules, set) and isinstance(self.target_modules, set):
            extra = self.feedforward_modules - self.target_modules
            if extra:
                raise ValueError(
                    f"IA3Config.feedforward_modules must be a subset of target_modules: {sorted(extra)} "
                    f"are not in target_modules={sorted(self.target_modules)}."
                )
        if not isinstance(self.init_ia3_weights, bool):
            raise ValueError(f"IA3Config.init_ia3_weights must be True or False, got {self.init_ia3_weights!r}.")


def is_feedforward(config: IA3Config, key: str) -> bool:
    """Whether module ``key`` is a feed-forward target: a regex must match the whole name, a list entry
    must end it (a plain suffix, without a dot boundary: PEFT's rule)."""
    ff = config.feedforward_modules
    if isinstance(ff, str):
        return re.fullmatch(ff, key) is not None
    return any(key.endswith(entry) for entry in ff or ())
