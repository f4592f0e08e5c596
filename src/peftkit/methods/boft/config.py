"""``BOFTConfig``: every field PEFT writes for BOFT, so configs round-trip between the libraries."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import PeftConfig
from ...types import PeftType


@dataclass
class BOFTConfig(PeftConfig):
    """Configuration of a BOFT adapter: orthogonal butterfly fine-tuning.

    The layer's input is rotated by ``M = B_{n−1} ⋯ B_0``, ``n = boft_n_butterfly_factor``
    block-diagonal orthogonal factors, each seen through a butterfly permutation, and its
    output features are scaled by a learned ``s``: ``s ⊙ (base(x M) − b) + b``. Give exactly one
    of ``boft_block_size`` and ``boft_block_num``; their product must be each layer's
    in_features (in_channels · kernel size for a convolution). With a factor above 1 the block
    count must be even and divisible by 2^(factor−1), and the block size even.

    Attributes:
        boft_block_size: features per block (0: derive it from ``boft_block_num``).
        boft_block_num: blocks per factor (0: derive it from ``boft_block_size``).
        boft_n_butterfly_factor: butterfly factors; 1 is OFT with a scale.
        target_modules: module names to adapt (list suffix, regex string, ``"all-linear"``):
            nn.Linear, transformers Conv1D, nn.Conv1d/2d/3d.
        exclude_modules: modules never to adapt, in the same forms.
        boft_dropout: in training, this fraction of the blocks of one random factor is the
            identity for a forward.
        fan_in_fan_out: the base weight is stored (in, out) (GPT-2's Conv1D; set for you).
        bias: which biases train and are saved: "none", "all" or "boft_only".
        modules_to_save: extra modules trained in full and saved with the adapter.
        init_weights: True starts at the identity and ``s = 1`` (the base model); False draws
            ``boft_R`` from N(0, 0.1²) and ``s`` from N(1, 0.1²) (tests only).
        layers_to_transform: layer indices to adapt (list targets only).
        layers_pattern: the name of the layer list (``"layers"``, ``"h"``) before the index.
    """

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    boft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.BOFT
        super().__post_init__()
        for attr in ("boft_block_size", "boft_block_num"):
            value = getattr(self, attr)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"BOFTConfig.{attr} must be a non-negative integer, got {value!r}.")
        if (self.boft_block_size == 0) == (self.boft_block_num == 0):
            raise ValueError(
                f"BOFTConfig needs exactly one of boft_block_size (got {self.boft_block_size}) and boft_block_num "
                f"(got {self.boft_block_num}) to be non-zero: set the other to 0, since their product is in_features."
            )
        factor = self.boft_n_butterfly_factor
        if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
            raise ValueError(f"BOFTConfig.boft_n_butterfly_factor must be a positive integer, got {factor!r}.")
        if not 0.0 <= self.boft_dropout <= 1.0:
            raise ValueError(f"BOFTConfig.boft_dropout is a probability in [0, 1], got {self.boft_dropout!r}.")
        if self.bias not in ("none", "all", "boft_only"):
            raise ValueError(f"BOFTConfig.bias must be 'none', 'all' or 'boft_only', got {self.bias!r}.")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"BOFTConfig.init_weights must be True or False, got {self.init_weights!r}.")
