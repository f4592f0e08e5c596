"""``LoraConfig``: every field PEFT writes, so configs round-trip between the libraries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...config import PeftConfig
from ...types import PeftType
from .init import parse_pissa

_INIT_CHOICES = (True, False, "gaussian", "olora")
# Fields PEFT knows that peftkit does not implement yet: their defaults, and what they are.
_UNSUPPORTED = {
    "use_qalora": (False, "QA-LoRA"),
    "layer_replication": (None, "layer replication"),
    "megatron_config": (None, "Megatron parallel layers"),
    "eva_config": (None, "EVA initialisation"),
    "corda_config": (None, "CorDA initialisation"),
    "trainable_token_indices": (None, "trainable tokens"),
    "target_parameters": (None, "target_parameters (nn.Parameter targets)"),
    "alora_invocation_tokens": (None, "activated LoRA"),
    "arrow_config": (None, "Arrow routing"),
    "kasa_config": (None, "KaSA"),
    "lora_ga_config": (None, "LoRA-GA initialisation"),
    "monteclora_config": (None, "MonteCLoRA"),
    "use_bdlora": (None, "BD-LoRA"),
    "velora_config": (None, "VeLoRA"),
}


@dataclass
class LoraConfig(PeftConfig):
    """Configuration of a LoRA adapter: ``W x + (alpha / r) · B A x``.

    Attributes:
        r: the rank of the update (A is r × in, B is out × r).
        target_modules: module names to adapt: a list (exact name or name suffix), a regex
            string (full match), or ``"all-linear"``. None uses the model type's default.
        exclude_modules: modules never to adapt, in the same two forms.
        lora_alpha: the numerator of the scaling ``lora_alpha / r``.
        lora_dropout: dropout on the adapter's input during training.
        fan_in_fan_out: the base weight is stored (in, out), as in GPT-2's Conv1D (set for you).
        bias: which biases train and are saved: "none", "all" or "lora_only".
        use_rslora: scale by ``lora_alpha / sqrt(r)`` (rank-stabilised LoRA).
        modules_to_save: extra modules trained in full and saved with the adapter.
        init_lora_weights: True (A Kaiming-uniform, B zero: starts as the base model),
            "gaussian" (A normal with std 1/r), False (random A and B: for tests only),
            "pissa" / "pissa_niter_K" (principal singular vectors, exact or randomized SVD) or
            "olora" (QR): these two move the top-r part of W into the adapter and leave the
            residual in the base layer; see ``save_pretrained(path_initial_model_for_weight_conversion=...)``.
        layers_to_transform: layer indices to adapt (list targets only).
        layers_pattern: the name of the layer list (``"layers"``, ``"h"``) before the index.
        rank_pattern: module-name regex -> rank, overriding ``r``; first match wins.
        alpha_pattern: module-name regex -> alpha, overriding ``lora_alpha``; first match wins.
        lora_bias: give B a bias (trained, saved, merged into the base bias).
        use_dora: weight-decomposed LoRA (DoRA): a trained magnitude per output channel.
        megatron_core, loftq_config, qalora_group_size, ensure_weight_tying and the fields
            listed in ``_UNSUPPORTED``: PEFT fields kept so configs round-trip; peftkit raises
            a clear error if one is set to a value it does not implement.
    """

    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: int | float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    lora_bias: bool = False
    megatron_config: dict | None = None
    megatron_core: str | None = "megatron.core"
    loftq_config: dict = field(default_factory=dict)
    qalora_group_size: int = 16
    ensure_weight_tying: bool = False
    use_dora: bool = False
    use_qalora: bool = False
    layer_replication: list | None = None
    eva_config: dict | None = None
    corda_config: dict | None = None
    trainable_token_indices: Any = None
    target_parameters: list[str] | None = None
    alora_invocation_tokens: list[int] | None = None
    arrow_config: dict | None = None
    kasa_config: dict | None = None
    lora_ga_config: dict | None = None
    monteclora_config: dict | None = None
    use_bdlora: Any = None
    velora_config: dict | None = None

    def __post_init__(self) -> None:
        self.peft_type = PeftType.LORA
        super().__post_init__()
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoraConfig.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}.")
        init = self.init_lora_weights
        if init not in _INIT_CHOICES and not (isinstance(init, str) and init.startswith("pissa")):
            raise ValueError(
                f"init_lora_weights={init!r} is not supported: use True, False, 'gaussian', 'pissa', "
                "'pissa_niter_<K>' or 'olora'."
            )
        if isinstance(init, str) and init.startswith("pissa"):
            parse_pissa(init)
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise ValueError(
                "layers_to_transform / layers_pattern work with a list of target_modules, not a regex string: "
                "put the layer index into the regex instead."
            )
        for name, (default, what) in _UNSUPPORTED.items():
            if getattr(self, name) not in (default, {}, []):
                raise NotImplementedError(f"LoraConfig.{name}={getattr(self, name)!r}: {what} is not supported by peftkit yet.")
