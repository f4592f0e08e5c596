"""The config base class, with JSON save/load in PEFT's ``adapter_config.json`` layout."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from .types import PeftType, PeftWarning, TaskType

CONFIG_NAME = "adapter_config.json"
# The PEFT file-format version these files follow; PEFT parses this field as a version number.
PEFT_FORMAT_VERSION = "0.21.2"
# Keys PEFT may write that carry no meaning for a loaded config.
_IGNORED_KEYS = {"runtime_config"}


@dataclass
class PeftConfig:
    """Fields every adapter config has.

    Attributes:
        peft_type: the adapter method; set by each subclass.
        task_type: the task head (``TaskType``) or None for a bare model.
        base_model_name_or_path: where the base model came from; ``AutoPeftModel`` loads it.
        revision: the base model's revision on the Hub, if any.
        inference_mode: True when the adapter is frozen (loaded for inference).
        auto_mapping: ``{"base_model_class", "parent_library"}`` for bare models (no task_type).
        peft_version: the format version the file follows.
    """

    peft_type: str | PeftType | None = None
    task_type: str | TaskType | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    auto_mapping: dict | None = None
    peft_version: str | None = None

    # ``r = 0`` means "not set" (OFT, where the block size is given instead).
    r_may_be_zero: ClassVar[bool] = False
    # Prompt-learning methods (virtual tokens) override this.
    is_prompt_learning: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.task_type is not None:
            valid = [t.value for t in TaskType]
            tt = self.task_type.value if isinstance(self.task_type, TaskType) else self.task_type
            if tt not in valid:
                raise ValueError(f"Invalid task_type {self.task_type!r}: use one of {', '.join(valid)} or None.")
            self.task_type = tt
        if isinstance(self.peft_type, PeftType):
            self.peft_type = self.peft_type.value
        if self.peft_version is None:
            self.peft_version = PEFT_FORMAT_VERSION
        self._check_shared_fields()

    def _check_shared_fields(self) -> None:
        """Rules for fields that several methods' configs have (each rule applies where the field exists)."""
        name = type(self).__name__
        for attr in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, attr, None), (list, tuple)):
                setattr(self, attr, set(getattr(self, attr)))
        r = getattr(self, "r", 1)
        low = 0 if self.r_may_be_zero else 1
        if not isinstance(r, int) or isinstance(r, bool) or r < low:
            raise ValueError(f"{name}.r must be a {'non-negative' if low == 0 else 'positive'} integer, got {r!r}.")
        for attr in ("rank_dropout", "module_dropout"):
            p = getattr(self, attr, 0.0)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name}.{attr} is a probability in [0, 1], got {p!r}.")
        if getattr(self, "layers_pattern", None) and getattr(self, "layers_to_transform", 0) is None:
            raise ValueError("layers_pattern has no effect without layers_to_transform: set both or neither.")

    def copy(self) -> PeftConfig:
        """A copy to adjust for one model (the caller's object stays as it was), instance extras such as
        SHiRA's ``mask_fn`` included."""
        fields = {f.name for f in dataclasses.fields(self)}
        extras = {k: v for k, v in vars(self).items() if k not in fields}
        config = dataclasses.replace(self)
        vars(config).update(extras)
        return config

    # ----------------------------------------------------------------- dict / JSON
    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, set):
                v = sorted(v)
            elif isinstance(v, (PeftType, TaskType)):
                v = v.value
            out[f.name] = v
        return out

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``adapter_config.json`` (``inference_mode`` is written as true, as PEFT does).

        The top-level keys are sorted; nested dicts keep their order, which carries meaning
        (``rank_pattern``: the first matching key wins; X-LoRA's ``adapters``: the experts' order).
        """
        os.makedirs(save_directory, exist_ok=True)
        d = self.to_dict()
        d["inference_mode"] = True
        from .io.serialization import atomic_write_text

        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), json.dumps(dict(sorted(d.items())), indent=2))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        """Build the right config subclass from a dict; unknown keys are dropped with a warning."""
        data = dict(data)
        if cls is PeftConfig or "peft_type" in data:
            if "peft_type" not in data or data["peft_type"] is None:
                raise ValueError("The adapter config has no 'peft_type': it is not a PEFT adapter config.")
            from .registry import get_method

            target = get_method(data["peft_type"]).config
        else:
            target = cls
        known = {f.name for f in dataclasses.fields(target) if f.init}
        unknown = sorted(k for k in data if k not in known and k not in _IGNORED_KEYS)
        if unknown:
            warnings.warn(
                f"Ignoring keys unknown to peftkit's {target.__name__}: {unknown} "
                "(they come from a newer or different library version).",
                PeftWarning,
                stacklevel=2,
            )
        kwargs = {k: v for k, v in data.items() if k in known}
        return target(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> PeftConfig:
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **hub_kwargs: Any
    ) -> PeftConfig:
        """Load ``adapter_config.json`` from a folder or a Hub id (through the local Hub cache)."""
        from .io.hub import resolve_file

        path = resolve_file(pretrained_model_name_or_path, CONFIG_NAME, subfolder=subfolder, **hub_kwargs)
        return cls.from_json_file(path)
