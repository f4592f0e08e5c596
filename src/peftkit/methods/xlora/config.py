"""``XLoraConfig``: a mixture of trained LoRA experts gated per token by a small classifier."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import PeftConfig
from ...types import PeftType


@dataclass
class XLoraConfig(PeftConfig):
    """Configuration of an X-LoRA model.

    Attributes:
        hidden_size: the base model's hidden size (the classifier's input). None: read from the
            model when the X-LoRA model is built.
        adapters: expert name -> folder (or Hub id) of a trained LoRA adapter, in the order the
            classifier's outputs follow. Any names work. A saved X-LoRA model carries its experts
            in sub-folders ``0/``, ``1/``, ..., so reloading does not need these paths.
        enable_softmax: softmax over the experts of the classifier's output.
        enable_softmax_topk: softmax over the ``top_k_lora`` selected experts only; needs
            ``top_k_lora`` and excludes ``enable_softmax``.
        layerwise_scalings: one set of expert weights per adapted layer (else one per token,
            shared by every layer).
        xlora_depth: classifier depth: 1 is a single linear layer; more is a stack of
            linear / ReLU / dropout blocks of width ``xlora_size``.
        xlora_size: width of the classifier's hidden layers (depth > 1).
        xlora_dropout_p: dropout between the classifier's hidden layers (depth > 1).
        use_trainable_adapters: train the experts too (they are frozen by default).
        softmax_temperature: the softmax divides the classifier's logits by this (lower: sharper).
        top_k_lora: keep only the k highest-weighted experts per token (None: all).
        scaling_pass_value: the weight every expert gets in the first (scaling) pass; None means
            1/number of experts.
        global_scaling_weight: a factor on every expert's output.
    """

    hidden_size: int | None = None
    adapters: dict[str, str] | None = None
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    layerwise_scalings: bool = False
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    use_trainable_adapters: bool = False
    softmax_temperature: float = 1.0
    top_k_lora: int | None = None
    scaling_pass_value: float | None = 0.0
    global_scaling_weight: float = 1.0

    def __post_init__(self) -> None:
        self.peft_type = PeftType.XLORA
        super().__post_init__()
        if self.adapters is None:
            self.adapters = {}
        self.adapters = {str(k): str(v) for k, v in dict(self.adapters).items()}
        if self.enable_softmax_topk and self.enable_softmax:
            raise ValueError(
                "XLoraConfig: enable_softmax_topk and enable_softmax are mutually exclusive: set enable_softmax=False "
                "to normalise over the top-k experts only."
            )
        if self.enable_softmax_topk and self.top_k_lora is None:
            raise ValueError("XLoraConfig: enable_softmax_topk needs top_k_lora (how many experts to keep per token).")
        if self.top_k_lora is not None and (isinstance(self.top_k_lora, bool) or int(self.top_k_lora) < 1):
            raise ValueError(f"XLoraConfig.top_k_lora must be at least 1 (or None for all experts), got {self.top_k_lora!r}.")
        if not isinstance(self.xlora_depth, int) or self.xlora_depth < 1:
            raise ValueError(f"XLoraConfig.xlora_depth must be a positive integer, got {self.xlora_depth!r}.")
        if self.xlora_depth > 1 and (not isinstance(self.xlora_size, int) or self.xlora_size < 1):
            raise ValueError(f"XLoraConfig.xlora_size must be a positive integer, got {self.xlora_size!r}.")
        if not 0.0 <= self.xlora_dropout_p < 1.0:
            raise ValueError(f"XLoraConfig.xlora_dropout_p is a probability in [0, 1), got {self.xlora_dropout_p!r}.")
        if not self.softmax_temperature > 0:
            raise ValueError(f"XLoraConfig.softmax_temperature must be positive, got {self.softmax_temperature!r}.")
