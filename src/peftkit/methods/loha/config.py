"""``LoHaConfig``: every field PEFT writes for LoHa, so configs round-trip between the libraries."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import PeftConfig
from ...types import PeftType


@dataclass
class LoHaConfig(PeftConfig):
    """Configuration of a LoHa adapter: ``W x + (alpha / r) · ((W1a W1b) ⊙ (W2a W2b)) x``.

    Each of the two factors is a rank-r product; their element-wise (Hadamard) product can
    reach rank r², for the parameters of two rank-r LoRAs.

    Attributes:
        r: the rank of each of the two low-rank products.
        alpha: the numerator of the scaling ``alpha / r``.
        rank_dropout: in training, each output feature of the update is dropped with this
            probability (one draw per forward, shared by the batch) and the kept ones are
            rescaled by 1 / (kept fraction).
        module_dropout: in training, the whole adapter is skipped for a forward with this
            probability.
        use_effective_conv2d: for Conv1d/Conv2d with a kernel larger than 1, keep each factor
            in CP form (``hada_t1``/``hada_t2`` cores over the kernel, ``_a`` on the output and
            ``_b`` on the input channels) instead of a flattened (out, in·k) matrix.
        target_modules: module names to adapt (list suffix, regex string, ``"all-linear"``);
            nn.Linear, transformers Conv1D, nn.Conv1d and nn.Conv2d.
        exclude_modules: modules never to adapt, in the same forms.
        init_weights: True (``hada_w2_b`` zero, the rest random: starts as the base model),
            False (everything random: tests only).
        layers_to_transform: layer indices to adapt (list targets only).
        layers_pattern: the name of the layer list (``"layers"``, ``"h"``) before the index.
        rank_pattern: module-name regex -> rank, overriding ``r``; first match wins.
        alpha_pattern: module-name regex -> alpha, overriding ``alpha``; first match wins.
        modules_to_save: extra modules trained in full and saved with the adapter.
    """

    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    r: int = 8
    alpha: int | float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.LOHA
        super().__post_init__()
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"LoHaConfig.init_weights must be True or False, got {self.init_weights!r}.")
