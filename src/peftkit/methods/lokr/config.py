"""``LoKrConfig``: every field PEFT writes for LoKr, so configs round-trip between the libraries."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import PeftConfig
from ...types import PeftType

_INIT_CHOICES = (True, False, "lycoris")


@dataclass
class LoKrConfig(PeftConfig):
    """Configuration of a LoKr adapter: ``W x + (alpha / r) · kron(W1, W2) x``.

    The base weight's (out, in) sizes are split as out = a·b and in = c·d
    (``factorization``); W1 is (a, c) and W2 is (b, d) — for a convolution W2 also carries
    the kernel, (b, d, *k). A factor is kept low-rank (``_a @ _b``) when r is small next to
    its sides: W2 when ``r < max(b, d) / 2``, W1 only with ``decompose_both`` and
    ``r < max(a, c) / 2``; otherwise it is a full matrix.

    Attributes:
        r: the rank of the low-rank factors.
        alpha: the numerator of the scaling ``alpha / r``.
        rank_dropout: in training, each output feature of the update is dropped with this
            probability (one draw per forward, shared by the batch).
        module_dropout: in training, the whole adapter is skipped for a forward with this
            probability.
        use_effective_conv2d: for Conv1d/Conv2d with a kernel larger than 1 and a low-rank W2,
            factor W2 as a CP decomposition (``lokr_t2`` core with ``lokr_w2_a``/``lokr_w2_b``).
        decompose_both: allow W1 to be low-rank too.
        decompose_factor: split each dimension with one factor as close to this as possible
            (-1: as close to the square root as possible).
        rank_dropout_scale: rescale the kept features by 1 / (kept fraction) under rank dropout.
        target_modules: module names to adapt (list suffix, regex string, ``"all-linear"``);
            nn.Linear, transformers Conv1D, nn.Conv1d and nn.Conv2d.
        exclude_modules: modules never to adapt, in the same forms.
        init_weights: True (W1 zero, W2 random: starts as the base model), "lycoris" (W2 / W2's
            ``_b`` zero, W1 random: also the base model), False (everything random: tests only).
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
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.LOKR
        super().__post_init__()
        if self.init_weights not in _INIT_CHOICES:
            raise ValueError(f"LoKrConfig.init_weights must be True, False or 'lycoris', got {self.init_weights!r}.")
