"""``OFTConfig``: every field PEFT writes for OFT, so configs round-trip between the libraries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...config import PeftConfig
from ...types import PeftType


@dataclass
class OFTConfig(PeftConfig):
    """Configuration of an OFT adapter: the layer's input is rotated by a learned block-diagonal
    orthogonal matrix, ``base(x R)``, so the weight becomes ``W Rᵀ``.

    The rotated axis (in_features; in_channels · kernel size for a convolution) is cut into
    ``r`` blocks of ``oft_block_size`` features; give one of the two and the other follows
    (``r × oft_block_size = in_features``). A value that does not divide a layer's features is
    moved to the nearest one that does, with a warning (PEFT's rule). Each block is the Cayley
    transform of a skew-symmetric matrix, stored as its packed strict upper triangle
    (``oft_R.weight``, (r, bs·(bs−1)/2)).

    Attributes:
        r: number of blocks per layer (0: derive it from ``oft_block_size``).
        oft_block_size: features per block (0: derive it from ``r``).
        module_dropout: in training, this fraction of the blocks is the identity for a forward.
        target_modules: module names to adapt (list suffix, regex string, ``"all-linear"``):
            nn.Linear, transformers Conv1D, nn.Conv1d/2d/3d.
        exclude_modules: modules never to adapt, in the same forms.
        fan_in_fan_out: the base weight is stored (in, out) (GPT-2's Conv1D; set for you).
        bias: which biases train and are saved: "none", "all" or "oft_only".
        init_weights: True starts at the identity rotation (the base model); False draws the
            parameters from N(0, 0.1²) (tests only).
        layers_to_transform: layer indices to adapt (list targets only).
        layers_pattern: the name of the layer list (``"layers"``, ``"h"``) before the index.
        modules_to_save: extra modules trained in full and saved with the adapter.
        coft: constrained OFT: before each use, each block's skew matrix is pulled back to
            Frobenius norm ``eps / sqrt(number of blocks)`` when it is larger.
        eps: COFT's radius.
        block_share: one block, shared by every position on the diagonal.
        use_cayley_neumann: build the blocks from a truncated Neumann series (no solve; nearly
            orthogonal) instead of the exact Cayley transform.
        num_cayley_neumann_terms: terms of that series.
    """

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    exclude_modules: list[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    r_may_be_zero: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.peft_type = PeftType.OFT
        super().__post_init__()
        if not isinstance(self.oft_block_size, int) or self.oft_block_size < 0:
            raise ValueError(f"OFTConfig.oft_block_size must be a non-negative integer, got {self.oft_block_size!r}.")
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ValueError(
                f"OFTConfig needs exactly one of r (blocks per layer, got {self.r}) and oft_block_size (features "
                f"per block, got {self.oft_block_size}); set the other to 0, since r × oft_block_size = in_features."
            )
        if self.bias not in ("none", "all", "oft_only"):
            raise ValueError(f"OFTConfig.bias must be 'none', 'all' or 'oft_only', got {self.bias!r}.")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"OFTConfig.init_weights must be True or False, got {self.init_weights!r}.")
        if self.use_cayley_neumann and (not isinstance(self.num_cayley_neumann_terms, int)
                                        or self.num_cayley_neumann_terms < 1):
            raise ValueError(
                f"OFTConfig.num_cayley_neumann_terms must be a positive integer, got {self.num_cayley_neumann_terms!r}."
            )
        if self.coft and not self.eps > 0:
            raise ValueError(f"OFTConfig.eps (COFT's radius) must be positive, got {self.eps!r}.")
