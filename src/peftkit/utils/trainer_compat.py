"""Let ``transformers.Trainer`` save and resume peftkit models adapter-only.

Why this module patches transformers: the Trainer decides whether a model is a PEFT model with
``isinstance(model, peft.PeftModel)`` (``trainer_utils._is_peft_model``) and whether to call the
model's own ``save_pretrained`` with ``isinstance(model, (PreTrainedModel, peft.PeftModel))``
(``Trainer._save``). A peftkit model passes neither test, whether or not ``peft`` is installed,
so without help the Trainer writes the *full* ``state_dict()`` into every checkpoint and cannot
resume from adapter files. No hook on the model is consulted before those tests, so the tests
themselves are widened here, for peftkit models only: every other model takes the original code.

What changes, for a peftkit ``PeftModel`` only:

* ``_is_peft_model`` answers True (so resuming and ``load_best_model_at_end`` call the model's
  ``load_adapter``, ``unwrap_peft_model`` finds the base model, and a quantized base with
  adapters is accepted for training);
* ``Trainer._save`` calls the model's ``save_pretrained`` (adapter_config.json +
  adapter_model.safetensors) instead of writing ``model.safetensors``;
* ``update_fsdp_plugin_peft`` (which imports ``peft`` to build a wrap policy) leaves the plugin as
  configured.

``install()`` is called when a ``PeftModel`` is built. It patches ``transformers.trainer`` at once
if it is loaded, or else right after it is first imported (through a one-shot import hook), so
``import peftkit`` never imports the Trainer.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
from typing import Any

_TRAINER = "transformers.trainer"
_PATCHED = "_peftkit_patched"


def _is_peftkit_model(model: Any) -> bool:
    from ..peft_model import PeftModel

    return isinstance(model, PeftModel)


def _widen(is_peft_model: Any) -> Any:
    if getattr(is_peft_model, _PATCHED, False):
        return is_peft_model

    def _is_peft_model(model: Any) -> bool:
        return _is_peftkit_model(model) or is_peft_model(model)

    setattr(_is_peft_model, _PATCHED, True)
    return _is_peft_model


def _save_adapter(original: Any) -> Any:
    def _save(self: Any, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not _is_peftkit_model(model):
            return original(self, output_dir, state_dict)
        import torch
        from transformers.trainer import TRAINING_ARGS_NAME

        if state_dict is not None and not self.args.should_save:
            return  # the caller gathered the weights already: nothing left for this rank to join
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        # otherwise every rank runs save_pretrained: gathering a sharded (FSDP2) adapter needs all of them
        model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=self.args.should_save)
        if not self.args.should_save:
            return
        tokenizer = self.processing_class
        if tokenizer is None:
            tokenizer = getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    setattr(_save, _PATCHED, True)
    return _save


def _keep_fsdp_plugin(original: Any) -> Any:
    def update_fsdp_plugin_peft(model: Any, accelerator: Any) -> None:
        if not _is_peftkit_model(model):
            original(model, accelerator)

    setattr(update_fsdp_plugin_peft, _PATCHED, True)
    return update_fsdp_plugin_peft


def _patch(trainer_module: Any) -> None:
    if getattr(trainer_module.Trainer._save, _PATCHED, False):
        return
    for name in ("transformers.trainer_utils", _TRAINER, "transformers.integrations.neftune"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "_is_peft_model"):
            module._is_peft_model = _widen(module._is_peft_model)
    trainer_module.Trainer._save = _save_adapter(trainer_module.Trainer._save)
    if hasattr(trainer_module, "update_fsdp_plugin_peft"):
        trainer_module.update_fsdp_plugin_peft = _keep_fsdp_plugin(trainer_module.update_fsdp_plugin_peft)


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of ``transformers.trainer`` to patch it once loaded."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _TRAINER:
            return None
        # importlib is iterating sys.meta_path right now: skip ourselves rather than remove ourselves
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module: Any) -> None:
            exec_module(module)
            _patch(module)
            if self in sys.meta_path:  # one shot (the lookup is over by now)
                sys.meta_path.remove(self)

        spec.loader.exec_module = exec_and_patch
        return spec


_hook: _PatchAfterImport | None = None


def install() -> None:
    """Patch the Trainer now if it is loaded, else as soon as it is imported. Idempotent."""
    global _hook
    module = sys.modules.get(_TRAINER)
    if module is not None and hasattr(module, "Trainer"):
        _patch(module)
    elif _hook is None or _hook not in sys.meta_path:
        _hook = _PatchAfterImport()
        sys.meta_path.insert(0, _hook)
